//! Resilience for calls to dependencies: deadlines, retries with a budget,
//! a circuit breaker and outlier ejection, each its own module and layer;
//! [`crate::stack`] puts them together.
//!
//! State that must outlive a policy reload — each dependency's breaker,
//! retry budget and outlier group — lives in the [`Registry`]. A reload
//! rebuilds the route layers; the breaker and the budget are kept when
//! their settings did not change and start afresh (closed, empty) when they
//! did. Outlier state belongs to the balancer, which survives every reload.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod outlier;
pub mod peek_trailers;
pub mod replay;
pub mod retry;
pub mod timeout;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use http::Response;
use trellis_policy::{FailureKind, RetryBudget as BudgetSpec};

use crate::{
    http::{
        Body, BoxError,
        grpc::{self, Outcome},
        response::ProxyError,
    },
    metrics::Metrics,
    reload::Kept,
};

/// The first error of type `E` in `e`'s chain of sources.
pub fn find<'a, E: std::error::Error + 'static>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    loop {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        e = e.source()?;
    }
}

/// Whether `e` is some kind of timeout.
pub fn is_timeout(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    matches!(
        find::<ProxyError>(e),
        Some(ProxyError::Timeout { .. } | ProxyError::TryTimeout { .. })
    ) || find::<tower::timeout::error::Elapsed>(e).is_some()
        || find::<tokio::time::error::Elapsed>(e).is_some()
}

/// What kind of failure a try's result is, as far as its headers tell: a
/// 5xx answer, a gRPC status that is the server's failure (see
/// [`grpc::failure_kind`]), a timeout, or a connection that failed or broke
/// before the response. Any other error below the breaker (not only a
/// [`ClientError`](crate::client::ClientError)) is a transport failure too.
/// A gRPC response whose status is still to come in its trailers is not
/// (yet) a failure: [`on_outcome`] waits for it.
pub fn failure_kind(res: &Result<Response<Body>, BoxError>) -> Option<FailureKind> {
    match res {
        Ok(rsp) => match Outcome::of(rsp) {
            Outcome::Grpc(code) => grpc::failure_kind(code),
            Outcome::InTrailers => None,
            Outcome::Http => rsp
                .status()
                .is_server_error()
                .then_some(FailureKind::ServerError),
        },
        Err(e) if is_timeout(e.as_ref()) => Some(FailureKind::Timeout),
        Err(e) => match find::<ProxyError>(e.as_ref()) {
            // Not the dependency's fault.
            Some(ProxyError::CircuitOpen { .. } | ProxyError::BadRequest(_)) => None,
            _ => Some(FailureKind::ConnectFailure),
        },
    }
}

/// Calls `record` with the failure kind of `res` (`None`: a success) once
/// its outcome is known: at once, or, for a gRPC response whose status
/// comes in the trailers, when the body ends (a body dropped before its end
/// calls nothing). Returns `res` to pass on.
pub fn on_outcome<F>(
    res: Result<Response<Body>, BoxError>,
    record: F,
) -> Result<Response<Body>, BoxError>
where
    F: FnOnce(Option<FailureKind>) + Send + 'static,
{
    match res {
        Ok(rsp) if Outcome::of(&rsp) == Outcome::InTrailers => {
            Ok(rsp.map(|body| grpc::OnEnd::wrap(body, move |end| record(end.failure_kind()))))
        }
        res => {
            record(failure_kind(&res));
            res
        }
    }
}

#[derive(Default)]
struct Dependency {
    breaker: Kept<breaker::Settings, Arc<breaker::Breaker>>,
    budget: Kept<BudgetSpec, Arc<budget::RetryBudget>>,
    outliers: Option<Arc<outlier::Group>>,
}

/// The per-dependency state that survives reloads, shown on `/status`.
#[derive(Clone)]
pub struct Registry {
    metrics: Metrics,
    deps: Arc<Mutex<BTreeMap<String, Dependency>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            deps: Arc::default(),
        }
    }

    /// The breaker of `service`: the existing one if its settings are
    /// unchanged, else a new closed one.
    pub fn breaker(&self, service: &str, settings: breaker::Settings) -> Arc<breaker::Breaker> {
        let mut deps = self.deps.lock().expect("registry lock");
        let dep = deps.entry(service.to_owned()).or_default();
        if dep.breaker.is_stale(&settings) {
            tracing::info!(
                service,
                "circuit breaker settings changed: breaker reset to closed"
            );
        }
        dep.breaker.get_or_make(&settings, || {
            Arc::new(breaker::Breaker::new(
                service,
                settings.clone(),
                Some(self.metrics.clone()),
            ))
        })
    }

    /// The retry budget of `service`, kept while its settings are unchanged.
    pub fn budget(&self, service: &str, spec: &BudgetSpec) -> Arc<budget::RetryBudget> {
        let mut deps = self.deps.lock().expect("registry lock");
        let dep = deps.entry(service.to_owned()).or_default();
        dep.budget.get_or_make(spec, || {
            Arc::new(budget::RetryBudget::new(spec.ratio, spec.min_per_second))
        })
    }

    /// The outlier group of `service` (one per balancer, made once).
    pub fn outliers(
        &self,
        service: &str,
        settings: &outlier::OutlierSettings,
    ) -> Arc<outlier::Group> {
        let mut deps = self.deps.lock().expect("registry lock");
        let dep = deps.entry(service.to_owned()).or_default();
        dep.outliers
            .get_or_insert_with(|| {
                Arc::new(outlier::Group::new(
                    service.into(),
                    settings.clone(),
                    self.metrics.clone(),
                ))
            })
            .clone()
    }

    /// Every dependency's breaker, budget and endpoints, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let deps = self.deps.lock().expect("registry lock");
        let map: serde_json::Map<String, serde_json::Value> = deps
            .iter()
            .map(|(name, d)| {
                let breaker = d.breaker.value().map(|b| {
                    let (state, counts) = b.snapshot();
                    serde_json::json!({"state": state.as_str(), "counts": counts})
                });
                let budget = d.budget.value().map(|b| {
                    let (ratio, floor) = b.balance();
                    serde_json::json!({"ratioBalance": ratio, "floorBalance": floor})
                });
                let endpoints = d.outliers.as_ref().map(|g| g.status());
                (
                    name.clone(),
                    serde_json::json!({
                        "circuitBreaker": breaker,
                        "retryBudget": budget,
                        "endpoints": endpoints,
                    }),
                )
            })
            .collect();
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_policy::CircuitBreaker;

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_a_breaker_with_unchanged_settings_and_resets_a_changed_one() {
        let r = Registry::new(Metrics::default());
        let spec = CircuitBreaker {
            consecutive_failures: 1,
            ..CircuitBreaker::default()
        };
        let b = r.breaker("user.shop", breaker::Settings::from(&spec));
        for _ in 0..2 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state(), breaker::State::Open);
        // The same settings again (a reload that changed something else).
        let same = r.breaker("user.shop", breaker::Settings::from(&spec));
        assert!(Arc::ptr_eq(&b, &same));
        assert_eq!(same.state(), breaker::State::Open);
        let status = r.status();
        assert_eq!(status["user.shop"]["circuitBreaker"]["state"], "open");
        // Changed settings: a new, closed breaker.
        let changed = CircuitBreaker {
            consecutive_failures: 2,
            ..spec
        };
        let fresh = r.breaker("user.shop", breaker::Settings::from(&changed));
        assert_eq!(fresh.state(), breaker::State::Closed);

        let budget = r.budget("user.shop", &BudgetSpec::default());
        assert!(Arc::ptr_eq(
            &budget,
            &r.budget("user.shop", &BudgetSpec::default())
        ));
        let other = BudgetSpec {
            ratio: 0.5,
            ..BudgetSpec::default()
        };
        assert!(!Arc::ptr_eq(&budget, &r.budget("user.shop", &other)));
    }
}
