//! W3C Trace Context (`traceparent`, `tracestate`) and Baggage, read from
//! and written onto HTTP headers.

use std::sync::LazyLock;

use http::HeaderMap;
use opentelemetry::{
    Context,
    propagation::{TextMapCompositePropagator, TextMapPropagator},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};

static PROPAGATOR: LazyLock<TextMapCompositePropagator> = LazyLock::new(|| {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
});

/// The trace context and baggage a request carries (empty when none, or
/// when its `traceparent` is malformed: a new trace starts).
pub fn extract(headers: &HeaderMap) -> Context {
    PROPAGATOR.extract(&HeaderExtractor(headers))
}

/// Writes `cx`'s span as the request's parent (`traceparent`, `tracestate`)
/// and its baggage.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    PROPAGATOR.inject_context(cx, &mut HeaderInjector(headers));
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips_with_baggage() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", PARENT.parse().unwrap());
        h.insert("baggage", "tenant=acme".parse().unwrap());
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = HeaderMap::new();
        inject(&cx, &mut out);
        assert_eq!(out["traceparent"], PARENT);
        assert_eq!(out["baggage"], "tenant=acme");
    }

    #[test]
    fn a_malformed_traceparent_is_no_parent() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-zzzz-00f067aa0ba902b7-01".parse().unwrap(),
        );
        assert!(!extract(&h).span().span_context().is_valid());
    }
}
