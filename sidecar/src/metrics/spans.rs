//! Tracing: what became of the sampled spans.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The tracing families.
pub(super) struct Families {
    trace_spans: Family<OutcomeLabels, Counter>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let trace_spans = Family::default();
        registry.register(
            "trace_spans",
            "Sampled spans by what became of them: exported, dropped (export queue full) or failed (the collector refused or could not be reached)",
            trace_spans.clone(),
        );
        Self { trace_spans }
    }
}

impl Metrics {
    /// Counts `n` sampled spans that were `exported`, `dropped` or `failed`.
    pub fn trace_spans(&self, outcome: &'static str, n: u64) {
        self.0
            .spans
            .trace_spans
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(n);
    }
}
