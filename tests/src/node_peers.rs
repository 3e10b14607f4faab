//! Real peers for tests that run sidecars against the cluster's apiserver:
//! upstreams on the node's bridge address (the apiserver refuses loopback
//! addresses in EndpointSlices; nothing leaves the host), the Service and
//! EndpointSlice that name them, and plain GETs to a sidecar's listeners.

use std::net::SocketAddr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;
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

/// A Service `name` with one port, `http` 80, and no selector: its
/// endpoints are the ones [`endpoint_slice`] gives it.
pub fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "ports": [{ "name": "http", "port": 80 }] },
    }))
    .unwrap()
}

/// The EndpointSlice `SERVICE-manual` of `service`: each address with its
/// readiness, all on the port of the first (80 when there is none).
pub fn endpoint_slice(service: &str, endpoints: &[(SocketAddr, bool)]) -> EndpointSlice {
    let port = endpoints.first().map_or(80, |(a, _)| a.port());
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{service}-manual"),
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": port, "protocol": "TCP" }],
        "endpoints": endpoints.iter().map(|(addr, ready)| json!({
            "addresses": [addr.ip().to_string()],
            "conditions": { "ready": ready },
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// A GET of `target` (origin or proxy form) with Host `host`, on a new
/// connection to `addr` closed after the answer: the status and the body,
/// or `None` when the connection fails or the answer is not HTTP.
pub async fn try_get(addr: SocketAddr, target: &str, host: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// GET `http://SERVICE/` through the sidecar's outbound listener, in proxy form.
pub async fn get(outbound: SocketAddr, service: &str) -> (u16, String) {
    try_get(outbound, &format!("http://{service}/"), service)
        .await
        .unwrap_or_else(|| panic!("no HTTP answer from {outbound} for {service}"))
}

/// GET `path` on a sidecar's admin listener.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    try_get(admin, path, "admin")
        .await
        .unwrap_or_else(|| panic!("no HTTP answer from the admin listener {admin} for {path}"))
}
