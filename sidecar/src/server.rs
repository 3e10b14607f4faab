//! Serving a tower stack on a listener: HTTP/1.1 and h2c on one port, with
//! limits, and a graceful drain.
//!
//! A connection's first bytes tell its protocol: the HTTP/2 connection
//! preface is h2c with prior knowledge (gRPC clients), anything else is
//! HTTP/1.1, so one listener serves both. Those bytes are read here, under
//! [`ServerLimits::first_bytes_timeout`], and handed back to hyper in
//! front of the rest of the stream; a client that connects and says
//! nothing is closed instead of holding a slot. Connections are capped with
//! a semaphore taken before `accept`, so at the cap the kernel's backlog
//! holds new clients instead of the proxy accepting and dropping them.
//! Once the protocol is known, hyper's header read timeout bounds an
//! HTTP/1.1 connection waiting for a request, and an idle timer over the
//! open streams bounds an HTTP/2 one (hyper's HTTP/2 server has none).

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use hyper::{
    body::{Frame, Incoming, SizeHint},
    server::conn::{http1, http2},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulConnection,
    service::TowerToHyperService,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tower::{Service, ServiceExt};

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
    /// Time a new connection has to send the bytes that tell its protocol
    /// (the HTTP/2 preface, or anything else, which is HTTP/1.1). A client
    /// that connects and sends nothing is closed when it passes, so silent
    /// connections hold a slot of `max_connections` for this long at most.
    /// HTTP/1.1 then has `header_read_timeout` for the rest of its first
    /// head; HTTP/2 has `http2_idle_timeout` until its first stream.
    ///
    /// 10 s by default, as Linkerd's protocol detection (Envoy's listener
    /// filters allow 15 s): a client that speaks first writes its first
    /// bytes right after connecting, so any real client is far inside it.
    pub first_bytes_timeout: Duration,
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
    /// An HTTP/2 connection with no open stream for this long is closed
    /// gracefully (GOAWAY, then close). Keep-alive pings do not count as
    /// activity: they prove the peer is there, not that it needs the slot.
    ///
    /// 5 min by default. Pooling clients close idle connections sooner
    /// (this sidecar's own pool after 30 s, hyper's and Go's after 90 s),
    /// so the server is not the side that ends a connection a client
    /// still means to use; Envoy's default of 1 h is for edge proxies
    /// with long-lived clients, and lets an abandoned connection hold a
    /// slot twelve times as long.
    pub http2_idle_timeout: Duration,
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
            http2_idle_timeout: Duration::from_secs(300),
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
            .header_read_timeout(limits.header_read_timeout)
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
/// bytes deadline), then hyper, until it ends or the drain closes it.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: ListenerService,
    builders: Arc<Builders>,
    limits: Arc<ServerLimits>,
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
    let svc = service.map_request(move |req: Request<Incoming>| -> Request<Body> {
        let mut req = req.map(boxed);
        req.extensions_mut().insert(ClientAddr(peer));
        req
    });
    let io = TokioIo::new(io);
    // Each connection future is boxed with its type spelled out: the
    // boxed-error lifetimes in the body type otherwise trip a rustc
    // limitation when this future is spawned.
    let conn: BoxFuture<'static, Result<(), hyper::Error>> = match protocol {
        Protocol::Http1 => {
            let conn = builders
                .http1
                .serve_connection(io, TowerToHyperService::new(svc));
            Box::pin(until_drained(conn, drain, std::future::pending()))
        }
        Protocol::Http2 => {
            let (open, idle) = watch::channel(0);
            let svc = CountStreams {
                inner: svc,
                open: Arc::new(open),
            };
            let conn = builders
                .http2
                .serve_connection(io, TowerToHyperService::new(svc));
            Box::pin(until_drained(
                conn,
                drain,
                idle_for(idle, limits.http2_idle_timeout),
            ))
        }
    };
    conn.await?;
    Ok(())
}

/// Drives `conn` to its end, shutting it down gracefully when the drain
/// starts or `idle` resolves, whichever is first.
async fn until_drained<C>(
    conn: C,
    mut drain: watch::Receiver<bool>,
    idle: impl Future<Output = ()>,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(conn);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = crate::shutdown::signalled(&mut drain), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut idle, if !closing => {
                tracing::debug!("HTTP/2 connection idle; closing");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Resolves once the stream count has stayed at zero for `timeout`.
async fn idle_for(mut open: watch::Receiver<usize>, timeout: Duration) {
    loop {
        if open.wait_for(|n| *n == 0).await.is_err() {
            // The connection (which holds the sender) is gone.
            return std::future::pending().await;
        }
        // Any change, a stream opening, restarts the wait.
        if tokio::time::timeout(timeout, open.changed()).await.is_err() {
            return;
        }
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// A TCP stream whose first bytes, read to tell the protocol, are read
/// again in front of the rest.
struct Replay {
    head: [u8; H2_PREFACE.len()],
    read: usize,
    len: usize,
    stream: TcpStream,
}

impl Replay {
    fn new(stream: TcpStream) -> Self {
        Self {
            head: [0; H2_PREFACE.len()],
            read: 0,
            len: 0,
            stream,
        }
    }

    /// Reads until the bytes so far are the whole HTTP/2 preface or differ
    /// from it (HTTP/1.1); `None` when the peer closes first.
    async fn detect(&mut self) -> io::Result<Option<Protocol>> {
        loop {
            let n = self.stream.read(&mut self.head[self.len..]).await?;
            if n == 0 {
                return Ok(None);
            }
            self.len += n;
            if self.head[..self.len] != H2_PREFACE[..self.len] {
                return Ok(Some(Protocol::Http1));
            }
            if self.len == H2_PREFACE.len() {
                return Ok(Some(Protocol::Http2));
            }
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.len {
            let n = (this.len - this.read).min(buf.remaining());
            buf.put_slice(&this.head[this.read..this.read + n]);
            this.read += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Counts an HTTP/2 connection's open streams: from the request's arrival
/// until its response body is done or dropped.
#[derive(Clone)]
struct CountStreams<S> {
    inner: S,
    open: Arc<watch::Sender<usize>>,
}

impl<S> Service<Request<Incoming>> for CountStreams<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let stream = OpenStream::new(&self.open);
        Counted {
            inner: self.inner.call(req),
            stream: Some(stream),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response future holding its stream open; the response body takes
    /// the hold over.
    struct Counted<F> {
        #[pin]
        inner: F,
        stream: Option<OpenStream>,
    }
}

impl<F> Future for Counted<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(rsp) = ready!(this.inner.poll(cx));
        let stream = this.stream.take();
        Poll::Ready(Ok(rsp.map(|body| {
            boxed(Held {
                body,
                _stream: stream,
            })
        })))
    }
}

/// One open stream, counted while this lives.
struct OpenStream(Arc<watch::Sender<usize>>);

impl OpenStream {
    fn new(open: &Arc<watch::Sender<usize>>) -> Self {
        open.send_modify(|n| *n += 1);
        Self(open.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its stream counted until hyper drops it.
struct Held {
    body: Body,
    _stream: Option<OpenStream>,
}

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
