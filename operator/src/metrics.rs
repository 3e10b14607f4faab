//! Prometheus metrics of the operator, served on the admin port at `/metrics`.

use std::time::Instant;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// A short machine-readable kind, such as `kube` or `name_collision`.
    pub error: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconciles that failed, by kind of error.
    pub errors: Family<ErrorLabels, Counter>,
    /// How long reconciles take.
    pub duration: Histogram,
    /// 1 while this replica holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "MicroService reconciles started",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "MicroService reconciles that failed",
            errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "How long one MicroService reconcile takes",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            histogram: &self.duration,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: error.to_owned(),
            })
            .inc();
    }

    /// The metrics in the Prometheus text format (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Records the duration of a reconcile when dropped.
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counts_errors_and_durations() {
        let m = Metrics::default();
        drop(m.reconcile_started());
        m.reconcile_failed("name_collision");
        let text = m.encode();
        assert!(
            text.contains("trellis_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"trellis_operator_reconcile_errors_total{error="name_collision"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("trellis_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
