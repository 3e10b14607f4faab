//! W3C Trace Context (`traceparent`, `tracestate`) and Baggage, read from
//! and written onto HTTP headers.
//!
//! Two ways: the SDK's propagators ([`extract`], [`inject`]) for the requests
//! that get a span, and an allocation-free reader and writer of
//! `traceparent` alone ([`parse_traceparent`], [`traceparent`]) for the
//! sampling decision and for the requests that do not.

use std::sync::LazyLock;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context,
    propagation::{TextMapCompositePropagator, TextMapPropagator},
    trace::{SpanId, TraceId},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};

static PROPAGATOR: LazyLock<TextMapCompositePropagator> = LazyLock::new(|| {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
});

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The vendors' trace state, which belongs to the `traceparent` it came with.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// What a valid `traceparent` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// Reads a `traceparent` value under the W3C rules (lowercase hex, no
/// all-zero ids, version `ff` invalid, version `00` exactly 55 characters,
/// a later version at least that with a `-` after the flags), without
/// allocating. `None` when it is malformed: the request has no parent.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    let v = value.trim_ascii();
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = hex(&v[3..35])?;
    let span_id = hex(&v[36..52])?;
    let flags = hex(&v[53..55])?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent {
        trace_id: TraceId::from(trace_id),
        span_id: SpanId::from(u64::try_from(span_id).ok()?),
        sampled: flags & 1 == 1,
    })
}

/// Lowercase hex digits (at most 32) as a number.
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let nibble = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(nibble))
    })
}

/// A version-00 `traceparent`, formatted into a stack buffer.
pub fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let trace = u128::from_be_bytes(trace_id.to_bytes());
    for (i, b) in buf[3..35].iter_mut().enumerate() {
        *b = DIGITS[(trace >> (124 - 4 * i) & 0xf) as usize];
    }
    let span = u64::from_be_bytes(span_id.to_bytes());
    for (i, b) in buf[36..52].iter_mut().enumerate() {
        *b = DIGITS[(span >> (60 - 4 * i) & 0xf) as usize];
    }
    if sampled {
        buf[54] = b'1';
    }
    HeaderValue::from_bytes(&buf).expect("hex and dashes are a valid header value")
}

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
    fn the_fast_reader_and_writer_agree_with_the_sdk() {
        let p = parse_traceparent(PARENT.as_bytes()).unwrap();
        assert_eq!(
            p.trace_id,
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(p.span_id, SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert!(p.sampled);
        assert_eq!(traceparent(p.trace_id, p.span_id, true), PARENT);
        let unsampled = traceparent(p.trace_id, p.span_id, false);
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, unsampled.clone());
        let sc = extract(&h).span().span_context().clone();
        assert!(sc.is_valid() && !sc.is_sampled());
        assert_eq!(
            parse_traceparent(unsampled.as_bytes()).map(|p| p.sampled),
            Some(false)
        );
        // Later versions may append fields; unknown flags are not "sampled".
        let later = format!("01{}-what-ever", &PARENT[2..]);
        assert!(parse_traceparent(later.as_bytes()).is_some());
        assert_eq!(
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02")
                .map(|p| p.sampled),
            Some(false)
        );
    }

    #[test]
    fn the_fast_reader_refuses_what_w3c_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
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
