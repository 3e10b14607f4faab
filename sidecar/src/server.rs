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
//! Once the protocol is known, a watchdog beside each connection closes it
//! when its client goes quiet: an HTTP/1.1 request head that has begun and
//! is not complete within the header read timeout, and a connection of
//! either protocol with no request in flight for the idle timeout. hyper's
//! own HTTP/1.1 header read timeout is not used: it also runs while a
//! keep-alive connection waits between requests, so it would close pooled
//! connections after seconds, racing the requests clients send on them.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
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
    let (requests, watched) = watch::channel(Requests::default());
    let svc = CountRequests {
        inner: svc,
        requests: Arc::new(requests),
    };
    // Each connection future is boxed with its type spelled out: the
    // boxed-error lifetimes in the body type otherwise trip a rustc
    // limitation when this future is spawned.
    let conn: BoxFuture<'static, Result<(), hyper::Error>> = match protocol {
        Protocol::Http1 => {
            let heads = HeadSignal::new();
            io.heads = Some(heads.clone());
            let conn = builders
                .http1
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
            let quiet = http1_quiet(watched, heads, limits.clone());
            Box::pin(until_drained(conn, drain, quiet))
        }
        Protocol::Http2 => {
            let conn = builders
                .http2
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
            let quiet = idle_for(watched, limits.idle_timeout);
            Box::pin(until_drained(conn, drain, quiet))
        }
    };
    conn.await?;
    Ok(())
}

/// Why a connection's client is considered gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quiet {
    /// No request in flight for the idle timeout: closed gracefully.
    Idle,
    /// An HTTP/1.1 request head begun and not finished in time: closed at
    /// once, since there is no request to finish.
    StalledHead,
}

/// Drives `conn` to its end, shutting it down gracefully when the drain
/// starts or the client goes idle, and dropping it when a head stalls.
async fn until_drained<C>(
    conn: C,
    mut drain: watch::Receiver<bool>,
    quiet: impl Future<Output = Quiet>,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(conn);
    tokio::pin!(quiet);
    let mut closing = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = crate::shutdown::signalled(&mut drain), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            why = &mut quiet, if !closing => match why {
                Quiet::Idle => {
                    tracing::debug!("connection idle; closing");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                Quiet::StalledHead => {
                    tracing::debug!("request head not complete in time; closing");
                    return Ok(());
                }
            },
        }
    }
}

/// Resolves with [`Quiet::Idle`] once no request has been in flight for
/// `timeout`.
async fn idle_for(mut requests: watch::Receiver<Requests>, timeout: Duration) -> Quiet {
    loop {
        if requests.wait_for(|r| r.open == 0).await.map(drop).is_err() {
            // The connection (which holds the sender) is gone.
            return std::future::pending().await;
        }
        // Any change, a request starting, restarts the wait.
        if tokio::time::timeout(timeout, requests.changed())
            .await
            .is_err()
        {
            return Quiet::Idle;
        }
    }
}

/// The HTTP/1.1 watchdog: resolves when a begun request head is not
/// complete within `header_read_timeout`, or when no request has been in
/// flight for `idle_timeout`.
async fn http1_quiet(
    mut requests: watch::Receiver<Requests>,
    heads: Arc<HeadSignal>,
    limits: Arc<ServerLimits>,
) -> Quiet {
    let mut began = heads.began.subscribe();
    // Requests started so far, as last seen here.
    let mut seen = 0;
    // Protocol detection read the first head's first bytes.
    let mut head_begun = true;
    loop {
        if head_begun {
            tokio::select! {
                open = started_after(&mut requests, seen) => if !open {
                    return std::future::pending().await;
                },
                () = tokio::time::sleep(limits.header_read_timeout) => return Quiet::StalledHead,
            }
        }
        match requests.wait_for(|r| r.open == 0).await.map(|r| r.started) {
            Ok(started) => seen = started,
            Err(_) => return std::future::pending().await,
        }
        began.borrow_and_update();
        heads.armed.store(true, Ordering::Release);
        tokio::select! {
            () = tokio::time::sleep(limits.idle_timeout) => return Quiet::Idle,
            changed = began.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
                head_begun = true;
            }
            // A pipelined head, read with the previous request.
            open = started_after(&mut requests, seen) => {
                if !open {
                    return std::future::pending().await;
                }
                heads.armed.store(false, Ordering::Release);
                head_begun = false;
            }
        }
    }
}

/// Waits until more than `seen` requests have started; false when the
/// connection is gone.
async fn started_after(requests: &mut watch::Receiver<Requests>, seen: u64) -> bool {
    requests.wait_for(|r| r.started > seen).await.is_ok()
}

/// Told by an HTTP/1.1 connection's reads when bytes arrive while the
/// watchdog waits for the next request head. Only the first read after
/// arming signals, so reads of bodies cost one atomic load.
struct HeadSignal {
    armed: AtomicBool,
    began: watch::Sender<()>,
}

impl HeadSignal {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            armed: AtomicBool::new(false),
            began: watch::Sender::new(()),
        })
    }

    fn bytes_arrived(&self) {
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::AcqRel) {
            self.began.send_replace(());
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
    /// Told when bytes arrive from the stream (HTTP/1.1 only).
    heads: Option<Arc<HeadSignal>>,
}

impl Replay {
    fn new(stream: TcpStream) -> Self {
        Self {
            head: [0; H2_PREFACE.len()],
            read: 0,
            len: 0,
            stream,
            heads: None,
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
        let filled = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Some(heads), Poll::Ready(Ok(()))) = (&this.heads, &read)
            && buf.filled().len() > filled
        {
            heads.bytes_arrived();
        }
        read
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

/// A connection's requests, for its watchdog.
#[derive(Clone, Copy, Debug, Default)]
struct Requests {
    /// Started since the connection opened.
    started: u64,
    /// In flight: from a request's arrival until its response body is done
    /// or dropped (for HTTP/2, the open streams).
    open: usize,
}

/// Counts a connection's requests into [`Requests`].
#[derive(Clone)]
struct CountRequests<S> {
    inner: S,
    requests: Arc<watch::Sender<Requests>>,
}

impl<S> Service<Request<Incoming>> for CountRequests<S>
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
        let stream = InFlight::new(&self.requests);
        Counted {
            inner: self.inner.call(req),
            stream: Some(stream),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response future holding its request in flight; the response body
    /// takes the hold over.
    struct Counted<F> {
        #[pin]
        inner: F,
        stream: Option<InFlight>,
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

/// One request in flight, counted while this lives.
struct InFlight(Arc<watch::Sender<Requests>>);

impl InFlight {
    fn new(requests: &Arc<watch::Sender<Requests>>) -> Self {
        requests.send_modify(|r| {
            r.started += 1;
            r.open += 1;
        });
        Self(requests.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|r| r.open -= 1);
    }
}

/// A response body that keeps its request counted until hyper drops it.
struct Held {
    body: Body,
    _stream: Option<InFlight>,
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
