//! The resilience layers: circuit breakers, retries and their budget, and
//! outlier ejection, by dependency.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{Metrics, ServiceLabels, count};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    service: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    service: String,
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    reason: &'static str,
}

/// The resilience families.
pub(super) struct Families {
    breaker_state: Family<BreakerLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    budget_exhausted: Family<ServiceLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    ejected: Family<ServiceLabels, Gauge>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let breaker_state = Family::default();
        registry.register(
            "circuit_breaker_state",
            "1 for the state each dependency's circuit breaker is in (closed, open, half-open), 0 for the others",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::default();
        registry.register(
            "circuit_breaker_transitions",
            "Circuit breaker state changes, by dependency, from and to",
            breaker_transitions.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Retries sent, by dependency and what was retried (connect-failure, 5xx, 429, timeout, grpc)",
            retries.clone(),
        );
        let budget_exhausted = Family::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the dependency's retry budget was spent",
            budget_exhausted.clone(),
        );
        let ejections = Family::default();
        registry.register(
            "outlier_ejections",
            "Endpoints taken out of a dependency's balancer for consecutive failures",
            ejections.clone(),
        );
        let ejected = Family::default();
        registry.register(
            "outlier_ejected_endpoints",
            "Endpoints of each dependency currently ejected",
            ejected.clone(),
        );
        Self {
            breaker_state,
            breaker_transitions,
            retries,
            budget_exhausted,
            ejections,
            ejected,
        }
    }
}

impl Metrics {
    /// Sets the breaker state gauge of `service` (one series per state, 1 for the current).
    pub fn set_breaker_state(&self, service: &str, state: &'static str) {
        for s in ["closed", "open", "half-open"] {
            self.0
                .resilience
                .breaker_state
                .get_or_create(&BreakerLabels {
                    service: service.to_owned(),
                    state: s,
                })
                .set(i64::from(s == state));
        }
    }

    /// Counts a breaker transition and updates the state gauge.
    pub fn breaker_transition(&self, service: &str, from: &'static str, to: &'static str) {
        self.0
            .resilience
            .breaker_transitions
            .get_or_create(&TransitionLabels {
                service: service.to_owned(),
                from,
                to,
            })
            .inc();
        self.set_breaker_state(service, to);
    }

    /// Counts one retry sent.
    pub fn retry(&self, service: &str, reason: &'static str) {
        self.0
            .resilience
            .retries
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason,
            })
            .inc();
    }

    /// Counts a retry refused by the budget.
    pub fn budget_exhausted(&self, service: &str) {
        count(&self.0.resilience.budget_exhausted, service);
    }

    /// Counts an ejection and sets how many endpoints of `service` are out.
    pub fn ejection(&self, service: &str, ejected_now: usize) {
        count(&self.0.resilience.ejections, service);
        self.set_ejected(service, ejected_now);
    }

    /// Sets how many endpoints of `service` are ejected.
    pub fn set_ejected(&self, service: &str, n: usize) {
        self.0
            .resilience
            .ejected
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
