//! The policy: reloads offered, applied or rejected, and the generation
//! in force.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The policy families.
pub(super) struct Families {
    reloads: Family<ResultLabels, Counter>,
    generation: Gauge,
    valid: Gauge,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let reloads = Family::default();
        registry.register(
            "policy_reloads",
            "Policies offered to the sidecar, by result (applied or rejected)",
            reloads.clone(),
        );
        let generation = Gauge::default();
        registry.register(
            "policy_generation",
            "How many policies have been applied since start (the running policy's version)",
            generation.clone(),
        );
        let valid = Gauge::default();
        registry.register(
            "policy_last_reload_ok",
            "1 when the last policy offered was applied, 0 when it was rejected",
            valid.clone(),
        );
        Self {
            reloads,
            generation,
            valid,
        }
    }
}

impl Metrics {
    /// Records a policy offered: applied (with the new generation) or rejected.
    pub fn record_policy(&self, applied: bool, generation: u64) {
        let families = &self.0.policy;
        let result = if applied { "applied" } else { "rejected" };
        families
            .reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        families.valid.set(i64::from(applied));
        if applied {
            families
                .generation
                .set(i64::try_from(generation).unwrap_or(i64::MAX));
        }
    }
}
