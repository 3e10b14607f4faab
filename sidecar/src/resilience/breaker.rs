//! A circuit breaker per dependency, with sony/gobreaker's semantics exactly.
//!
//! Written here rather than taken from a crate: tower has no breaker, and
//! the point is to keep gobreaker's behaviour, which the design names and
//! which is small enough to restate precisely (gobreaker v1
//! `TwoStepCircuitBreaker`):
//!
//! - **closed**: every call is let through and counted. The counts belong
//!   to a *generation*; when `interval` has passed since the generation
//!   began, the counts are cleared (a new generation). After a failure the
//!   breaker trips (→ open) when `ReadyToTrip(counts)` holds:
//!   `consecutiveFailures > threshold` (so a threshold of 5 trips on the 6th
//!   failure in a row, as gobreaker's default `ConsecutiveFailures > 5`), or
//!   `requests >= minRequests && failures / requests > failureRatio`.
//!   `requests` counts calls let through, finished or not, as gobreaker's
//!   `Counts.Requests` does.
//! - **open**: every call fails fast (503 naming the dependency) until
//!   `openFor` has passed; then the next look at the state makes it
//!   half-open.
//! - **half-open**: at most `halfOpenRequests` calls are let through (more
//!   are refused as if open); a failure reopens at once, and
//!   `halfOpenRequests` consecutive successes close.
//!
//! A result that arrives after the generation changed is ignored, as in
//! gobreaker. One difference gobreaker cannot have: a call abandoned before
//! it finished (its caller went away, or the overall deadline dropped it)
//! gives its slot back instead of counting, since otherwise a half-open
//! breaker whose probes were all abandoned would refuse forever.
//!
//! Time is tokio's [`Instant`], so tests drive it with paused time.

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt};
use tokio::time::{Duration, Instant};
use tower::ServiceExt;
use trellis_policy::{CircuitBreaker, FailureKind};

use crate::{
    http::{Body, BoxError, response::ProxyError},
    metrics::Metrics,
};

/// The three states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Calls flow and are counted.
    Closed,
    /// Calls fail fast.
    Open,
    /// A few probe calls decide between closed and open.
    HalfOpen,
}

impl State {
    /// The name used in logs, metrics and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// gobreaker's `Counts`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Calls let through in this generation.
    pub requests: u32,
    /// Successes in this generation.
    pub total_successes: u32,
    /// Failures in this generation.
    pub total_failures: u32,
    /// Successes in a row.
    pub consecutive_successes: u32,
    /// Failures in a row.
    pub consecutive_failures: u32,
}

impl Counts {
    fn on_success(&mut self) {
        self.total_successes += 1;
        self.consecutive_successes += 1;
        self.consecutive_failures = 0;
    }

    fn on_failure(&mut self) {
        self.total_failures += 1;
        self.consecutive_failures += 1;
        self.consecutive_successes = 0;
    }
}

/// The settings of one breaker, from the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Trip when consecutive failures exceed this.
    pub consecutive_failures: u32,
    /// Trip when the failure ratio exceeds this (with at least `min_requests`).
    pub failure_ratio: f64,
    /// Requests in the window before the ratio counts.
    pub min_requests: u32,
    /// The closed state's counting window.
    pub interval: Duration,
    /// How long the breaker stays open.
    pub open_for: Duration,
    /// Probes let through while half-open; this many successes close.
    pub half_open_requests: u32,
    /// What counts as a failure.
    pub failure_on: Vec<FailureKind>,
}

impl From<&CircuitBreaker> for Settings {
    fn from(c: &CircuitBreaker) -> Self {
        Self {
            consecutive_failures: c.consecutive_failures,
            failure_ratio: c.failure_ratio,
            min_requests: c.min_requests,
            interval: c.interval.get(),
            open_for: c.open_for.get(),
            half_open_requests: c.half_open_requests.max(1),
            failure_on: c.failure_on.clone(),
        }
    }
}

impl Settings {
    /// gobreaker's `ReadyToTrip`, from the policy's two conditions.
    fn ready_to_trip(&self, c: &Counts) -> bool {
        c.consecutive_failures > self.consecutive_failures
            || (c.requests >= self.min_requests
                && f64::from(c.total_failures) / f64::from(c.requests) > self.failure_ratio)
    }
}

struct Machine {
    state: State,
    generation: u64,
    counts: Counts,
    /// When the current generation ends (closed: the window; open: openFor).
    expiry: Option<Instant>,
}

/// Why a call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(pub State);

/// A circuit breaker. Shared (`Arc`) by every stack built for one dependency.
pub struct Breaker {
    service: Arc<str>,
    settings: Settings,
    machine: Mutex<Machine>,
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("service", &self.service)
            .field("state", &self.state())
            .finish()
    }
}

/// A call let through: report its outcome with [`Ticket::success`] or
/// [`Ticket::failure`]; dropping it unreported gives the slot back.
#[derive(Debug)]
pub struct Ticket {
    breaker: Arc<Breaker>,
    generation: u64,
    done: bool,
}

impl Ticket {
    /// The call succeeded.
    pub fn success(mut self) {
        self.done = true;
        self.breaker.after(self.generation, true);
    }

    /// The call failed.
    pub fn failure(mut self) {
        self.done = true;
        self.breaker.after(self.generation, false);
    }

    /// Reports `success` or failure.
    pub fn record(self, success: bool) {
        if success {
            self.success();
        } else {
            self.failure();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.cancel(self.generation);
        }
    }
}

impl Breaker {
    /// A closed breaker for `service`.
    pub fn new(service: impl Into<Arc<str>>, settings: Settings, metrics: Option<Metrics>) -> Self {
        let service = service.into();
        if let Some(m) = &metrics {
            m.set_breaker_state(&service, State::Closed.as_str());
        }
        Self {
            service,
            machine: Mutex::new(Machine {
                state: State::Closed,
                generation: 0,
                counts: Counts::default(),
                expiry: Some(Instant::now() + settings.interval),
            }),
            settings,
            metrics,
        }
    }

    /// The settings in force.
    #[cfg(test)]
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Asks to make a call: a ticket, or the state that refuses it.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Ticket, Refused> {
        let mut m = self.machine.lock().expect("breaker lock");
        let now = Instant::now();
        let state = self.current(&mut m, now);
        match state {
            State::Open => return Err(Refused(State::Open)),
            State::HalfOpen if m.counts.requests >= self.settings.half_open_requests => {
                return Err(Refused(State::HalfOpen));
            }
            _ => {}
        }
        m.counts.requests += 1;
        Ok(Ticket {
            breaker: self.clone(),
            generation: m.generation,
            done: false,
        })
    }

    /// The state now (an expired window or open period is acted on first).
    pub fn state(&self) -> State {
        let mut m = self.machine.lock().expect("breaker lock");
        self.current(&mut m, Instant::now())
    }

    /// The state and counts now.
    pub fn snapshot(&self) -> (State, Counts) {
        let mut m = self.machine.lock().expect("breaker lock");
        let s = self.current(&mut m, Instant::now());
        (s, m.counts)
    }

    /// Whether an outcome of `kind` counts as a failure.
    pub fn counts_as_failure(&self, kind: FailureKind) -> bool {
        self.settings.failure_on.contains(&kind)
    }

    fn after(&self, generation: u64, success: bool) {
        let mut m = self.machine.lock().expect("breaker lock");
        let now = Instant::now();
        let state = self.current(&mut m, now);
        if m.generation != generation {
            return;
        }
        if success {
            m.counts.on_success();
            if state == State::HalfOpen
                && m.counts.consecutive_successes >= self.settings.half_open_requests
            {
                self.set_state(&mut m, State::Closed, now);
            }
        } else {
            match state {
                State::Closed => {
                    m.counts.on_failure();
                    if self.settings.ready_to_trip(&m.counts) {
                        self.set_state(&mut m, State::Open, now);
                    }
                }
                State::HalfOpen => self.set_state(&mut m, State::Open, now),
                State::Open => {}
            }
        }
    }

    fn cancel(&self, generation: u64) {
        let mut m = self.machine.lock().expect("breaker lock");
        let _ = self.current(&mut m, Instant::now());
        if m.generation == generation {
            m.counts.requests = m.counts.requests.saturating_sub(1);
        }
    }

    /// gobreaker's `currentState`: acts on an expired generation.
    fn current(&self, m: &mut Machine, now: Instant) -> State {
        match (m.state, m.expiry) {
            (State::Closed, Some(e)) if e <= now => self.new_generation(m, now),
            (State::Open, Some(e)) if e <= now => self.set_state(m, State::HalfOpen, now),
            _ => {}
        }
        m.state
    }

    fn set_state(&self, m: &mut Machine, to: State, now: Instant) {
        if m.state == to {
            return;
        }
        let from = m.state;
        m.state = to;
        self.new_generation(m, now);
        tracing::warn!(
            service = %self.service,
            from = from.as_str(),
            to = to.as_str(),
            "circuit breaker state changed"
        );
        if let Some(metrics) = &self.metrics {
            metrics.breaker_transition(&self.service, from.as_str(), to.as_str());
        }
    }

    fn new_generation(&self, m: &mut Machine, now: Instant) {
        m.generation += 1;
        m.counts = Counts::default();
        m.expiry = match m.state {
            State::Closed => Some(now + self.settings.interval),
            State::Open => Some(now + self.settings.open_for),
            State::HalfOpen => None,
        };
    }
}

/// The breaker as a tower service over one dependency's tries.
#[derive(Clone, Debug)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> BreakerService<S> {
    /// Guards `inner` with `breaker`.
    pub fn new(inner: S, breaker: Arc<Breaker>) -> Self {
        Self { inner, breaker }
    }
}

impl<S> tower::Service<http::Request<Body>> for BreakerService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // An open breaker answers at once, so readiness of what is below is
        // awaited only by calls it lets through.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let ticket = match self.breaker.try_acquire() {
            Ok(t) => t,
            Err(Refused(state)) => {
                let e = ProxyError::CircuitOpen {
                    service: self.breaker.service.to_string(),
                    state: state.as_str(),
                };
                return futures::future::ready(Err(e.into())).boxed();
            }
        };
        let breaker = self.breaker.clone();
        // Boxed and named: the 'static future spelled out avoids a rustc
        // limitation with boxed-error lifetimes inside async blocks.
        let call: BoxFuture<'static, Result<http::Response<Body>, BoxError>> =
            Box::pin(self.inner.clone().oneshot(req));
        async move {
            super::on_outcome(call.await, move |kind| {
                ticket.record(!kind.is_some_and(|k| breaker.counts_as_failure(k)));
            })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            consecutive_failures: 5,
            failure_ratio: 0.6,
            min_requests: 10,
            interval: Duration::from_secs(10),
            open_for: Duration::from_secs(30),
            half_open_requests: 3,
            failure_on: vec![FailureKind::ServerError],
        }
    }

    fn breaker(s: Settings) -> Arc<Breaker> {
        Arc::new(Breaker::new("user.shop", s, Some(Metrics::default())))
    }

    fn call(b: &Arc<Breaker>, ok: bool) -> Result<(), Refused> {
        b.try_acquire().map(|t| t.record(ok))
    }

    fn trip(b: &Arc<Breaker>) {
        for _ in 0..=b.settings().consecutive_failures {
            call(b, false).unwrap();
        }
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_the_threshold_does_not_trip_one_more_does() {
        let b = breaker(settings());
        for _ in 0..5 {
            call(&b, false).unwrap();
        }
        assert_eq!(
            b.state(),
            State::Closed,
            "5 failures in a row do not trip at 5"
        );
        assert_eq!(b.snapshot().1.consecutive_failures, 5);
        call(&b, false).unwrap();
        assert_eq!(b.state(), State::Open, "the 6th does");
        assert_eq!(call(&b, true), Err(Refused(State::Open)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let b = breaker(Settings {
            min_requests: 1000,
            ..settings()
        });
        for _ in 0..3 {
            for _ in 0..5 {
                call(&b, false).unwrap();
            }
            call(&b, true).unwrap();
        }
        assert_eq!(b.state(), State::Closed);
        let (_, c) = b.snapshot();
        assert_eq!(
            (c.requests, c.total_failures, c.total_successes),
            (18, 15, 3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_trips_only_above_the_ratio_and_with_min_requests() {
        // consecutive threshold out of the way: alternate so no run exceeds it.
        let b = breaker(Settings {
            consecutive_failures: 100,
            failure_ratio: 0.5,
            min_requests: 10,
            ..settings()
        });
        // 9 requests, 6 failures (ratio 0.67): too few requests.
        for ok in [false, false, true, false, false, true, false, false, true] {
            call(&b, ok).unwrap();
        }
        assert_eq!(b.state(), State::Closed);
        // The 10th a success: 6/10 = 0.6 > 0.5, but only a failure is checked.
        call(&b, true).unwrap();
        assert_eq!(b.state(), State::Closed);
        // 7/11 > 0.5 after a failure: trips.
        call(&b, false).unwrap();
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_equal_to_the_threshold_does_not_trip() {
        let b = breaker(Settings {
            consecutive_failures: 100,
            failure_ratio: 0.5,
            min_requests: 4,
            ..settings()
        });
        for ok in [true, false, true, false] {
            call(&b, ok).unwrap();
        }
        // 2/4 = 0.5 is not above 0.5.
        assert_eq!(b.state(), State::Closed);
        call(&b, false).unwrap(); // 3/5 = 0.6
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_closed_window_clears_counts_when_interval_ends() {
        let b = breaker(settings());
        for _ in 0..5 {
            call(&b, false).unwrap();
        }
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(
            b.snapshot().1.consecutive_failures,
            5,
            "still in the window"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.snapshot().1, Counts::default(), "a new window");
        call(&b, false).unwrap();
        assert_eq!(b.state(), State::Closed, "the old failures no longer count");
    }

    #[tokio::test(start_paused = true)]
    async fn open_lasts_open_for_then_half_open() {
        let b = breaker(settings());
        trip(&b);
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert_eq!(call(&b, true), Err(Refused(State::Open)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_half_open_requests_and_closes_on_their_success() {
        let b = breaker(settings());
        trip(&b);
        tokio::time::advance(Duration::from_secs(30)).await;
        let probes: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert_eq!(
            b.try_acquire().unwrap_err(),
            Refused(State::HalfOpen),
            "a 4th concurrent probe is refused"
        );
        let mut probes = probes.into_iter();
        probes.next().unwrap().success();
        probes.next().unwrap().success();
        assert_eq!(
            b.state(),
            State::HalfOpen,
            "2 of 3 successes: still half-open"
        );
        probes.next().unwrap().success();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.snapshot().1, Counts::default());
        let text = b.metrics.as_ref().unwrap().encode();
        for (from, to) in [
            ("closed", "open"),
            ("open", "half-open"),
            ("half-open", "closed"),
        ] {
            assert!(
                text.contains(&format!(
                    r#"trellis_circuit_breaker_transitions_total{{service="user.shop",from="{from}",to="{to}"}} 1"#
                )),
                "{text}"
            );
        }
        assert!(
            text.contains(r#"trellis_circuit_breaker_state{service="user.shop",state="closed"} 1"#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_failure_reopens_for_another_open_for() {
        let b = breaker(settings());
        trip(&b);
        tokio::time::advance(Duration::from_secs(30)).await;
        call(&b, true).unwrap();
        call(&b, false).unwrap();
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn results_from_an_older_generation_are_ignored() {
        let b = breaker(settings());
        let slow = b.try_acquire().unwrap();
        trip(&b);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), State::HalfOpen);
        // A failure started while closed must not reopen the half-open breaker.
        slow.failure();
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_gives_its_slot_back() {
        let b = breaker(Settings {
            half_open_requests: 1,
            ..settings()
        });
        trip(&b);
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err());
        drop(probe);
        call(&b, true).unwrap();
        assert_eq!(b.state(), State::Closed);
    }
}
