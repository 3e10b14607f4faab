//! A TCP relay on loopback to the apiserver that tests cut and restore, so
//! a sidecar or the operator loses the API while the shared cluster stays up.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

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
