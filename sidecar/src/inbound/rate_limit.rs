//! The inbound rate limit: a token bucket refilled at `perSecond`, holding
//! at most `max(burst, 1)` tokens. A request takes a token or is refused at
//! once with 429 and `Retry-After` (whole seconds until the next token,
//! at least 1).
//!
//! Not tower's `RateLimit`: that one counts fixed windows (`num` per
//! `per`, so up to twice the rate across a window edge, and no burst
//! setting) and makes callers *wait* in `poll_ready` rather than refusing
//! them, which turns overload into queueing.

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;
use trellis_policy::RateLimit as Spec;

use crate::{
    http::{Body, BoxError, response::ProxyError},
    metrics::Metrics,
};

/// One token, in the millionths the bucket counts in (exact arithmetic:
/// a rate of `r` per second adds exactly `r` millionths per microsecond).
pub(crate) const TOKEN: u64 = 1_000_000;

/// A token bucket.
#[derive(Debug)]
pub struct TokenBucket {
    /// Millionths of a token added per microsecond (= tokens per second).
    rate: u64,
    capacity: u64,
    state: Mutex<(u64, Instant)>,
}

impl TokenBucket {
    /// A full bucket for `spec`.
    pub fn new(spec: &Spec) -> Self {
        let capacity = u64::from(spec.burst.max(1)) * TOKEN;
        Self {
            rate: u64::from(spec.per_second.max(1)),
            capacity,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn try_take(&self) -> Result<(), Duration> {
        let mut s = self.state.lock().expect("bucket lock");
        take(&mut s, Instant::now(), self.rate, self.capacity)
    }
}

/// The bucket arithmetic, shared with the gateway's per-client buckets:
/// refills `state` (tokens in millionths, last update) to `now` at `rate`
/// tokens per second up to `capacity` millionths, then takes a token or
/// says how long until one is there.
pub(crate) fn take(
    state: &mut (u64, Instant),
    now: Instant,
    rate: u64,
    capacity: u64,
) -> Result<(), Duration> {
    let tokens = refilled(*state, now, rate, capacity);
    if tokens >= TOKEN {
        *state = (tokens - TOKEN, now);
        Ok(())
    } else {
        *state = (tokens, now);
        Err(Duration::from_micros((TOKEN - tokens).div_ceil(rate)))
    }
}

/// The tokens (millionths) of a bucket last at `state`, refilled to `now`.
pub(crate) fn refilled(state: (u64, Instant), now: Instant, rate: u64, capacity: u64) -> u64 {
    let (tokens, at) = state;
    let micros = u64::try_from(now.saturating_duration_since(at).as_micros()).unwrap_or(u64::MAX);
    tokens
        .saturating_add(micros.saturating_mul(rate))
        .min(capacity)
}

/// Refuses requests the bucket has no token for.
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    bucket: Option<Arc<TokenBucket>>,
    service: Arc<str>,
    metrics: Metrics,
}

impl<S> RateLimit<S> {
    /// Limits `inner` (the application of `service`) by `bucket`, if any.
    pub fn new(
        inner: S,
        bucket: Option<Arc<TokenBucket>>,
        service: Arc<str>,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner,
            bucket,
            service,
            metrics,
        }
    }
}

impl<S> Service<Request<Body>> for RateLimit<S>
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

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if let Some(bucket) = &self.bucket
            && let Err(wait) = bucket.try_take()
        {
            self.metrics.rate_limited(&self.service);
            let e = ProxyError::RateLimited {
                service: self.service.to_string(),
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            };
            return futures::future::ready(Err(e.into())).boxed();
        }
        self.inner.call(req).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_second: u32, burst: u32) -> TokenBucket {
        TokenBucket::new(&Spec { per_second, burst })
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_allows_the_burst_then_the_rate() {
        let b = bucket(10, 5);
        for _ in 0..5 {
            b.try_take().unwrap();
        }
        assert_eq!(b.try_take(), Err(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(b.try_take().is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        b.try_take().unwrap();
        // Over 10 s at the rate, exactly 100 more.
        let mut n = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if b.try_take().is_ok() {
                n += 1;
            }
        }
        assert_eq!(n, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_burst_still_lets_one_through_and_never_saves_more() {
        let b = bucket(2, 0);
        b.try_take().unwrap();
        assert!(b.try_take().is_err());
        tokio::time::advance(Duration::from_secs(60)).await;
        b.try_take().unwrap();
        assert_eq!(b.try_take(), Err(Duration::from_millis(500)));
    }
}
