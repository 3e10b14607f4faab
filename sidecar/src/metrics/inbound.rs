//! The inbound limits: requests refused by the rate limit and shed by the
//! concurrency limit; and the gateway's per-client rate limits.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{Metrics, ServiceLabels, count};

/// The inbound families.
pub(super) struct Families {
    rate_limited: Family<ServiceLabels, Counter>,
    shed: Family<ServiceLabels, Counter>,
    gateway_rate_limited: Family<LimitLabels, Counter>,
}

/// The label set of the gateway's per-client limits: the limit, as the
/// policy that set it (a few per gateway, never a client).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: String,
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
        let gateway_rate_limited = Family::default();
        registry.register(
            "gateway_rate_limited",
            "Requests at a gateway refused with 429 by a per-client rate limit, by limit (the policy that set it)",
            gateway_rate_limited.clone(),
        );
        Self {
            rate_limited,
            shed,
            gateway_rate_limited,
        }
    }
}

impl Metrics {
    /// Counts an inbound request refused by the rate limit.
    pub fn rate_limited(&self, service: &str) {
        count(&self.0.inbound.rate_limited, service);
    }

    /// Counts a gateway request refused by the per-client limit `limit`.
    pub fn gateway_rate_limited(&self, limit: &str) {
        self.0
            .inbound
            .gateway_rate_limited
            .get_or_create(&LimitLabels {
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// Counts an inbound request shed by the concurrency limit.
    pub fn shed(&self, service: &str) {
        count(&self.0.inbound.shed, service);
    }
}
