//! A Gateway's data plane as Kubernetes objects: the Trellis sidecar in
//! gateway mode, its Service (one port per listener port, the Gateway's
//! address), its configuration Secret and its RBAC.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy},
        core::v1::{
            Container, ContainerPort, EmptyDirVolumeSource, PodSecurityContext, PodSpec,
            PodTemplateSpec, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, Secret,
            Service, ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec,
            Sysctl, Volume, VolumeMount, VolumeProjection,
        },
        rbac::v1::{ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use trellis_policy::{
    CircuitBreaker, Dependency, Egress, FailureKind, MeshIdentity, SidecarPolicy,
    gateway::{BackendService, GATEWAY_CONFIG_KEY, GatewayConfig, PortConfig},
};

use super::api::Gateway;
use crate::render::{admin_probe, env_var, field_env, restricted_security_context};

/// The label naming the Gateway a data-plane object belongs to.
pub const GATEWAY_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The label on every data-plane object, with value [`MANAGER`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Who manages the data-plane objects (also the field manager).
pub const MANAGER: &str = "trellis-gateway";
/// The gateway's admin port: health, metrics, status.
pub const ADMIN_PORT: i32 = 15020;

/// What every Gateway's data plane is built with.
#[derive(Clone, Debug)]
pub struct DeploySettings {
    /// The sidecar image (run in gateway mode).
    pub image: String,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
    /// Where spans go, when tracing is on.
    pub otlp_endpoint: Option<String>,
    /// The ClusterRole that lets a gateway read EndpointSlices.
    pub discovery_role: String,
    /// The controller name, whose hash labels the cluster-wide bindings
    /// (see [`CONTROLLER_LABEL`]).
    pub controller_name: String,
    /// Installed for one namespace (the chart's `watchNamespace`): each
    /// gateway's routes reach only Services of that namespace, so its
    /// discovery binding is a RoleBinding there, owned by the Gateway.
    pub namespaced: bool,
}

/// The label on a gateway's ClusterRoleBinding naming (by hash) the
/// controller that made it: each controller deletes only its own stale
/// bindings, so two releases in one cluster leave each other's alone.
pub const CONTROLLER_LABEL: &str = "trellis.dev/gateway-controller";

/// The value of [`CONTROLLER_LABEL`] for `controller` (a label value is at
/// most 63 characters and has no `/`).
pub fn controller_label(controller: &str) -> String {
    hex::encode(&Sha256::digest(controller.as_bytes())[..8])
}

/// A Gateway's data-plane objects.
pub struct Children {
    /// The gateway's identity.
    pub service_account: ServiceAccount,
    /// Its configuration (holds TLS keys, hence a Secret).
    pub config: Secret,
    /// Reading its own configuration.
    pub role: Role,
    /// Binding `role`.
    pub role_binding: RoleBinding,
    /// Reading EndpointSlices in every namespace its routes send to.
    pub discovery: DiscoveryBinding,
    /// The gateway pods.
    pub deployment: Deployment,
    /// Its address; `None` while it has no listener.
    pub service: Option<Service>,
}

/// A gateway's grant to read EndpointSlices (the chart's discovery
/// ClusterRole), as wide as the controller's own view.
pub enum DiscoveryBinding {
    /// Every namespace: cluster-wide, so no owner reference can collect
    /// it; labelled by controller, and deleted when its Gateway is gone.
    Cluster(ClusterRoleBinding),
    /// The Gateway's own namespace, owned by the Gateway.
    Namespace(RoleBinding),
}

/// The name of a Gateway's data-plane objects in its namespace, at most
/// 63 characters.
pub fn child_name(gateway: &str) -> String {
    bounded(&format!("{gateway}-trellis-gateway"))
}

/// The name of a Gateway's ClusterRoleBinding (cluster-wide, so it carries
/// the namespace).
pub fn binding_name(namespace: &str, gateway: &str) -> String {
    bounded(&format!("trellis-gateway-{namespace}-{gateway}"))
}

fn bounded(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_owned();
    }
    let hash = hex::encode(&Sha256::digest(name.as_bytes())[..4]);
    format!("{}-{hash}", name[..54].trim_end_matches('-'))
}

fn labels(gateway: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GATEWAY_LABEL.to_owned(), gateway.to_owned()),
        (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
        (
            "app.kubernetes.io/name".to_owned(),
            "trellis-gateway".to_owned(),
        ),
    ])
}

fn selector(gateway: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GATEWAY_LABEL.to_owned(), gateway.to_owned()),
        (
            "app.kubernetes.io/name".to_owned(),
            "trellis-gateway".to_owned(),
        ),
    ])
}

/// The policy a gateway enforces as a mesh client: its backends as
/// dependencies, everything else outside the mesh refused.
pub fn gateway_policy(
    gw: &Gateway,
    backends: &BTreeSet<BackendService>,
    mesh: Option<MeshIdentity>,
) -> SidecarPolicy {
    let namespace = gw.namespace().unwrap_or_default();
    let mut deps: Vec<Dependency> = Vec::new();
    for b in backends {
        if deps
            .iter()
            .any(|d| d.name == b.name && d.namespace_or(&namespace) == b.namespace)
        {
            continue;
        }
        let mut d = Dependency::named(b.name.clone());
        d.namespace = Some(b.namespace.clone());
        // A backend's own 5xx answers pass through to the client: an edge
        // whose breaker opened on them would turn a backend's brief failure
        // (one that already fails fast itself) into an outage of its own for
        // `openFor`. An unreachable or hanging backend still trips it.
        d.circuit_breaker = Some(CircuitBreaker {
            failure_on: vec![FailureKind::ConnectFailure, FailureKind::Timeout],
            ..CircuitBreaker::default()
        });
        deps.push(d);
    }
    let mut policy: SidecarPolicy = serde_json::from_value(serde_json::json!({
        "service": gw.name_any(),
        "namespace": namespace,
        // A gateway has no application; the port is not used.
        "appPort": ADMIN_PORT,
    }))
    .expect("a minimal policy parses");
    policy.dependencies = deps;
    policy.egress = Egress::Deny;
    policy.identity = mesh;
    policy
}

/// Every data-plane object of `gw`, serving `ports`.
pub fn render(
    gw: &Gateway,
    ports: &[PortConfig],
    backends: &BTreeSet<BackendService>,
    mesh: Option<MeshIdentity>,
    settings: &DeploySettings,
) -> Children {
    let gw_name = gw.name_any();
    let namespace = gw.namespace().unwrap_or_default();
    let name = child_name(&gw_name);
    let owner = gw.controller_owner_ref(&()).map(|mut o: OwnerReference| {
        o.block_owner_deletion = Some(true);
        o
    });
    let meta = |n: &str| ObjectMeta {
        name: Some(n.to_owned()),
        namespace: Some(namespace.clone()),
        labels: Some(labels(&gw_name)),
        owner_references: owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    let has_mesh = mesh.is_some();
    let config = GatewayConfig {
        gateway: format!("{namespace}/{gw_name}"),
        policy: gateway_policy(gw, backends, mesh),
        ports: ports.to_vec(),
    };
    let listener_ports: BTreeSet<i32> = gw.spec.listeners.iter().map(|l| l.port).collect();
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: name.clone(),
        namespace: Some(namespace.clone()),
        ..Subject::default()
    };
    let discovery_role = RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: "ClusterRole".into(),
        name: settings.discovery_role.clone(),
    };
    Children {
        service_account: ServiceAccount {
            metadata: meta(&name),
            automount_service_account_token: Some(true),
            ..ServiceAccount::default()
        },
        config: Secret {
            metadata: meta(&name),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                GATEWAY_CONFIG_KEY.to_owned(),
                ByteString(config.to_json().into_bytes()),
            )])),
            ..Secret::default()
        },
        role: Role {
            metadata: meta(&name),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["secrets".into()]),
                resource_names: Some(vec![name.clone()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..PolicyRule::default()
            }]),
        },
        role_binding: RoleBinding {
            metadata: meta(&name),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.clone(),
            },
            subjects: Some(vec![subject.clone()]),
        },
        discovery: if settings.namespaced {
            DiscoveryBinding::Namespace(RoleBinding {
                metadata: meta(&bounded(&format!("{name}-discovery"))),
                role_ref: discovery_role,
                subjects: Some(vec![subject]),
            })
        } else {
            DiscoveryBinding::Cluster(ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(binding_name(&namespace, &gw_name)),
                    labels: Some({
                        let mut l = labels(&gw_name);
                        l.insert("trellis.dev/gateway-namespace".into(), namespace.clone());
                        l.insert(
                            CONTROLLER_LABEL.into(),
                            controller_label(&settings.controller_name),
                        );
                        l
                    }),
                    ..ObjectMeta::default()
                },
                role_ref: discovery_role,
                subjects: Some(vec![subject]),
            })
        },
        deployment: deployment(
            meta(&name),
            &gw_name,
            &name,
            &listener_ports,
            has_mesh,
            settings,
        ),
        service: (!listener_ports.is_empty()).then(|| Service {
            metadata: meta(&name),
            spec: Some(ServiceSpec {
                selector: Some(selector(&gw_name)),
                ports: Some(
                    listener_ports
                        .iter()
                        .map(|p| ServicePort {
                            name: Some(format!("port-{p}")),
                            port: *p,
                            target_port: Some(IntOrString::Int(*p)),
                            protocol: Some("TCP".into()),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }),
    }
}

fn deployment(
    meta: ObjectMeta,
    gw_name: &str,
    name: &str,
    ports: &BTreeSet<i32>,
    mesh: bool,
    settings: &DeploySettings,
) -> Deployment {
    let mut env = vec![
        env_var("TRELLIS_GATEWAY_SECRET", name),
        env_var("TRELLIS_SERVICE", gw_name),
        env_var("TRELLIS_SERVICE_ACCOUNT", name),
        env_var("TRELLIS_CLUSTER_DOMAIN", settings.cluster_domain.clone()),
        // The gateway's ports bind on this address; nothing is served on
        // the inbound port itself.
        env_var("TRELLIS_INBOUND_ADDR", "0.0.0.0:15006"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_NAME", "metadata.name"),
    ];
    if let Some(endpoint) = &settings.otlp_endpoint {
        env.push(env_var("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
    }
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    if mesh {
        volumes.push(Volume {
            name: "identity-token".into(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o444),
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        audience: Some(trellis_identity::api::TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                    }),
                    ..VolumeProjection::default()
                }]),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "identity-token".into(),
            mount_path: crate::render::IDENTITY_TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let q = |v: &str| Quantity(v.into());
    let container = Container {
        name: "gateway".into(),
        image: Some(settings.image.clone()),
        env: Some(env),
        ports: Some(
            ports
                .iter()
                .map(|p| ContainerPort {
                    container_port: *p,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                })
                .chain(std::iter::once(ContainerPort {
                    name: Some("admin".into()),
                    container_port: ADMIN_PORT,
                    ..ContainerPort::default()
                }))
                .collect(),
        ),
        readiness_probe: Some(admin_probe("/readyz", 2, 3)),
        liveness_probe: Some(admin_probe("/livez", 10, 3)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), q("50m")),
                ("memory".into(), q("32Mi")),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), q("128Mi"))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(restricted_security_context()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector(gw_name)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(gw_name)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.to_owned()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        // Listener ports below 1024 without root or a
                        // capability: a namespaced sysctl Kubernetes
                        // counts as safe.
                        sysctls: Some(vec![Sysctl {
                            name: "net.ipv4.ip_unprivileged_port_start".into(),
                            value: "0".into(),
                        }]),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(15),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_runs_restricted_and_reads_only_its_own_configuration() {
        let gw: Gateway = serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": "shop", "uid": "u-1"},
            "spec": {"gatewayClassName": "trellis", "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP"},
                {"name": "https", "port": 443, "protocol": "HTTPS"},
            ]},
        }))
        .unwrap();
        let settings = DeploySettings {
            image: "trellis/sidecar:0.1.0".into(),
            cluster_domain: "cluster.local".into(),
            otlp_endpoint: None,
            discovery_role: "trellis-operator-gateway".into(),
            controller_name: "trellis.dev/gateway-controller".into(),
            namespaced: false,
        };
        let c = render(&gw, &[], &BTreeSet::new(), None, &settings);
        let pod = c.deployment.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.containers[0].security_context,
            Some(restricted_security_context())
        );
        let sysctls = pod.security_context.unwrap().sysctls.unwrap();
        assert_eq!(sysctls[0].name, "net.ipv4.ip_unprivileged_port_start");
        let ports: Vec<i32> = c
            .service
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [80, 443]);
        let rules = c.role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resource_names,
            Some(vec!["edge-trellis-gateway".to_owned()])
        );
        let config = &c.config.data.unwrap()[GATEWAY_CONFIG_KEY];
        let parsed = GatewayConfig::from_json(std::str::from_utf8(&config.0).unwrap()).unwrap();
        assert_eq!(parsed.gateway, "shop/edge");
        assert_eq!(
            parsed.policy.egress,
            Egress::Deny,
            "a gateway reaches its backends only"
        );
        let backends = BTreeSet::from([BackendService {
            namespace: "shop".into(),
            name: "order".into(),
            port: 80,
            h2c: false,
        }]);
        let policy = gateway_policy(&gw, &backends, None);
        let breaker = policy.dependencies[0].circuit_breaker.as_ref().unwrap();
        assert!(
            !breaker.failure_on.contains(&FailureKind::ServerError),
            "a backend's own 5xx does not open the gateway's breaker"
        );
        assert!(breaker.failure_on.contains(&FailureKind::ConnectFailure));
        let DiscoveryBinding::Cluster(binding) = c.discovery else {
            panic!("installed for every namespace, a gateway's discovery is cluster-wide");
        };
        assert_eq!(
            binding.metadata.name.as_deref(),
            Some("trellis-gateway-shop-edge")
        );
        assert_eq!(binding.role_ref.name, "trellis-operator-gateway");

        // Installed for one namespace: a RoleBinding there, which the
        // Gateway owns (deleted with it).
        let one = DeploySettings {
            namespaced: true,
            ..settings
        };
        let c = render(&gw, &[], &BTreeSet::new(), None, &one);
        let DiscoveryBinding::Namespace(binding) = c.discovery else {
            panic!("installed for one namespace, a gateway's discovery is a RoleBinding");
        };
        assert_eq!(binding.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(
            binding.metadata.owner_references.unwrap()[0].uid,
            "u-1",
            "owned by its Gateway"
        );
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(binding.role_ref.name, "trellis-operator-gateway");
        assert_eq!(
            binding.subjects.unwrap()[0].name,
            "edge-trellis-gateway",
            "the gateway's own ServiceAccount"
        );
    }

    #[test]
    fn long_names_are_bounded_and_stay_distinct() {
        let a = child_name(&"a".repeat(70));
        let b = child_name(&format!("{}b", "a".repeat(69)));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
    }
}
