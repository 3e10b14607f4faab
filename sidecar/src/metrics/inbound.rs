//! The inbound limits: requests refused by the rate limit and shed by the
//! concurrency limit.

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{Metrics, ServiceLabels, count};

/// The inbound families.
pub(super) struct Families {
    rate_limited: Family<ServiceLabels, Counter>,
    shed: Family<ServiceLabels, Counter>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let rate_limited = Family::default();
        registry.register(
            "inbound_rate_limited",
            "Inbound requests refused with 429 by the rate limit",
            rate_limited.clone(),
        );
        let shed = Family::default();
        registry.register(
            "inbound_shed",
            "Inbound requests refused with 503 because the concurrency limit was full",
            shed.clone(),
        );
        Self { rate_limited, shed }
    }
}

impl Metrics {
    /// Counts an inbound request refused by the rate limit.
    pub fn rate_limited(&self, service: &str) {
        count(&self.0.inbound.rate_limited, service);
    }

    /// Counts an inbound request shed by the concurrency limit.
    pub fn shed(&self, service: &str) {
        count(&self.0.inbound.shed, service);
    }
}
