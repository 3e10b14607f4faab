//! Outlier ejection per endpoint: an endpoint that fails `consecutive`
//! times in a row (5xx, connect failure, or a try that ran out of time on
//! it) is taken out of its balancer for `base × times ejected` (capped at
//! `max`), like Envoy's consecutive-5xx detector. It comes back by itself;
//! a further run of failures ejects it for longer. The multiplier resets
//! when an endpoint has gone `max` without an ejection.
//!
//! Never all endpoints: an ejection that would leave a service without a
//! single endpoint in its balancer does not happen.
//!
//! Taking an endpoint out means its `poll_ready` answers `Pending` until the
//! ejection ends (a timer wakes it). tower's p2c balancer only picks among
//! ready endpoints and re-polls an endpoint after every call, so an ejected
//! endpoint gets no traffic and rejoins on its own, without touching the
//! endpoint set discovery owns. p2c over peak-EWMA already steers away from
//! *slow* endpoints; ejection is what catches an endpoint failing *fast*,
//! which latency-based balancing would otherwise favour.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::{on_outcome, timeout::TryDeadline};
use crate::{
    http::{Body, BoxError},
    metrics::Metrics,
};

/// Outlier detection settings (sidecar flags: they tune the data plane,
/// not the service's contract).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further one is longer by as much.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Default)]
struct Member {
    /// Live services for this address (the balancer may briefly hold two
    /// across a remove and re-insert).
    refs: usize,
    consecutive: u32,
    times_ejected: u32,
    ejected_until: Option<Instant>,
    last_ejected: Option<Instant>,
}

/// The endpoints of one dependency, and which are ejected.
#[derive(Debug)]
pub struct Group {
    service: Arc<str>,
    settings: OutlierSettings,
    metrics: Metrics,
    members: Mutex<HashMap<SocketAddr, Member>>,
}

impl Group {
    /// The group of `service`'s endpoints.
    pub fn new(service: Arc<str>, settings: OutlierSettings, metrics: Metrics) -> Self {
        Self {
            service,
            settings,
            metrics,
            members: Mutex::default(),
        }
    }

    fn join(&self, addr: SocketAddr) {
        self.members
            .lock()
            .expect("outlier lock")
            .entry(addr)
            .or_default()
            .refs += 1;
    }

    fn leave(&self, addr: SocketAddr) {
        let mut members = self.members.lock().expect("outlier lock");
        if let Some(m) = members.get_mut(&addr) {
            m.refs -= 1;
            if m.refs == 0 {
                members.remove(&addr);
            }
        }
        let now = Instant::now();
        let n = Self::ejected_count(&members, now);
        self.metrics.set_ejected(&self.service, n);
    }

    fn ejected_count(members: &HashMap<SocketAddr, Member>, now: Instant) -> usize {
        members
            .values()
            .filter(|m| m.ejected_until.is_some_and(|u| u > now))
            .count()
    }

    /// Until when `addr` is ejected, if it is.
    pub fn ejected_until(&self, addr: SocketAddr) -> Option<Instant> {
        let now = Instant::now();
        let members = self.members.lock().expect("outlier lock");
        members
            .get(&addr)
            .and_then(|m| m.ejected_until)
            .filter(|u| *u > now)
    }

    /// Records the outcome of a call to `addr`.
    pub fn record(&self, addr: SocketAddr, failed: bool) {
        if self.settings.consecutive_failures == 0 {
            return;
        }
        let now = Instant::now();
        let mut members = self.members.lock().expect("outlier lock");
        let total = members.len();
        let ejected = Self::ejected_count(&members, now);
        let Some(m) = members.get_mut(&addr) else {
            return;
        };
        if !failed {
            m.consecutive = 0;
            return;
        }
        m.consecutive += 1;
        let already = m.ejected_until.is_some_and(|u| u > now);
        if already || m.consecutive < self.settings.consecutive_failures {
            return;
        }
        if ejected + 1 >= total {
            tracing::debug!(service = %self.service, %addr, "not ejecting: it would leave no endpoint");
            return;
        }
        if m.last_ejected
            .is_some_and(|t| now.saturating_duration_since(t) > self.settings.max_ejection)
        {
            m.times_ejected = 0;
        }
        m.times_ejected += 1;
        let length = self
            .settings
            .base_ejection
            .saturating_mul(m.times_ejected)
            .min(self.settings.max_ejection);
        m.ejected_until = Some(now + length);
        m.last_ejected = Some(now);
        m.consecutive = 0;
        tracing::warn!(
            service = %self.service,
            %addr,
            times = m.times_ejected,
            ?length,
            "endpoint ejected after consecutive failures"
        );
        self.metrics.ejection(&self.service, ejected + 1);
    }

    /// Each endpoint with its ejection state, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let members = self.members.lock().expect("outlier lock");
        let mut list: Vec<_> = members
            .iter()
            .map(|(addr, m)| {
                let left = m
                    .ejected_until
                    .filter(|u| *u > now)
                    .map(|u| u.saturating_duration_since(now).as_millis() as u64);
                serde_json::json!({
                    "endpoint": addr.to_string(),
                    "ejected": left.is_some(),
                    "ejectedForMs": left,
                    "timesEjected": m.times_ejected,
                    "consecutiveFailures": m.consecutive,
                })
            })
            .collect();
        list.sort_by(|a, b| a["endpoint"].as_str().cmp(&b["endpoint"].as_str()));
        serde_json::Value::Array(list)
    }
}

/// One endpoint, watched for consecutive failures.
pub struct Outlier<S> {
    inner: S,
    addr: SocketAddr,
    group: Arc<Group>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> Outlier<S> {
    /// `inner`, the endpoint at `addr`, member of `group`.
    pub fn new(inner: S, addr: SocketAddr, group: Arc<Group>) -> Self {
        group.join(addr);
        Self {
            inner,
            addr,
            group,
            sleep: None,
        }
    }
}

impl<S> Drop for Outlier<S> {
    fn drop(&mut self) {
        self.group.leave(self.addr);
    }
}

impl<S> Service<Request<Body>> for Outlier<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        while let Some(until) = self.group.ejected_until(self.addr) {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.sleep = None;
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let deadline = req.extensions().get::<TryDeadline>().cloned();
        let fut: BoxFuture<'static, Result<Response<Body>, BoxError>> =
            Box::pin(self.inner.call(req));
        let (group, addr) = (self.group.clone(), self.addr);
        async move {
            let res = match deadline {
                Some(d) => match tokio::time::timeout_at(d.at, fut).await {
                    Ok(res) => res,
                    Err(_) => Err(d.error().into()),
                },
                None => fut.await,
            };
            on_outcome(res, move |kind| group.record(addr, kind.is_some()))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u16) -> (Arc<Group>, Vec<SocketAddr>) {
        let g = Arc::new(Group::new(
            "user.shop".into(),
            OutlierSettings {
                consecutive_failures: 3,
                base_ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(25),
            },
            Metrics::default(),
        ));
        let addrs: Vec<SocketAddr> = (1..=n)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        for a in &addrs {
            g.join(*a);
        }
        (g, addrs)
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_for_a_growing_capped_time() {
        let (g, a) = group(3);
        g.record(a[0], true);
        g.record(a[0], true);
        g.record(a[0], false);
        g.record(a[0], true);
        g.record(a[0], true);
        assert_eq!(g.ejected_until(a[0]), None, "a success breaks the run");
        g.record(a[0], true);
        let now = Instant::now();
        assert_eq!(g.ejected_until(a[0]), Some(now + Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(g.ejected_until(a[0]), None, "back after base");
        for _ in 0..3 {
            g.record(a[0], true);
        }
        assert_eq!(
            g.ejected_until(a[0]),
            Some(Instant::now() + Duration::from_secs(20))
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        for _ in 0..3 {
            g.record(a[0], true);
        }
        assert_eq!(
            g.ejected_until(a[0]),
            Some(Instant::now() + Duration::from_secs(25)),
            "capped at max"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_the_last_endpoint() {
        let (g, a) = group(2);
        for _ in 0..3 {
            g.record(a[0], true);
            g.record(a[1], true);
        }
        assert!(g.ejected_until(a[0]).is_some());
        assert_eq!(g.ejected_until(a[1]), None, "one must stay");
        let (g, a) = group(1);
        for _ in 0..10 {
            g.record(a[0], true);
        }
        assert_eq!(g.ejected_until(a[0]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_is_not_ready_until_it_returns() {
        let (g, a) = group(2);
        let mut svc = Outlier::new(
            tower::service_fn(|_: Request<Body>| async {
                Ok::<_, BoxError>(Response::new(crate::http::empty()))
            }),
            a[0],
            g.clone(),
        );
        for _ in 0..3 {
            g.record(a[0], true);
        }
        let mut ready = tokio_test_ready(&mut svc);
        assert!(
            ready
                .as_mut()
                .poll(&mut Context::from_waker(futures::task::noop_waker_ref()))
                .is_pending()
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(ready.await.is_ok());
    }

    fn tokio_test_ready<S: Service<Request<Body>>>(
        svc: &mut S,
    ) -> Pin<Box<impl Future<Output = Result<(), S::Error>> + '_>> {
        Box::pin(futures::future::poll_fn(move |cx| svc.poll_ready(cx)))
    }
}
