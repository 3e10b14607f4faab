//! Retries: tower's [`Retry`](tower::retry::Retry) with a [`Policy`] that
//! decides what is retried, how long to wait, and whether the budget allows
//! it; and [`Replayable`], which makes a request retryable in the first
//! place by buffering its body.
//!
//! A request is retried only when all of these hold:
//!
//! - its method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE), it
//!   is a gRPC call, or it carries `x-trellis-retryable: true` (removed
//!   before forwarding);
//! - its body is empty or has a declared length of at most `maxReplayBytes`
//!   (it is then read whole before the first try, so it can be sent again);
//!   or it is a gRPC call, whose body never declares a length: its body is
//!   forwarded as it comes and copied on the way ([`Replay::Tee`]), and a
//!   retry is possible when the first try read it to its end within
//!   `maxReplayBytes`. Any other body of unknown length — chunked, a stream
//!   — is forwarded as it comes and never retried, since waiting to buffer
//!   it could stall a streaming call;
//! - the try failed in a way `retryOn` names: `connect-failure` (no
//!   connection, or the connection broke before a response), `5xx` (a status
//!   in `statuses`), `429`, or `timeout` (the per-try timeout); or, for a
//!   gRPC call, its `grpc-status` is one of `grpcCodes` — read from a
//!   trailers-only response, or from trailers that arrive with the first
//!   message ([`PeekTrailers`]);
//! - fewer than `attempts` tries were made, the wait fits in what is left
//!   of the overall deadline, and the budget has a retry to give.
//!
//! The wait is the backoff for that retry, or the 429's `Retry-After` if
//! longer. A refused retry returns the last try's answer as it was. Each
//! retry goes back through the breaker and the balancer, so it may land on
//! another endpoint.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame};
use tokio::time::Instant;
use tower::{
    Service, ServiceExt,
    retry::{Policy, budget::Budget},
};
use trellis_policy::{GrpcCode, Retry as RetryPolicySpec, RetryOn};

use super::{backoff::Backoff, budget::RetryBudget, is_timeout, timeout::Deadline};
use crate::{
    client::ClientError,
    http::{
        Body, BoxError, boxed, full,
        grpc::{Outcome, is_grpc, status_code},
        is_empty_data,
        response::ProxyError,
    },
    metrics::Metrics,
};

/// Marks a request as safe to retry whatever its method.
pub const X_RETRYABLE: HeaderName = HeaderName::from_static("x-trellis-retryable");

/// The retry settings of one dependency.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// What is retried.
    pub on: Vec<RetryOn>,
    /// The statuses `5xx` covers.
    pub statuses: Vec<u16>,
    /// The wait between tries.
    pub backoff: Backoff,
    /// The largest body kept for replay.
    pub max_replay_bytes: u64,
    /// The gRPC status codes retried.
    pub grpc_codes: Vec<GrpcCode>,
}

impl From<&RetryPolicySpec> for Settings {
    fn from(r: &RetryPolicySpec) -> Self {
        Self {
            attempts: r.attempts.max(1),
            on: r.on.clone(),
            statuses: r.statuses.clone(),
            backoff: Backoff::from(&r.backoff),
            max_replay_bytes: u64::from(r.max_replay_bytes),
            grpc_codes: r.grpc_codes.clone(),
        }
    }
}

/// A request body kept for replay: a request extension set by [`Replayable`].
#[derive(Clone, Debug)]
pub enum Replay {
    /// The whole body, read before the first try.
    Whole {
        /// The body's bytes.
        data: Bytes,
        /// Its trailers, if it had any.
        trailers: Option<HeaderMap>,
    },
    /// A copy of the body taken while the first try sends it.
    Tee(Arc<Mutex<Capture>>),
}

impl Replay {
    /// The body again. tower's `Retry` asks for the copy before the first
    /// try starts, when a [`Replay::Tee`] holds nothing yet, so that body
    /// reads the capture when it is first polled: by then the try it would
    /// replace has ended, and [`Replay::is_whole`] allowed the retry.
    fn body(&self) -> Body {
        match self {
            Self::Whole { data, trailers } => replay_body(vec![data.clone()], trailers),
            Self::Tee(capture) => boxed(Deferred {
                capture: capture.clone(),
                body: None,
            }),
        }
    }

    /// Whether the whole body is here to be sent again.
    fn is_whole(&self) -> bool {
        match self {
            Self::Whole { .. } => true,
            Self::Tee(capture) => {
                let c = capture.lock().expect("capture lock");
                c.complete && !c.lost
            }
        }
    }
}

/// A replay of a [`Capture`], made when first polled.
struct Deferred {
    capture: Arc<Mutex<Capture>>,
    body: Option<Body>,
}

impl hyper::body::Body for Deferred {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.body.is_none() {
            let c = self.capture.lock().expect("capture lock");
            if !c.complete || c.lost {
                drop(c);
                return Poll::Ready(Some(Err("the request body was not kept whole".into())));
            }
            let body = replay_body(c.data.clone(), &c.trailers);
            drop(c);
            self.body = Some(body);
        }
        let body = self.body.as_mut().expect("made above");
        std::pin::Pin::new(body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => {
                let c = self.capture.lock().expect("capture lock");
                let mut hint = hyper::body::SizeHint::new();
                hint.set_lower(c.len);
                hint
            }
        }
    }
}

fn replay_body(data: Vec<Bytes>, trailers: &Option<HeaderMap>) -> Body {
    if trailers.is_none() && data.len() <= 1 {
        return full(data.into_iter().next().unwrap_or_default());
    }
    let frames = data
        .into_iter()
        .map(|d| Ok::<_, BoxError>(Frame::data(d)))
        .chain(trailers.clone().map(|t| Ok(Frame::trailers(t))));
    boxed(http_body_util::StreamBody::new(futures::stream::iter(
        frames.collect::<Vec<_>>(),
    )))
}

/// What a [`Tee`] has copied of a body so far.
#[derive(Debug, Default)]
pub struct Capture {
    data: Vec<Bytes>,
    len: u64,
    trailers: Option<HeaderMap>,
    /// The body ended and every frame of it is here.
    complete: bool,
    /// The body outgrew the limit or failed: it cannot be replayed.
    lost: bool,
}

pin_project_lite::pin_project! {
    /// A request body that copies its frames into a [`Capture`] as they are
    /// sent, up to a limit. The copies share the frames' buffers.
    pub struct Tee {
        #[pin]
        inner: Body,
        capture: Arc<Mutex<Capture>>,
        limit: u64,
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
            if is_empty_data(&frame) {
                continue;
            }
            let mut c = this.capture.lock().expect("capture lock");
            if !c.lost {
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            c.len += d.len() as u64;
                            if c.len > *this.limit {
                                c.lost = true;
                                c.data = Vec::new();
                            } else {
                                c.data.push(d.clone());
                            }
                        } else if let Some(t) = f.trailers_ref() {
                            c.trailers = Some(t.clone());
                        }
                        // The body says no frame follows: the copy is whole
                        // now, so this frame can go out as the last one.
                        if !c.lost && this.inner.is_end_stream() {
                            c.complete = true;
                        }
                    }
                    Some(Err(_)) => c.lost = true,
                    None => c.complete = true,
                }
            }
            return Poll::Ready(frame);
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not ended before the end has been seen, so the copy knows it is whole.
        let c = self.capture.lock().expect("capture lock");
        (c.complete || c.lost) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn idempotent(m: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(m)
}

/// Buffers the body of a retryable request so the retry policy can clone it.
#[derive(Clone, Debug)]
pub struct Replayable<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> Replayable<S> {
    /// Wraps the retrying service `inner`.
    pub fn new(inner: S, settings: Arc<Settings>) -> Self {
        Self { inner, settings }
    }
}

impl<S> Service<Request<Body>> for Replayable<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let marked = req
            .headers_mut()
            .remove(X_RETRYABLE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let inner = self.inner.clone();
        let grpc = is_grpc(req.headers());
        let eligible = self.settings.attempts > 1 && (marked || grpc || idempotent(req.method()));
        if !eligible {
            return inner.oneshot(req).boxed();
        }
        if req.body().is_end_stream() {
            req.extensions_mut().insert(Replay::Whole {
                data: Bytes::new(),
                trailers: None,
            });
            return inner.oneshot(req).boxed();
        }
        let limit = self.settings.max_replay_bytes;
        let exact = req.body().size_hint().exact();
        if exact.is_none() && grpc {
            // Copy the body as the first try sends it: waiting for the
            // whole body first would stall a client-streaming call.
            let capture = Arc::new(Mutex::new(Capture::default()));
            req.extensions_mut().insert(Replay::Tee(capture.clone()));
            let req = req.map(|inner| {
                boxed(Tee {
                    inner,
                    capture,
                    limit,
                })
            });
            return inner.oneshot(req).boxed();
        }
        if exact.is_none_or(|n| n > limit) {
            return inner.oneshot(req).boxed();
        }
        async move {
            let (mut parts, body) = req.into_parts();
            let collected = body.collect().await.map_err(|e| {
                ProxyError::BadRequest(format!("the request body could not be read: {e}"))
            })?;
            let replay = Replay::Whole {
                trailers: collected.trailers().cloned(),
                data: collected.to_bytes(),
            };
            let body = replay.body();
            parts.extensions.insert(replay);
            let call: BoxFuture<'static, Result<Response<Body>, BoxError>> =
                Box::pin(inner.oneshot(Request::from_parts(parts, body)));
            call.await
        }
        .boxed()
    }
}

/// The gRPC status a [`PeekTrailers`] found in trailers that came with the
/// first message: a response extension the retry policy reads.
#[derive(Clone, Copy, Debug)]
pub struct PeekedStatus(pub GrpcCode);

/// Lets the retry policy see a gRPC status that comes in trailers rather
/// than in a trailers-only response, for calls it could retry.
///
/// It waits for the response's first frame, then takes the next one only
/// if it is already there: a unary call's message and trailers arrive
/// together, while a stream's next message may be long in coming, and
/// waiting for it would hold the stream up. A status that comes later is
/// not retried (the breaker and metrics still count it). Peeked frames are
/// put back in front of the body.
#[derive(Clone, Debug)]
pub struct PeekTrailers<S> {
    inner: S,
}

impl<S> PeekTrailers<S> {
    /// Peeks at the responses of `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Service<Request<Body>> for PeekTrailers<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let retryable = req.extensions().get::<Replay>().is_some() && is_grpc(req.headers());
        // Boxed and named: the 'static future spelled out avoids a rustc
        // limitation with boxed-error lifetimes inside async blocks.
        let call: BoxFuture<'static, Result<Response<Body>, BoxError>> =
            Box::pin(self.inner.call(req));
        if !retryable {
            return call;
        }
        async move {
            let rsp = call.await?;
            if Outcome::of(&rsp) != Outcome::InTrailers {
                return Ok(rsp);
            }
            Ok(peek(rsp).await)
        }
        .boxed()
    }
}

fn peek(rsp: Response<Body>) -> BoxFuture<'static, Response<Body>> {
    async move { peek_frames(rsp).await }.boxed()
}

async fn peek_frames(rsp: Response<Body>) -> Response<Body> {
    let (mut parts, mut body) = rsp.into_parts();
    let mut frames = VecDeque::new();
    let mut status = None;
    let first = body.frame().await;
    let ended = first.is_none();
    if let Some(first) = first {
        let is_data = matches!(&first, Ok(f) if f.is_data());
        frames.push_back(first);
        if is_data && let Some(Some(next)) = body.frame().now_or_never() {
            frames.push_back(next);
        }
    }
    for f in frames.iter().flatten() {
        if let Some(t) = f.trailers_ref() {
            status = Some(status_code(t).unwrap_or(GrpcCode::Unknown));
        }
    }
    if let Some(code) = status {
        parts.extensions.insert(PeekedStatus(code));
    }
    let rest = (!ended && status.is_none()).then_some(body);
    Response::from_parts(parts, boxed(Prefixed { frames, rest }))
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: VecDeque<Result<Frame<Bytes>, BoxError>>,
    rest: Option<Body>,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(f));
        }
        match &mut self.rest {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// The retry policy of one dependency; one clone per call keeps its count of tries.
#[derive(Clone)]
pub struct RetryPolicy {
    settings: Arc<Settings>,
    budget: Arc<RetryBudget>,
    metrics: Metrics,
    service: Arc<str>,
    tries: u32,
}

impl RetryPolicy {
    /// The policy for `service`.
    pub fn new(
        settings: Arc<Settings>,
        budget: Arc<RetryBudget>,
        metrics: Metrics,
        service: Arc<str>,
    ) -> Self {
        Self {
            settings,
            budget,
            metrics,
            service,
            tries: 0,
        }
    }
}

/// `Retry-After` as a wait: delay-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Why a try's result may be retried, and the least wait it asks for.
fn retry_reason(
    s: &Settings,
    result: &Result<Response<Body>, BoxError>,
) -> Option<(&'static str, Duration)> {
    let on = |k| s.on.contains(&k);
    let grpc_code = |rsp: &Response<Body>| match Outcome::of(rsp) {
        Outcome::Grpc(code) => Some(code),
        Outcome::InTrailers => rsp.extensions().get::<PeekedStatus>().map(|p| p.0),
        Outcome::Http => None,
    };
    match result {
        Ok(rsp) if let Some(code) = grpc_code(rsp) => s
            .grpc_codes
            .contains(&code)
            .then_some(("grpc", Duration::ZERO)),
        Ok(rsp) if rsp.status() == StatusCode::TOO_MANY_REQUESTS => on(RetryOn::TooManyRequests)
            .then(|| ("429", retry_after(rsp.headers()).unwrap_or_default())),
        Ok(rsp) => (on(RetryOn::ServerError) && s.statuses.contains(&rsp.status().as_u16()))
            .then_some(("5xx", Duration::ZERO)),
        Err(e) => match super::find::<ProxyError>(e.as_ref()) {
            Some(ProxyError::TryTimeout { .. }) => {
                on(RetryOn::Timeout).then_some(("timeout", Duration::ZERO))
            }
            // The overall deadline passed, or the breaker refused: final.
            Some(_) => None,
            None if is_timeout(e.as_ref()) => None,
            None => (on(RetryOn::ConnectFailure)
                && super::find::<ClientError>(e.as_ref()).is_some())
            .then_some(("connect-failure", Duration::ZERO)),
        },
    }
}

impl Policy<Request<Body>, Response<Body>, BoxError> for RetryPolicy {
    type Future = BoxFuture<'static, ()>;

    fn retry(
        &mut self,
        req: &mut Request<Body>,
        result: &mut Result<Response<Body>, BoxError>,
    ) -> Option<Self::Future> {
        self.tries += 1;
        if self.tries >= self.settings.attempts {
            return None;
        }
        let (reason, at_least) = retry_reason(&self.settings, result)?;
        if !req
            .extensions()
            .get::<Replay>()
            .is_some_and(Replay::is_whole)
        {
            tracing::debug!(service = %self.service, "no retry: the request body was not kept whole");
            return None;
        }
        let wait = self
            .settings
            .backoff
            .delay(self.tries, &mut rand::rng())
            .max(at_least);
        // `Retry-After` is the upstream's to choose, up to `u64::MAX`
        // seconds: a wait no clock can hold is as final as one past the
        // deadline.
        let Some(resume) = Instant::now().checked_add(wait) else {
            tracing::debug!(service = %self.service, ?wait, "no retry: the wait is beyond any deadline");
            return None;
        };
        if let Some(d) = req.extensions().get::<Deadline>()
            && resume >= d.at
        {
            tracing::debug!(service = %self.service, ?wait, "no retry: the wait would pass the deadline");
            return None;
        }
        if !self.budget.withdraw() {
            self.metrics.budget_exhausted(&self.service);
            tracing::debug!(service = %self.service, "no retry: budget exhausted");
            return None;
        }
        self.metrics.retry(&self.service, reason);
        tracing::debug!(service = %self.service, reason, try_ = self.tries + 1, ?wait, "retrying");
        Some(tokio::time::sleep(wait).boxed())
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        if self.tries == 0 {
            // Called once per original request, before its first try: the
            // deposit that retries are a share of.
            self.budget.deposit();
        }
        let replay = req.extensions().get::<Replay>()?;
        let mut clone = Request::new(replay.body());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(110) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    /// A `Retry-After` no deadline can hold (here `u64::MAX` seconds) is a
    /// refusal to retry, not an `Instant` overflow that panics the task.
    #[tokio::test(start_paused = true)]
    async fn a_hostile_retry_after_is_no_retry_and_no_panic() {
        let mut policy = RetryPolicy::new(
            Arc::new(settings()),
            Arc::new(RetryBudget::new(0.2, 10)),
            Metrics::default(),
            "user.shop".into(),
        );
        for deadline in [true, false] {
            let mut req = Request::new(full(""));
            if deadline {
                req.extensions_mut().insert(Deadline {
                    at: Instant::now() + Duration::from_secs(2),
                    timeout: Duration::from_secs(2),
                });
            }
            let mut rsp = Response::new(full(""));
            *rsp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            rsp.headers_mut()
                .insert(header::RETRY_AFTER, u64::MAX.to_string().parse().unwrap());
            let mut result = Ok(rsp);
            policy.tries = 0;
            assert!(
                policy.retry(&mut req, &mut result).is_none(),
                "deadline: {deadline}"
            );
        }
    }

    fn settings() -> Settings {
        Settings::from(&RetryPolicySpec::default())
    }

    fn status(code: u16) -> Result<Response<Body>, BoxError> {
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        Ok(r)
    }

    #[test]
    fn classifies_what_the_defaults_retry() {
        let s = settings();
        assert_eq!(retry_reason(&s, &status(503)).unwrap().0, "5xx");
        assert_eq!(retry_reason(&s, &status(502)).unwrap().0, "5xx");
        assert!(
            retry_reason(&s, &status(500)).is_none(),
            "500 is not in the default statuses"
        );
        assert!(retry_reason(&s, &status(200)).is_none());
        assert!(retry_reason(&s, &status(404)).is_none());
        let mut r = status(429).unwrap();
        r.headers_mut()
            .insert(header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(
            retry_reason(&s, &Ok(r)),
            Some(("429", Duration::from_secs(2)))
        );
        let connect: BoxError = ClientError::Connect {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: "refused".into(),
        }
        .into();
        assert_eq!(
            retry_reason(&s, &Err(connect)).unwrap().0,
            "connect-failure"
        );
        let try_timeout: BoxError = ProxyError::TryTimeout {
            service: "a".into(),
            timeout: Duration::from_millis(1),
        }
        .into();
        assert!(
            retry_reason(&s, &Err(try_timeout)).is_none(),
            "timeout is not retried by default"
        );
        let open: BoxError = ProxyError::CircuitOpen {
            service: "a".into(),
            state: "open",
        }
        .into();
        assert!(retry_reason(&s, &Err(open)).is_none());
    }
}
