//! The watchdog beside each connection: it counts the connection's
//! requests and closes the connection when its client goes quiet (an
//! HTTP/1.1 head begun and not finished in time, or no request in flight
//! for the idle timeout).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;
use tower::Service;

use super::ServerLimits;
use crate::http::{Body, BoxError, boxed};

/// Why a connection's client is considered gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Quiet {
    /// No request in flight for the idle timeout: closed gracefully.
    Idle,
    /// An HTTP/1.1 request head begun and not finished in time: closed at
    /// once, since there is no request to finish.
    StalledHead,
}

/// Drives `conn` to its end, shutting it down gracefully when the drain
/// starts or the client goes idle, and dropping it when a head stalls.
pub(super) async fn until_drained<C>(
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
pub(super) async fn idle_for(mut requests: watch::Receiver<Requests>, timeout: Duration) -> Quiet {
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
pub(super) async fn http1_quiet(
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
pub(super) struct HeadSignal {
    armed: AtomicBool,
    began: watch::Sender<()>,
}

impl HeadSignal {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            armed: AtomicBool::new(false),
            began: watch::Sender::new(()),
        })
    }

    pub(super) fn bytes_arrived(&self) {
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::AcqRel) {
            self.began.send_replace(());
        }
    }
}

/// A connection's requests, for its watchdog.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Requests {
    /// Started since the connection opened.
    started: u64,
    /// In flight: from a request's arrival until its response body is done
    /// or dropped (for HTTP/2, the open streams).
    open: usize,
}

/// Counts a connection's requests into [`Requests`].
#[derive(Clone)]
pub(super) struct CountRequests<S> {
    pub(super) inner: S,
    pub(super) requests: Arc<watch::Sender<Requests>>,
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
    pub(super) struct Counted<F> {
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
