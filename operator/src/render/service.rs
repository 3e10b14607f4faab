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

impl Renderer<'_> {
    pub(super) fn service(&self) -> Service {
        let (port_name, app_protocol) = match self.ms.spec.protocol {
            Protocol::Http => ("http", "http"),
            Protocol::Grpc => ("grpc", "kubernetes.io/h2c"),
        };
        Service {
            metadata: self.meta(self.name.clone()),
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
