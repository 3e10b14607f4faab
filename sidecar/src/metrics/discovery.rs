//! Discovery: the ready endpoints known for each upstream service.

use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{Metrics, ServiceLabels};

/// The discovery families.
pub(super) struct Families {
    endpoints: Family<ServiceLabels, Gauge>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let endpoints = Family::default();
        registry.register(
            "endpoints",
            "Ready endpoints known for each upstream service",
            endpoints.clone(),
        );
        Self { endpoints }
    }
}

impl Metrics {
    /// Sets the ready endpoint count of a service.
    pub fn set_endpoints(&self, service: &str, n: usize) {
        self.0
            .discovery
            .endpoints
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
