//! Deadlines: the overall deadline of a call (retries and backoff included)
//! and the deadline of each try.
//!
//! The overall deadline ([`Overall`], outermost in the route) records the
//! instant it expires as a request extension, [`Deadline`]. The per-try deadline is `min(perTryTimeout,
//! what is left of the overall deadline)`, so the layers below the retry —
//! the breaker, and the endpoint's outlier detector — see a try that ran out
//! of either as a timeout *result* rather than as a future that was simply
//! dropped. That is also how the 504 body can say which deadline fired. The
//! try's deadline travels down as [`TryDeadline`] and is enforced at the
//! endpoint (where the outlier detector counts it against that endpoint)
//! and again here (which covers time spent waiting for the balancer).

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;

use crate::http::{
    Body, BoxError,
    grpc::{GRPC_TIMEOUT, parse_timeout},
    response::ProxyError,
};

/// When the overall deadline of a call passes.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    /// The instant.
    pub at: Instant,
    /// The configured timeout (for the error message).
    pub timeout: Duration,
}

/// When the current try must end, and which deadline that is.
#[derive(Clone, Debug)]
pub struct TryDeadline {
    /// The instant.
    pub at: Instant,
    /// The deadline that `at` comes from.
    pub per_try: bool,
    /// The configured duration of that deadline.
    pub timeout: Duration,
    /// The dependency.
    pub service: Arc<str>,
}

impl TryDeadline {
    /// The error of a try that ran out.
    pub fn error(&self) -> ProxyError {
        let service = self.service.to_string();
        if self.per_try {
            ProxyError::TryTimeout {
                service,
                timeout: self.timeout,
            }
        } else {
            ProxyError::Timeout {
                service,
                timeout: self.timeout,
            }
        }
    }
}

/// The overall deadline of a call: answers 504 ("overall timeout") when it
/// passes, and records it on the request as [`Deadline`] for the layers
/// below.
///
/// Not tower's `Timeout`: the per-try deadline below must be *the same
/// instant* when it is the overall one that is closer, so that the try
/// ends first, with a result the breaker and outlier detector count, rather
/// than being dropped by an outer timer a few microseconds earlier.
#[derive(Clone, Debug)]
pub struct Overall<S> {
    inner: S,
    timeout: Duration,
    service: Arc<str>,
}

impl<S> Overall<S> {
    /// Calls of `service` through `inner` get `timeout` in all.
    pub fn new(inner: S, timeout: Duration, service: Arc<str>) -> Self {
        Self {
            inner,
            timeout,
            service,
        }
    }
}

impl<S> Service<Request<Body>> for Overall<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // A gRPC client's own deadline bounds the call too: past it the
        // client has given up, and retries would be work for no one.
        let timeout = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| parse_timeout(v.as_bytes()))
            .map_or(self.timeout, |client| client.min(self.timeout));
        let at = Instant::now() + timeout;
        req.extensions_mut().insert(Deadline { at, timeout });
        let fut: BoxFuture<'static, Result<Response<Body>, BoxError>> =
            Box::pin(self.inner.call(req));
        let service = self.service.clone();
        async move {
            match tokio::time::timeout_at(at, fut).await {
                Ok(res) => res,
                Err(_) => Err(ProxyError::Timeout {
                    service: service.to_string(),
                    timeout,
                }
                .into()),
            }
        }
        .boxed()
    }
}

/// Bounds each try by `min(perTryTimeout, the overall deadline)`.
#[derive(Clone, Debug)]
pub struct TryTimeout<S> {
    inner: S,
    per_try: Option<Duration>,
    service: Arc<str>,
}

impl<S> TryTimeout<S> {
    /// Tries of calls to `service` through `inner` get `per_try` each.
    pub fn new(inner: S, per_try: Option<Duration>, service: Arc<str>) -> Self {
        Self {
            inner,
            per_try,
            service,
        }
    }
}

/// The deadline of a try starting now.
pub fn try_deadline(
    overall: Option<Deadline>,
    per_try: Option<Duration>,
    service: &Arc<str>,
) -> Option<TryDeadline> {
    let now = Instant::now();
    let per_try = per_try.map(|d| TryDeadline {
        at: now + d,
        per_try: true,
        timeout: d,
        service: service.clone(),
    });
    let overall = overall.map(|d| TryDeadline {
        at: d.at,
        per_try: false,
        timeout: d.timeout,
        service: service.clone(),
    });
    match (per_try, overall) {
        (Some(p), Some(o)) => Some(if p.at < o.at { p } else { o }),
        (p, o) => p.or(o),
    }
}

impl<S> Service<Request<Body>> for TryTimeout<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The balancer underneath is ready at once and waits for an
        // endpoint inside its call's future (see `crate::shared`), so that
        // wait is inside the try and counts against its deadline.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let deadline = try_deadline(
            req.extensions().get::<Deadline>().copied(),
            self.per_try,
            &self.service,
        );
        let Some(deadline) = deadline else {
            return Box::pin(self.inner.call(req));
        };
        req.extensions_mut().insert(deadline.clone());
        tokio::time::timeout_at(deadline.at, self.inner.call(req))
            .map(move |res| res.unwrap_or_else(|_| Err(deadline.error().into())))
            .boxed()
    }
}
