//! Serving a tower stack on a listener: HTTP/1.1 and h2c on one port, with
//! limits, and a graceful drain.
//!
//! hyper-util's `auto` builder reads the connection preface to tell HTTP/2
//! prior knowledge from HTTP/1.1, so one listener serves both (gRPC clients
//! and ordinary ones). Connections are capped with a semaphore taken before
//! `accept`, so at the cap the kernel's backlog holds new clients instead of
//! the proxy accepting and dropping them.

use futures::future::BoxFuture;
use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::Request;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tower::ServiceExt;

use crate::{
    http::{Body, BoxError, boxed},
    stack::ListenerService,
};

/// The address of the client on the other end of a request's connection.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// Limits every listener applies to its clients.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Connections open at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// Time a client has to send a complete request head (HTTP/1.1), so a
    /// slow client cannot hold a connection open by trickling bytes. hyper
    /// starts this clock whenever it waits for a head, between keep-alive
    /// requests too, so it is also the HTTP/1.1 idle timeout.
    pub header_read_timeout: Duration,
    /// The largest request head accepted: HTTP/1.1 read buffer and HTTP/2
    /// header list size. Larger heads get 431 (HTTP/1.1) or a stream reset.
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval; a peer that does not answer within
    /// `keepalive_timeout` is dropped.
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
    /// How long a drain waits for in-flight requests before closing anyway.
    pub drain_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 1000,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            drain_grace: Duration::from_secs(25),
        }
    }
}

fn builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    b
}

/// Serves `service` on `listener` until `shutdown` turns true, then stops
/// accepting, lets open connections finish their requests (HTTP/1.1 closes
/// after the current response; HTTP/2 sends GOAWAY) for up to
/// `limits.drain_grace`, and returns.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    service: ListenerService,
    limits: ServerLimits,
    connections: Gauge,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = builder(&limits);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = service
            .clone()
            .map_request(move |req: Request<Incoming>| -> Request<Body> {
                let mut req = req.map(boxed);
                req.extensions_mut().insert(ClientAddr(peer));
                req
            });
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
            .into_owned();
        // Boxed with its type spelled out: the boxed-error lifetimes in the
        // body type otherwise trip a rustc limitation at `spawn`.
        let conn: BoxFuture<'static, Result<(), BoxError>> = Box::pin(graceful.watch(conn));
        let connections = connections.clone();
        connections.inc();
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
            }
            connections.dec();
            drop(permit);
        });
    }
    // Closing the socket makes new connects fail at once rather than hang.
    drop(listener);
    let open = graceful.count();
    tracing::info!(listener = name, open, "draining");
    if tokio::time::timeout(limits.drain_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain grace period over; closing the remaining connections"
        );
    }
}
