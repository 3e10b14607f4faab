//! The sample ratio for new traces, taken from the policy in force.
//!
//! The tracer is built once, but `tracing.sampleRatio` can change with any
//! policy reload; so the sampler reads the ratio from the policy watch for
//! each root span (the provider wraps it in `ParentBased`, so only requests
//! without a parent get here, and a sampled or unsampled caller is always
//! followed). Reading the watch, not a copy a task keeps up to date, means
//! the first request after a reload already uses the new ratio. The
//! decision itself is the SDK's trace-id ratio sampler.

use opentelemetry::{
    Context, KeyValue,
    trace::{Link, SpanKind, TraceId},
};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};
use tokio::sync::watch;
use trellis_policy::Tracing as TracingPolicy;

use crate::policy_watch::PolicyState;

/// A ratio sampler whose ratio is the policy's.
#[derive(Clone, Debug)]
pub enum PolicyRatio {
    /// A fixed ratio (tests).
    #[cfg(test)]
    Fixed(f64),
    /// Each applied policy's `tracing.sampleRatio` (the default ratio until
    /// a policy is in force).
    Following(watch::Receiver<PolicyState>),
}

impl PolicyRatio {
    /// A sampler that follows the policy.
    pub fn following(policy: watch::Receiver<PolicyState>) -> Self {
        Self::Following(policy)
    }

    /// The ratio in force, clamped to 0..=1.
    pub fn get(&self) -> f64 {
        let ratio = match self {
            #[cfg(test)]
            Self::Fixed(r) => *r,
            Self::Following(policy) => policy.borrow().policy.as_ref().map_or_else(
                || TracingPolicy::default().sample_ratio,
                |p| p.tracing.sample_ratio,
            ),
        };
        ratio.clamp(0.0, 1.0)
    }
}

impl PolicyRatio {
    /// Whether a trace that starts here with `trace_id` is sampled: the
    /// SDK's trace-id ratio decision, without a span.
    pub fn samples(&self, trace_id: TraceId) -> bool {
        Sampler::TraceIdRatioBased(self.get())
            .should_sample(None, trace_id, "", &SpanKind::Internal, &[], &[])
            .decision
            != SamplingDecision::Drop
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
    use super::*;

    fn decide(s: &PolicyRatio, id: u128) -> SamplingDecision {
        s.should_sample(None, TraceId::from(id), "GET", &SpanKind::Server, &[], &[])
            .decision
    }

    #[test]
    fn ratio_zero_samples_nothing_and_one_everything() {
        let s = PolicyRatio::Fixed(0.0);
        assert!((1..500u128).all(|i| decide(&s, i * 7919) == SamplingDecision::Drop));
        let s = PolicyRatio::Fixed(1.0);
        assert!((1..500u128).all(|i| decide(&s, i * 7919) == SamplingDecision::RecordAndSample));
    }

    #[test]
    fn ratio_is_clamped() {
        assert_eq!(PolicyRatio::Fixed(7.0).get(), 1.0);
        assert_eq!(PolicyRatio::Fixed(-1.0).get(), 0.0);
    }

    #[test]
    fn without_a_policy_the_default_ratio_applies() {
        let (_tx, rx) = watch::channel(PolicyState::default());
        assert_eq!(
            PolicyRatio::following(rx).get(),
            TracingPolicy::default().sample_ratio
        );
    }
}
