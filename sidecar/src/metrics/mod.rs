//! Prometheus metrics, served in the text format on the admin `/metrics`.
//!
//! Every series is labelled by direction and by upstream service, so one
//! scrape answers "which dependency is failing or slow" without logs.
//! Status is recorded as a class (`2xx`...`5xx`), not a code, to keep the
//! number of series bounded whatever the upstreams answer.
//!
//! Each subsystem registers its own families in its own module and records
//! through methods on [`Metrics`] defined there: [`traffic`] (requests,
//! latency, gRPC codes, the proxy's own answers, connections, both
//! directions), [`discovery`], [`policy`], [`resilience`] (breakers,
//! retries, outlier ejection), [`inbound`] (limits), [`identity`]
//! (certificates, authorization) and [`spans`]; the
//! process footprint is added by [`crate::process`].

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

mod discovery;
mod http_layer;
mod identity;
mod inbound;
mod policy;
mod resilience;
mod spans;
mod traffic;

pub use http_layer::MetricsLayer;
pub use identity::{Renewal, Verdict};

/// Which listener a request came through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    /// From another service to the application.
    #[allow(non_camel_case_types)]
    inbound,
    /// From the application to a dependency.
    #[allow(non_camel_case_types)]
    outbound,
    /// From a client at the edge, through a gateway's listener, to a backend.
    #[allow(non_camel_case_types)]
    gateway,
}

/// The service a request was for, set as a response extension by whatever
/// routed it, so the metrics layer can label the request after the fact.
#[derive(Clone, Debug)]
pub struct ServiceLabel(pub Arc<str>);

/// The label set of the families counted per service only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

/// Adds one to `service`'s counter in `family`.
fn count(family: &Family<ServiceLabels, Counter>, service: &str) {
    family
        .get_or_create(&ServiceLabels {
            service: service.to_owned(),
        })
        .inc();
}

struct Inner {
    registry: Registry,
    traffic: traffic::Families,
    discovery: discovery::Families,
    policy: policy::Families,
    resilience: resilience::Families,
    inbound: inbound::Families,
    identity: identity::Families,
    spans: spans::Families,
}

/// The sidecar's metrics; cheap to clone, shared by every part.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let traffic = traffic::Families::register(&mut registry);
        let discovery = discovery::Families::register(&mut registry);
        let policy = policy::Families::register(&mut registry);
        let resilience = resilience::Families::register(&mut registry);
        let inbound = inbound::Families::register(&mut registry);
        let identity = identity::Families::register(&mut registry);
        let spans = spans::Families::register(&mut registry);
        Self(Arc::new(Inner {
            registry,
            traffic,
            discovery,
            policy,
            resilience,
            inbound,
            identity,
            spans,
        }))
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.0.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_by_class_and_policy_results() {
        let m = Metrics::default();
        m.record_request(
            Direction::outbound,
            "user.shop",
            http::StatusCode::SERVICE_UNAVAILABLE,
            std::time::Duration::from_millis(3),
            Some("no-endpoints"),
        );
        m.record_request(
            Direction::outbound,
            "user.shop",
            http::StatusCode::OK,
            std::time::Duration::from_millis(1),
            None,
        );
        m.record_request(
            Direction::outbound,
            "user.shop",
            http::StatusCode::OK,
            std::time::Duration::from_millis(1),
            None,
        );
        m.record_request(
            Direction::inbound,
            "user.shop",
            http::StatusCode::OK,
            std::time::Duration::from_millis(1),
            None,
        );
        m.record_policy(false, 0);
        let text = m.encode();
        assert!(
            text.contains(
                r#"trellis_requests_total{direction="outbound",service="user.shop",status_class="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"trellis_requests_total{direction="inbound",service="user.shop",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains(r#"status_class="4xx""#), "{text}");
        assert!(
            text.contains(
                r#"trellis_request_duration_seconds_count{direction="outbound",service="user.shop"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"trellis_requests_total{direction="outbound",service="user.shop",status_class="5xx"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"trellis_proxy_errors_total{direction="outbound",service="user.shop",kind="no-endpoints"} 1"#), "{text}");
        assert!(
            text.contains(r#"trellis_policy_reloads_total{result="rejected"} 1"#),
            "{text}"
        );
        assert!(text.contains("trellis_policy_last_reload_ok 0"), "{text}");
    }
}
