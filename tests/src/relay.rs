//! A TCP relay on loopback to the apiserver that tests cut and restore, so
//! a sidecar or the operator loses the API while the shared cluster stays up,
//! and a kubeconfig whose server is the relay.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// The apiserver of the admin kubeconfig: its server URL as the kubeconfig
/// writes it, and its address.
pub fn apiserver() -> (String, SocketAddr) {
    let kubeconfig = kube::config::Kubeconfig::read_from(crate::kubeconfig_path()).unwrap();
    let server = kubeconfig.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("the kubeconfig names a server");
    let target = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .expect("the server is an ip:port address");
    (server, target)
}

/// A TCP relay on loopback to the apiserver that can be cut and restored.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    target: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    /// A relay to `target`, accepting at once.
    pub async fn new(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Self {
            addr: listener.local_addr().unwrap(),
            target,
            accept: Mutex::default(),
            conns: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: TcpListener) {
        let (target, conns) = (self.target, self.conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                // Closing with RST when cut, as a vanished peer looks.
                let _ = client.set_zero_linger();
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    /// A copy of the admin kubeconfig whose server, `server` (as
    /// [`apiserver`] gives it), is this relay, written to
    /// `NAME.kubeconfig` in the temporary directory.
    pub fn kubeconfig(&self, server: &str, name: &str) -> PathBuf {
        let original = std::fs::read_to_string(crate::kubeconfig_path()).unwrap();
        let relayed = original.replace(server, &format!("https://{}", self.addr));
        assert_ne!(original, relayed, "the kubeconfig names {server}");
        let path = std::env::temp_dir().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, relayed).unwrap();
        path
    }

    /// Makes the API unreachable: the port closes and every relayed connection is cut.
    pub async fn cut(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
        // An aborted task drops its sockets when it is next polled.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(self.addr).await.is_err(),
            "the relay still accepts"
        );
    }

    /// Makes the API reachable again, on the same port.
    pub async fn restore(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("the relay's port again");
        self.serve(listener);
    }
}
