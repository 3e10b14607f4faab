//! Real peers for tests that run sidecars against the cluster's apiserver:
//! upstreams on the node's bridge address (the apiserver refuses loopback
//! addresses in EndpointSlices; nothing leaves the host), and plain GETs
//! through a sidecar's outbound listener.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The node's address, on the cluster's bridge (see xtask's cluster::network).
pub const NODE_IP: &str = "10.244.0.1";

/// An upstream answering every request with `hello from NAME`.
pub async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind((NODE_IP, 0))
        .await
        .expect("the node's bridge address (is the cluster up?)");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("hello from {name}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

/// GET `http://SERVICE/` through the sidecar's outbound listener, in proxy form.
pub async fn get(outbound: SocketAddr, service: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(outbound).await.unwrap();
    let request =
        format!("GET http://{service}/ HTTP/1.1\r\nhost: {service}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
