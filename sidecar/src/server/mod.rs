//! Serving a tower stack on a listener: HTTP/1.1 and h2c on one port, with
//! limits, and a graceful drain.
//!
//! A connection's first bytes tell its protocol: the HTTP/2 connection
//! preface is h2c with prior knowledge (gRPC clients), anything else is
//! HTTP/1.1, so one listener serves both; a TLS handshake record is mutual
//! TLS from another sidecar (the inbound listener only), with HTTP/2 or
//! HTTP/1.1 inside by ALPN, and the caller's identity from its certificate
//! goes with each request as a [`Peer`]. Those bytes are read here, under
//! [`ServerLimits::first_bytes_timeout`], and handed back to hyper in
//! front of the rest of the stream; a client that connects and says
//! nothing is closed instead of holding a slot. Connections are capped with
//! a semaphore taken before `accept`, so at the cap the kernel's backlog
//! holds new clients instead of the proxy accepting and dropping them.
//! Once the protocol is known, a watchdog beside each connection closes it
//! when its client goes quiet: an HTTP/1.1 request head that has begun and
//! is not complete within the header read timeout, and a connection of
//! either protocol with no request in flight for the idle timeout. hyper's
//! own HTTP/1.1 header read timeout is not used: it also runs while a
//! keep-alive connection waits between requests, so it would close pooled
//! connections after seconds, racing the requests clients send on them.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use http::{Request, Version};
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tower::ServiceExt;

mod protocol;
mod unread_body;
mod watchdog;

use self::{
    protocol::{Protocol, Replay},
    unread_body::FinishUnread,
    watchdog::{CountRequests, HeadSignal, Requests, http1_quiet, idle_for, until_drained},
};
use crate::{
    http::{Body, BoxError, boxed},
    mtls::{MeshTls, Peer},
    stack::ListenerService,
};

/// How a listener answers a TLS client.
#[derive(Clone)]
pub enum ServerTls {
    /// Mutual TLS with the mesh certificate: the client must prove a mesh
    /// identity, which goes with each request as a [`Peer`].
    Mesh(MeshTls),
    /// TLS at the edge, with the certificates of a gateway's HTTPS
    /// listeners (the latest configuration's); clients are not
    /// authenticated.
    Edge(watch::Receiver<Option<Arc<rustls::ServerConfig>>>),
}

/// The address of the client on the other end of a request's connection.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// Limits every listener applies to its clients.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Connections open at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// Time a new connection has to send the bytes that tell its protocol
    /// (the HTTP/2 preface, or anything else, which is HTTP/1.1). A client
    /// that connects and sends nothing is closed when it passes, so silent
    /// connections hold a slot of `max_connections` for this long at most.
    /// HTTP/1.1 then has `header_read_timeout` for the rest of its first
    /// head; HTTP/2 has `idle_timeout` until its first stream.
    ///
    /// 10 s by default, as Linkerd's protocol detection (Envoy's listener
    /// filters allow 15 s): a client that speaks first writes its first
    /// bytes right after connecting, so any real client is far inside it.
    pub first_bytes_timeout: Duration,
    /// Time an HTTP/1.1 client has from the first byte of a request head to
    /// its end, so a slow client cannot hold a connection by trickling
    /// bytes. A keep-alive connection waiting for its next request is
    /// under `idle_timeout` instead.
    ///
    /// The clock starts when bytes arrive on a connection with no request
    /// in flight; bytes of a pipelined head that arrived with the previous
    /// request start no clock, and such a head is bounded by
    /// `idle_timeout`.
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
    /// A connection with no request in flight (no open stream, for HTTP/2)
    /// for this long is closed gracefully (HTTP/2: GOAWAY, then close).
    /// HTTP/2 keep-alive pings do not count as activity: they prove the
    /// peer is there, not that it needs the slot.
    ///
    /// 5 min by default. Pooling clients close idle connections sooner
    /// (this sidecar's own pool after 30 s, hyper's and Go's after 90 s),
    /// so the server is not the side that ends a connection a client
    /// still means to use; Envoy's default of 1 h is for edge proxies
    /// with long-lived clients, and lets an abandoned connection hold a
    /// slot twelve times as long.
    pub idle_timeout: Duration,
    /// How long a drain waits for in-flight requests before closing anyway.
    pub drain_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            first_bytes_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 1000,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
            drain_grace: Duration::from_secs(25),
        }
    }
}

/// hyper's two connection builders, configured from the limits.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: &ServerLimits) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(limits.max_concurrent_streams)
            .keep_alive_interval(limits.keepalive_interval)
            .keep_alive_timeout(limits.keepalive_timeout);
        Self {
            http1: h1,
            http2: h2,
        }
    }
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
    tls: Option<ServerTls>,
    mut shutdown: watch::Receiver<bool>,
) {
    let builders = Arc::new(Builders::new(&limits));
    let limits = Arc::new(limits);
    // Every connection holds a receiver: the drain is over when none is left.
    let (drain, _) = watch::channel(false);
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
        let conn = connection(
            stream,
            peer,
            service.clone(),
            builders.clone(),
            limits.clone(),
            tls.clone(),
            drain.subscribe(),
        );
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
    let open = drain.receiver_count();
    tracing::info!(listener = name, open, "draining");
    drain.send_replace(true);
    if tokio::time::timeout(limits.drain_grace, drain.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain grace period over; closing the remaining connections"
        );
    }
}

/// One connection: its protocol from its first bytes (within the first
/// bytes deadline), then, for TLS, the handshake (within the same
/// deadline again) and ALPN, then hyper, until it ends or the drain
/// closes it. TLS is accepted only with `tls` and a certificate; without
/// them a TLS client is closed, since it cannot be served.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: ListenerService,
    builders: Arc<Builders>,
    limits: Arc<ServerLimits>,
    tls: Option<ServerTls>,
    mut drain: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    let mut io = Replay::new(stream);
    let protocol = tokio::select! {
        detected = tokio::time::timeout(limits.first_bytes_timeout, io.detect()) => match detected {
            Ok(Ok(Some(p))) => p,
            // Closed before saying anything: nothing to serve.
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => {
                tracing::debug!(%peer, timeout = ?limits.first_bytes_timeout, "no protocol in time; closing");
                return Ok(());
            }
        },
        _ = crate::shutdown::signalled(&mut drain) => return Ok(()),
    };
    let heads = HeadSignal::new();
    let conn = match protocol {
        Protocol::Tls => {
            let config = match &tls {
                Some(ServerTls::Mesh(mesh)) => mesh.server_config(),
                Some(ServerTls::Edge(edge)) => edge.borrow().clone(),
                None => None,
            };
            let Some(config) = config else {
                tracing::debug!(%peer, "a TLS client, but no certificate to answer with; closing");
                return Ok(());
            };
            io.heads = Some(heads.clone());
            let handshake = tokio_rustls::TlsAcceptor::from(config).accept(io);
            let stream = tokio::select! {
                done = tokio::time::timeout(limits.first_bytes_timeout, handshake) => match done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake refused");
                        return Ok(());
                    }
                    Err(_) => return Ok(()),
                },
                _ = crate::shutdown::signalled(&mut drain) => return Ok(()),
            };
            let session = stream.get_ref().1;
            let protocol = if session.alpn_protocol() == Some(trellis_identity::tls::ALPN_H2) {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
            let from = match &tls {
                Some(ServerTls::Mesh(mesh)) => {
                    // The verifier required a certificate of the bundle; one
                    // that names no workload is not a mesh peer.
                    let Some(id) = trellis_identity::tls::peer_id(
                        session.peer_certificates().unwrap_or_default(),
                    ) else {
                        tracing::debug!(%peer, "a TLS client certificate without a SPIFFE ID; closing");
                        return Ok(());
                    };
                    mesh.saw(&id);
                    Peer::Mesh(Arc::new(id))
                }
                _ => Peer::Plaintext,
            };
            http(
                stream, protocol, peer, from, heads, service, &builders, limits, drain,
            )
        }
        Protocol::Http1 => {
            io.heads = Some(heads.clone());
            http(
                io,
                protocol,
                peer,
                Peer::Plaintext,
                heads,
                service,
                &builders,
                limits,
                drain,
            )
        }
        Protocol::Http2 => http(
            io,
            protocol,
            peer,
            Peer::Plaintext,
            heads,
            service,
            &builders,
            limits,
            drain,
        ),
    };
    conn.await?;
    Ok(())
}

/// hyper on a connection whose protocol is known, with each request
/// carrying its client's address and [`Peer`].
#[allow(clippy::too_many_arguments)]
fn http<I>(
    io: I,
    protocol: Protocol,
    addr: SocketAddr,
    from: Peer,
    heads: Arc<HeadSignal>,
    service: ListenerService,
    builders: &Builders,
    limits: Arc<ServerLimits>,
    drain: watch::Receiver<bool>,
) -> BoxFuture<'static, Result<(), hyper::Error>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service.map_request(move |req: Request<Incoming>| -> Request<Body> {
        // HTTP/2 bodies the stack leaves unread are read to their end (see
        // `unread_body`); an HTTP/1.1 connection reads or closes on its own.
        // Told by the request's version rather than captured: a capture
        // would change this closure's type, and with it the names of the
        // hyper server code built over it, which `link-order.txt` lists.
        let mut req = if req.version() == Version::HTTP_2 {
            req.map(|body| boxed(FinishUnread::new(body)))
        } else {
            req.map(boxed)
        };
        req.extensions_mut().insert(ClientAddr(addr));
        req.extensions_mut().insert(from.clone());
        req
    });
    let (requests, watched) = watch::channel(Requests::default());
    let svc = CountRequests {
        inner: svc,
        requests: Arc::new(requests),
    };
    // Each connection future is boxed with its type spelled out: the
    // boxed-error lifetimes in the body type otherwise trip a rustc
    // limitation when this future is spawned.
    match protocol {
        Protocol::Http2 => {
            let conn = builders
                .http2
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
            let quiet = idle_for(watched, limits.idle_timeout);
            Box::pin(until_drained(conn, drain, quiet))
        }
        Protocol::Http1 | Protocol::Tls => {
            let conn = builders
                .http1
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
            let quiet = http1_quiet(watched, heads, limits);
            Box::pin(until_drained(conn, drain, quiet))
        }
    }
}
