//! Requests through both listeners: counts by status class, latency,
//! gRPC codes, the proxy's own answers, and open connections.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, RwLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use trellis_policy::GrpcCode;

use super::{Direction, Metrics};

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
struct ListenerLabels {
    listener: &'static str,
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
type HandleCache = [RwLock<HashMap<Box<str>, Arc<ServiceHandles>>>; 3];

/// The traffic families.
pub(super) struct Families {
    handles: HandleCache,
    requests: Family<RequestLabels, Counter>,
    grpc_responses: Family<GrpcLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, LatencyBuckets>,
    proxy_errors: Family<ErrorLabels, Counter>,
    connections: Family<ListenerLabels, Gauge>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
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
        let connections = Family::default();
        registry.register(
            "connections_active",
            "Client connections open on each listener",
            connections.clone(),
        );
        Self {
            handles: Default::default(),
            requests,
            grpc_responses,
            latency,
            proxy_errors,
            connections,
        }
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
    /// Records one finished request.
    pub fn record_request(
        &self,
        direction: Direction,
        service: &str,
        status: http::StatusCode,
        elapsed: std::time::Duration,
        proxy_error: Option<&str>,
    ) {
        let families = &self.0.traffic;
        let handles = self.handles(direction, service);
        let (class, status_class) = status_class(status);
        handles.requests[class]
            .get_or_init(|| {
                families
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
                families
                    .latency
                    .get_or_create(&LatencyLabels {
                        direction,
                        service: service.to_owned(),
                    })
                    .clone()
            })
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = proxy_error {
            families
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
            .traffic
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
        let map = &self.0.traffic.handles[direction as usize];
        if let Some(h) = map.read().expect("metrics handle lock").get(service) {
            return h.clone();
        }
        map.write()
            .expect("metrics handle lock")
            .entry(service.into())
            .or_default()
            .clone()
    }

    /// The gauge of open connections on a listener.
    pub fn connections(&self, listener: &'static str) -> Gauge {
        self.0
            .traffic
            .connections
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }
}
