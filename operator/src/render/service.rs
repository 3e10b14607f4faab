//! The `<name>` Service: the MicroService's stable address. Separate because
//! its one port is the only way in, and it leads to the sidecar's inbound
//! listener, never to the application, with the port name and
//! `appProtocol` following `spec.protocol` (HTTP or gRPC over h2c).

use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};
use trellis_policy::Protocol;

use super::{INBOUND_PORT, Renderer, s, selector_labels};

/// The label naming the ServiceAccount of a MicroService's pods (the
/// sidecar's discovery reads it under the same name).
pub const SERVICE_ACCOUNT_LABEL: &str = "trellis.dev/service-account";

impl Renderer<'_> {
    pub(super) fn service(&self) -> Service {
        let (port_name, app_protocol) = match self.ms.spec.protocol {
            Protocol::Http => ("http", "http"),
            Protocol::Grpc => ("grpc", "kubernetes.io/h2c"),
        };
        let mut metadata = self.meta(self.name.clone());
        // The ServiceAccount its pods run as: the EndpointSlice controller
        // copies it onto the slices, where callers' sidecars read whom the
        // endpoints must prove to be over mutual TLS.
        metadata
            .labels
            .get_or_insert_default()
            .insert(s(SERVICE_ACCOUNT_LABEL), self.name.clone());
        Service {
            metadata,
            spec: Some(ServiceSpec {
                type_: Some(s("ClusterIP")),
                selector: Some(selector_labels(&self.name)),
                ports: Some(vec![ServicePort {
                    name: Some(s(port_name)),
                    port: 80,
                    protocol: Some(s("TCP")),
                    app_protocol: Some(s(app_protocol)),
                    target_port: Some(IntOrString::Int(INBOUND_PORT)),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }
}
