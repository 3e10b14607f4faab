//! Retries: tower's [`Retry`](tower::retry::Retry) with a [`Policy`] that
//! decides what is retried, how long to wait, and whether the budget allows
//! it; and [`Replayable`](super::replay::Replayable), which makes a request retryable in the first
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
//!   forwarded as it comes and copied on the way ([`Replay::Tee`](super::replay::Replay::Tee)), and a
//!   retry is possible when the first try read it to its end within
//!   `maxReplayBytes`. Any other body of unknown length — chunked, a stream
//!   — is forwarded as it comes and never retried, since waiting to buffer
//!   it could stall a streaming call;
//! - the try failed in a way `retryOn` names: `connect-failure` (no
//!   connection, or the connection broke before a response), `5xx` (a status
//!   in `statuses`), `429`, or `timeout` (the per-try timeout); or, for a
//!   gRPC call, its `grpc-status` is one of `grpcCodes` — read from a
//!   trailers-only response, or from trailers that arrive with the first
//!   message ([`PeekTrailers`](super::peek_trailers::PeekTrailers));
//! - fewer than `attempts` tries were made, the wait fits in what is left
//!   of the overall deadline, and the budget has a retry to give.
//!
//! The wait is the backoff for that retry, or the 429's `Retry-After` if
//! longer. A refused retry returns the last try's answer as it was. Each
//! retry goes back through the breaker and the balancer, so it may land on
//! another endpoint.

use std::{sync::Arc, time::Duration};

use futures::future::{BoxFuture, FutureExt};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, header};
use tokio::time::Instant;
use tower::retry::{Policy, budget::Budget};
use trellis_policy::{GrpcCode, Retry as RetryPolicySpec, RetryOn};

use super::{
    backoff::Backoff, budget::RetryBudget, is_timeout, peek_trailers::PeekedStatus, replay::Replay,
    timeout::Deadline,
};
use crate::{
    client::ClientError,
    http::{Body, BoxError, grpc::Outcome, response::ProxyError},
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
    use crate::http::full;

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
