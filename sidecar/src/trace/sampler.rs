//! The sample ratio for new traces, taken from the policy and changed live.
//!
//! The tracer is built once, but `tracing.sampleRatio` can change with any
//! policy reload; so the ratio lives in an atomic the sampler reads per
//! root span, and a task copies it from each policy applied. The decision
//! itself is the SDK's trace-id ratio sampler; the provider wraps this in
//! `ParentBased`, so a sampled (or unsampled) caller is always followed.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use opentelemetry::{
    Context, KeyValue,
    trace::{Link, SpanKind, TraceId},
};
use opentelemetry_sdk::trace::{Sampler, SamplingResult, ShouldSample};
use tokio::sync::watch;
use trellis_policy::Tracing as TracingPolicy;

use crate::policy_watch::PolicyState;

/// A ratio sampler whose ratio follows the policy.
#[derive(Clone, Debug)]
pub struct PolicyRatio(Arc<AtomicU64>);

impl PolicyRatio {
    /// A sampler at a fixed `ratio` (until [`set`](Self::set)).
    pub fn new(ratio: f64) -> Self {
        Self(Arc::new(AtomicU64::new(ratio.to_bits())))
    }

    /// A sampler that follows each applied policy's `tracing.sampleRatio`
    /// (the default ratio until a policy is in force).
    pub fn following(mut policy: watch::Receiver<PolicyState>) -> Self {
        let ratio = Self::new(TracingPolicy::default().sample_ratio);
        let setter = ratio.clone();
        tokio::spawn(async move {
            loop {
                let current = policy
                    .borrow_and_update()
                    .policy
                    .as_ref()
                    .map(|p| p.tracing.sample_ratio);
                if let Some(r) = current {
                    setter.set(r);
                }
                if policy.changed().await.is_err() {
                    break;
                }
            }
        });
        ratio
    }

    /// Sets the ratio (clamped to 0..=1).
    pub fn set(&self, ratio: f64) {
        self.0
            .store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// The ratio in force.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl ShouldSample for PolicyRatio {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        Sampler::TraceIdRatioBased(self.get()).should_sample(
            parent_context,
            trace_id,
            name,
            span_kind,
            attributes,
            links,
        )
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_sdk::trace::SamplingDecision;

    use super::*;

    fn decide(s: &PolicyRatio, id: u128) -> SamplingDecision {
        s.should_sample(None, TraceId::from(id), "GET", &SpanKind::Server, &[], &[])
            .decision
    }

    #[test]
    fn ratio_zero_samples_nothing_and_one_everything() {
        let s = PolicyRatio::new(0.0);
        assert!((1..500u128).all(|i| decide(&s, i * 7919) == SamplingDecision::Drop));
        s.set(1.0);
        assert!((1..500u128).all(|i| decide(&s, i * 7919) == SamplingDecision::RecordAndSample));
    }

    #[test]
    fn ratio_is_clamped() {
        let s = PolicyRatio::new(0.5);
        s.set(7.0);
        assert_eq!(s.get(), 1.0);
        s.set(-1.0);
        assert_eq!(s.get(), 0.0);
    }
}
