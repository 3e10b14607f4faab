//! W3C trace context propagation, the only tracing code the services have:
//! the sidecar starts and ends spans; an application only has to copy the
//! trace headers of the request it serves onto the requests it makes, so the
//! sidecar can link the calls into one trace.

use axum::extract::FromRequestParts;
use http::{HeaderMap, HeaderName, request::Parts};

/// The headers copied from an incoming request to outgoing ones.
pub const PROPAGATED: [HeaderName; 4] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("baggage"),
    HeaderName::from_static("x-request-id"),
];

/// Copies the [`PROPAGATED`] headers present in `from` into `to`, replacing any there.
pub fn propagate(from: &HeaderMap, to: &mut HeaderMap) {
    for name in &PROPAGATED {
        let mut values = from.get_all(name).iter();
        if let Some(first) = values.next() {
            to.insert(name.clone(), first.clone());
            for v in values {
                to.append(name.clone(), v.clone());
            }
        }
    }
}

/// An extractor holding the trace headers of the request being served.
#[derive(Clone, Debug, Default)]
pub struct TraceHeaders(pub HeaderMap);

impl TraceHeaders {
    /// The trace headers of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut h = HeaderMap::new();
        propagate(headers, &mut h);
        Self(h)
    }
    /// Copies them onto an outgoing request's headers.
    pub fn apply(&self, to: &mut HeaderMap) {
        propagate(&self.0, to);
    }
}

impl<S: Send + Sync> FromRequestParts<S> for TraceHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::from_headers(&parts.headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_exactly_the_trace_headers() {
        let mut from = HeaderMap::new();
        from.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        from.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        from.append("baggage", "a=1".parse().unwrap());
        from.append("baggage", "b=2".parse().unwrap());
        from.insert("x-request-id", "r1".parse().unwrap());
        from.insert("authorization", "secret".parse().unwrap());
        let mut to = HeaderMap::new();
        to.insert("tracestate", "old".parse().unwrap());
        TraceHeaders::from_headers(&from).apply(&mut to);
        assert_eq!(to.len(), 5, "{to:?}");
        assert_eq!(to["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(to.get_all("baggage").iter().count(), 2);
        assert!(to.get("authorization").is_none());
    }
}
