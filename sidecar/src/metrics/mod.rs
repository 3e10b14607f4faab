//! Prometheus metrics, served in the text format on the admin `/metrics`.
//!
//! Every series is labelled by direction and by upstream service, so one
//! scrape answers "which dependency is failing or slow" without logs.
//! Status is recorded as a class (`2xx`...`5xx`), not a code, to keep the
//! number of series bounded whatever the upstreams answer.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, RwLock},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use trellis_policy::GrpcCode;

mod http_layer;

pub use http_layer::{MetricsLayer, RecordRequests};

/// Which listener a request came through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    /// From another service to the application.
    #[allow(non_camel_case_types)]
    inbound,
    /// From the application to a dependency.
    #[allow(non_camel_case_types)]
    outbound,
}

/// The service a request was for, set as a response extension by whatever
/// routed it, so the metrics layer can label the request after the fact.
#[derive(Clone, Debug)]
pub struct ServiceLabel(pub Arc<str>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: Direction,
    service: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    direction: Direction,
    service: String,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    direction: Direction,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    direction: Direction,
    service: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    service: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    service: String,
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Latency buckets from 0.5 ms to about 16 s, doubling.
#[derive(Clone, Copy)]
struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.0005, 2.0, 16))
    }
}

/// The request counters (one per status class, made at first use so no
/// empty series appear) and the latency histogram of one direction and
/// service: handles into the families, kept so recording a request needs
/// neither label strings nor a family lookup.
#[derive(Default)]
struct ServiceHandles {
    requests: [OnceLock<Counter>; 5],
    latency: OnceLock<Histogram>,
}

/// [`ServiceHandles`] by service, one map per direction.
type HandleCache = [RwLock<HashMap<Box<str>, Arc<ServiceHandles>>>; 2];

struct Inner {
    registry: Registry,
    handles: HandleCache,
    requests: Family<RequestLabels, Counter>,
    grpc_responses: Family<GrpcLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, LatencyBuckets>,
    proxy_errors: Family<ErrorLabels, Counter>,
    endpoints: Family<ServiceLabels, Gauge>,
    connections: Family<ListenerLabels, Gauge>,
    policy_reloads: Family<ResultLabels, Counter>,
    policy_generation: Gauge,
    policy_valid: Gauge,
    breaker_state: Family<BreakerLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    budget_exhausted: Family<ServiceLabels, Counter>,
    rate_limited: Family<ServiceLabels, Counter>,
    shed: Family<ServiceLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    ejected: Family<ServiceLabels, Gauge>,
    trace_spans: Family<OutcomeLabels, Counter>,
}

/// The sidecar's metrics; cheap to clone, shared by every part.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests proxied, by direction, upstream service and status class",
            requests.clone(),
        );
        let grpc_responses = Family::default();
        registry.register(
            "grpc_responses",
            "gRPC calls by direction, service and the grpc-status they ended with (from trailers-only headers or the trailers); a stream that broke before its status is INTERNAL",
            grpc_responses.clone(),
        );
        let latency = Family::new_with_constructor(LatencyBuckets);
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by direction and service",
            latency.clone(),
        );
        let proxy_errors = Family::default();
        registry.register(
            "proxy_errors",
            "Requests the proxy answered itself, by kind of failure",
            proxy_errors.clone(),
        );
        let endpoints = Family::default();
        registry.register(
            "endpoints",
            "Ready endpoints known for each upstream service",
            endpoints.clone(),
        );
        let connections = Family::default();
        registry.register(
            "connections_active",
            "Client connections open on each listener",
            connections.clone(),
        );
        let policy_reloads = Family::default();
        registry.register(
            "policy_reloads",
            "Policies offered to the sidecar, by result (applied or rejected)",
            policy_reloads.clone(),
        );
        let policy_generation = Gauge::default();
        registry.register(
            "policy_generation",
            "How many policies have been applied since start (the running policy's version)",
            policy_generation.clone(),
        );
        let policy_valid = Gauge::default();
        registry.register(
            "policy_last_reload_ok",
            "1 when the last policy offered was applied, 0 when it was rejected",
            policy_valid.clone(),
        );
        let breaker_state = Family::default();
        registry.register(
            "circuit_breaker_state",
            "1 for the state each dependency's circuit breaker is in (closed, open, half-open), 0 for the others",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::default();
        registry.register(
            "circuit_breaker_transitions",
            "Circuit breaker state changes, by dependency, from and to",
            breaker_transitions.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Retries sent, by dependency and what was retried (connect-failure, 5xx, 429, timeout, grpc)",
            retries.clone(),
        );
        let budget_exhausted = Family::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the dependency's retry budget was spent",
            budget_exhausted.clone(),
        );
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
        let ejections = Family::default();
        registry.register(
            "outlier_ejections",
            "Endpoints taken out of a dependency's balancer for consecutive failures",
            ejections.clone(),
        );
        let ejected = Family::default();
        registry.register(
            "outlier_ejected_endpoints",
            "Endpoints of each dependency currently ejected",
            ejected.clone(),
        );
        let trace_spans = Family::default();
        registry.register(
            "trace_spans",
            "Sampled spans by what became of them: exported, dropped (export queue full) or failed (the collector refused or could not be reached)",
            trace_spans.clone(),
        );
        Self(Arc::new(Inner {
            registry,
            handles: Default::default(),
            trace_spans,
            breaker_state,
            breaker_transitions,
            retries,
            budget_exhausted,
            rate_limited,
            shed,
            ejections,
            ejected,
            requests,
            grpc_responses,
            latency,
            proxy_errors,
            endpoints,
            connections,
            policy_reloads,
            policy_generation,
            policy_valid,
        }))
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The class of a status code (`2xx`, `4xx`...) and its index.
fn status_class(status: http::StatusCode) -> (usize, &'static str) {
    match status.as_u16() {
        100..=199 => (0, "1xx"),
        200..=299 => (1, "2xx"),
        300..=399 => (2, "3xx"),
        400..=499 => (3, "4xx"),
        _ => (4, "5xx"),
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

    /// Records one finished request.
    pub fn record_request(
        &self,
        direction: Direction,
        service: &str,
        status: http::StatusCode,
        elapsed: std::time::Duration,
        proxy_error: Option<&str>,
    ) {
        let handles = self.handles(direction, service);
        let (class, status_class) = status_class(status);
        handles.requests[class]
            .get_or_init(|| {
                self.0
                    .requests
                    .get_or_create(&RequestLabels {
                        direction,
                        service: service.to_owned(),
                        status_class,
                    })
                    .clone()
            })
            .inc();
        handles
            .latency
            .get_or_init(|| {
                self.0
                    .latency
                    .get_or_create(&LatencyLabels {
                        direction,
                        service: service.to_owned(),
                    })
                    .clone()
            })
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = proxy_error {
            self.0
                .proxy_errors
                .get_or_create(&ErrorLabels {
                    direction,
                    service: service.to_owned(),
                    kind: kind.to_owned(),
                })
                .inc();
        }
    }

    /// Counts a gRPC call that ended with `code`.
    pub fn record_grpc(&self, direction: Direction, service: &str, code: GrpcCode) {
        self.0
            .grpc_responses
            .get_or_create(&GrpcLabels {
                direction,
                service: service.to_owned(),
                grpc_code: code.name(),
            })
            .inc();
    }

    /// The cached handles of `service` in `direction` (made at first use).
    fn handles(&self, direction: Direction, service: &str) -> Arc<ServiceHandles> {
        let map = &self.0.handles[direction as usize];
        if let Some(h) = map.read().expect("metrics handle lock").get(service) {
            return h.clone();
        }
        map.write()
            .expect("metrics handle lock")
            .entry(service.into())
            .or_default()
            .clone()
    }

    /// Sets the ready endpoint count of a service.
    pub fn set_endpoints(&self, service: &str, n: usize) {
        self.0
            .endpoints
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The gauge of open connections on a listener.
    pub fn connections(&self, listener: &'static str) -> Gauge {
        self.0
            .connections
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// Records a policy offered: applied (with the new generation) or rejected.
    pub fn record_policy(&self, applied: bool, generation: u64) {
        let result = if applied { "applied" } else { "rejected" };
        self.0
            .policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        self.0.policy_valid.set(i64::from(applied));
        if applied {
            self.0
                .policy_generation
                .set(i64::try_from(generation).unwrap_or(i64::MAX));
        }
    }
}

/// The metrics of the resilience layers.
impl Metrics {
    /// Sets the breaker state gauge of `service` (one series per state, 1 for the current).
    pub fn set_breaker_state(&self, service: &str, state: &'static str) {
        for s in ["closed", "open", "half-open"] {
            self.0
                .breaker_state
                .get_or_create(&BreakerLabels {
                    service: service.to_owned(),
                    state: s,
                })
                .set(i64::from(s == state));
        }
    }

    /// Counts a breaker transition and updates the state gauge.
    pub fn breaker_transition(&self, service: &str, from: &'static str, to: &'static str) {
        self.0
            .breaker_transitions
            .get_or_create(&TransitionLabels {
                service: service.to_owned(),
                from,
                to,
            })
            .inc();
        self.set_breaker_state(service, to);
    }

    /// Counts one retry sent.
    pub fn retry(&self, service: &str, reason: &'static str) {
        self.0
            .retries
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason,
            })
            .inc();
    }

    fn count(family: &Family<ServiceLabels, Counter>, service: &str) {
        family
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts a retry refused by the budget.
    pub fn budget_exhausted(&self, service: &str) {
        Self::count(&self.0.budget_exhausted, service);
    }

    /// Counts an inbound request refused by the rate limit.
    pub fn rate_limited(&self, service: &str) {
        Self::count(&self.0.rate_limited, service);
    }

    /// Counts an inbound request shed by the concurrency limit.
    pub fn shed(&self, service: &str) {
        Self::count(&self.0.shed, service);
    }

    /// Counts `n` sampled spans that were `exported`, `dropped` or `failed`.
    pub fn trace_spans(&self, outcome: &'static str, n: u64) {
        self.0
            .trace_spans
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(n);
    }

    /// Counts an ejection and sets how many endpoints of `service` are out.
    pub fn ejection(&self, service: &str, ejected_now: usize) {
        Self::count(&self.0.ejections, service);
        self.set_ejected(service, ejected_now);
    }

    /// Sets how many endpoints of `service` are ejected.
    pub fn set_ejected(&self, service: &str, n: usize) {
        self.0
            .ejected
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
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
