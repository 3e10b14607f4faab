//! A local port forwarded to a pod through the apiserver (`pods/portforward`,
//! as `kubectl port-forward` does): how a host outside the cluster network
//! (kind's) reaches a Gateway with the request exactly as sent, the
//! `Authorization` header included, which the apiserver's service proxy
//! consumes as its own credential.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt};
use tokio::net::{TcpListener, TcpStream};

/// Listens on a loopback port and forwards each connection to `port` of
/// the newest running pod matching `selector` in `namespace` (chosen per
/// connection, so a replaced pod is followed). Returns the local address;
/// the forwarding runs on the current runtime until it ends.
pub async fn forward(
    client: Client,
    namespace: &str,
    selector: &str,
    port: u16,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("a loopback port to forward")?;
    let local = listener.local_addr()?;
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let selector = selector.to_owned();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let (pods, selector) = (pods.clone(), selector.clone());
            tokio::spawn(async move {
                if let Err(e) = one(conn, &pods, &selector, port).await {
                    eprintln!("port-forward to {selector}:{port}: {e:#}");
                }
            });
        }
    });
    Ok(local)
}

/// One connection, copied both ways until either side closes.
async fn one(mut conn: TcpStream, pods: &Api<Pod>, selector: &str, port: u16) -> Result<()> {
    let pod = crate::shop::running_pods(pods, selector)
        .await?
        .pop()
        .with_context(|| format!("no running pod matches {selector}"))?;
    let mut forwarder = pods.portforward(&pod.name_any(), &[port]).await?;
    let mut upstream = forwarder
        .take_stream(port)
        .context("the port-forward's stream")?;
    tokio::io::copy_bidirectional(&mut conn, &mut upstream).await?;
    drop(upstream);
    forwarder.join().await?;
    Ok(())
}
