//! Pure rendering: a `MicroService` in, the Kubernetes objects that run it out.
//!
//! Nothing here talks to a cluster, so every field of every child is unit
//! tested. The controller applies what [`render`] returns with server-side
//! apply; a field left out here is a field the operator does not own.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        autoscaling::v2::{
            CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
            MetricSpec, MetricTarget, ResourceMetricSource,
        },
        core::v1::{
            Capabilities, ConfigMap, ConfigMapEnvSource, ConfigMapProjection,
            ConfigMapVolumeSource, Container, ContainerPort, DownwardAPIProjection,
            DownwardAPIVolumeFile, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource,
            HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec,
            PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
            SecurityContext, Service, ServiceAccount, ServiceAccountTokenProjection, ServicePort,
            ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount, VolumeProjection,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use trellis_policy::{POLICY_KEY, Protocol, SidecarPolicy};

use crate::crd::MicroService;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "trellis-operator";

/// The label every object the operator makes carries, with [`FIELD_MANAGER`]
/// as its value; the watches select children by it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The label selector of every object the operator makes.
pub fn managed_by_selector() -> String {
    format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}")
}
/// The pod template annotation holding the sha256 of the app config.
pub const CONFIG_CHECKSUM_ANNOTATION: &str = "trellis.dev/config-checksum";
/// The name of the sidecar container (a native sidecar: an init container that keeps running).
pub const SIDECAR_CONTAINER: &str = "trellis-sidecar";
/// The name of the application container.
pub const APP_CONTAINER: &str = "app";
/// The sidecar's inbound listener: the Service sends traffic here.
pub const INBOUND_PORT: i32 = 15006;
/// The sidecar's outbound listener on 127.0.0.1: the application's way out.
pub const OUTBOUND_PORT: i32 = 15001;
/// The sidecar's admin listener: /livez, /readyz, /healthz, /metrics.
pub const ADMIN_PORT: i32 = 15020;
/// Where the application's config files are mounted.
pub const CONFIG_MOUNT: &str = "/etc/trellis/config";
/// Where the sidecar policy is mounted, for the sidecar's first start.
pub const POLICY_MOUNT: &str = "/etc/trellis/policy";
/// The user and group both containers run as.
pub const RUN_AS: i64 = 65532;
/// The application container's CPU request when `spec.resources` is unset:
/// enough to schedule a small service honestly, small enough that the shop
/// (three services, two replicas each) fits a two-core node with room to spare.
pub const DEFAULT_APP_CPU_REQUEST: &str = "50m";
/// The application container's memory request when `spec.resources` is unset:
/// about what an idle axum/tonic service with a database pool holds.
pub const DEFAULT_APP_MEMORY_REQUEST: &str = "64Mi";
/// The application container's memory limit when `spec.resources` is unset:
/// a leak is OOM-killed in its own container instead of pressing the node.
/// There is no default CPU limit: CPU is compressible, and a CFS quota
/// throttles a service's tail latency long before the node is short of CPU.
pub const DEFAULT_APP_MEMORY_LIMIT: &str = "256Mi";
/// The topology keys a MicroService's replicas are spread over, in order.
pub const SPREAD_TOPOLOGY_KEYS: [&str; 2] =
    ["kubernetes.io/hostname", "topology.kubernetes.io/zone"];

/// The default sidecar image.
pub const DEFAULT_SIDECAR_IMAGE: &str = "trellis/sidecar:0.1.0";

/// What rendering needs besides the MicroService itself.
#[derive(Clone, Debug)]
pub struct RenderConfig {
    /// The sidecar container image.
    pub sidecar_image: String,
    /// The cluster's DNS domain, for the status URL.
    pub cluster_domain: String,
    /// Where sidecars export spans (OTLP/gRPC), passed to them as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` leaves tracing off.
    pub otlp_endpoint: Option<String>,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            sidecar_image: DEFAULT_SIDECAR_IMAGE.into(),
            cluster_domain: "cluster.local".into(),
            otlp_endpoint: None,
        }
    }
}

/// Everything one MicroService is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    /// `<name>-config`: the application's configuration.
    pub config: ConfigMap,
    /// `<name>-sidecar`: the sidecar policy.
    pub policy: ConfigMap,
    /// `<name>`: the identity of the pods, used by the sidecar only.
    pub service_account: ServiceAccount,
    /// `<name>-sidecar`: what the sidecar may read.
    pub role: Role,
    /// `<name>-sidecar`: binds the Role to the ServiceAccount.
    pub role_binding: RoleBinding,
    /// `<name>`: the application and its sidecar.
    pub deployment: Deployment,
    /// `<name>`: the stable address, to the sidecar's inbound port.
    pub service: Service,
    /// `<name>`: when more than one pod runs.
    pub pdb: Option<PodDisruptionBudget>,
    /// `<name>`: when `spec.autoscaling` is set.
    pub hpa: Option<HorizontalPodAutoscaler>,
}

/// Why a MicroService cannot be rendered (the CRD's schema refuses most of
/// these; this is the last line for what CEL cannot see).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The object lacks a name, namespace or uid (it was not read from the apiserver).
    #[error("MicroService is missing metadata.{0}")]
    MissingMetadata(&'static str),
    /// The MicroService breaks a rule of its CRD or of the sidecar policy
    /// ([`crate::validate`]); each field at fault is listed.
    #[error("invalid MicroService: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<trellis_policy::FieldError>),
}

/// The names of a MicroService's children.
pub fn config_map_name(name: &str) -> String {
    format!("{name}-config")
}

/// The name of the sidecar policy ConfigMap, Role and RoleBinding.
pub fn sidecar_name(name: &str) -> String {
    format!("{name}-sidecar")
}

/// Renders every child of a MicroService.
pub fn render(ms: &MicroService, cfg: &RenderConfig) -> Result<Children, RenderError> {
    let name = ms
        .metadata
        .name
        .clone()
        .ok_or(RenderError::MissingMetadata("name"))?;
    let ns = ms
        .metadata
        .namespace
        .clone()
        .ok_or(RenderError::MissingMetadata("namespace"))?;
    let owner = ms
        .controller_owner_ref(&())
        .ok_or(RenderError::MissingMetadata("uid"))?;
    let policy = sidecar_policy(ms)?;
    let r = Renderer {
        ms,
        cfg,
        name,
        ns,
        owner,
    };
    Ok(Children {
        config: r.config_map(),
        policy: r.policy_config_map(&policy),
        service_account: r.service_account(),
        role: r.role(),
        role_binding: r.role_binding(),
        deployment: r.deployment(),
        service: r.service(),
        pdb: r.pdb(),
        hpa: r.hpa(),
    })
}

/// The sidecar policy for a MicroService, validated with the MicroService
/// itself ([`crate::validate::all`]).
pub fn sidecar_policy(ms: &MicroService) -> Result<SidecarPolicy, RenderError> {
    let s = &ms.spec;
    let policy = SidecarPolicy {
        service: ms.name_any(),
        namespace: ms.namespace().unwrap_or_default(),
        app_port: u16::try_from(s.port).unwrap_or(0),
        protocol: s.protocol,
        health: s.health.clone().unwrap_or_default(),
        resilience: s.resilience.clone().unwrap_or_default(),
        dependencies: s.dependencies.clone(),
        inbound: s.inbound.clone().unwrap_or_default(),
        tracing: s.tracing.clone().unwrap_or_default(),
        egress: s.egress.unwrap_or_default(),
    };
    let errors = crate::validate::all(&ms.name_any(), s, &policy);
    if !errors.is_empty() {
        return Err(RenderError::Invalid(errors));
    }
    Ok(policy)
}

/// The sha256 (hex) of the application config, as put on the pod template.
pub fn config_checksum(config: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    // Length-prefixed so that {"a": "bc"} and {"ab": "c"} differ.
    for (k, v) in config {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The `app.kubernetes.io/version` label: the image tag, made a valid label value.
pub fn image_version(image: &str) -> Option<String> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_segment = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let tag = match last_segment.rsplit_once(':') {
        Some((_, tag)) => tag,
        None if image.contains('@') => return None,
        None => "latest",
    };
    let mut v: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    let v = v.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    (!v.is_empty()).then(|| v.to_owned())
}

/// The in-cluster URL of a MicroService.
pub fn service_url(name: &str, ns: &str, cluster_domain: &str) -> String {
    format!("http://{name}.{ns}.svc.{cluster_domain}")
}

/// The labels that select a MicroService's pods (stable across updates).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), name.into()),
        ("app.kubernetes.io/instance".into(), name.into()),
    ])
}

/// The application container's resources when `spec.resources` is unset:
/// [`DEFAULT_APP_CPU_REQUEST`], [`DEFAULT_APP_MEMORY_REQUEST`] and
/// [`DEFAULT_APP_MEMORY_LIMIT`].
pub fn default_app_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            (s("cpu"), Quantity(s(DEFAULT_APP_CPU_REQUEST))),
            (s("memory"), Quantity(s(DEFAULT_APP_MEMORY_REQUEST))),
        ])),
        limits: Some(BTreeMap::from([(
            s("memory"),
            Quantity(s(DEFAULT_APP_MEMORY_LIMIT)),
        )])),
        ..ResourceRequirements::default()
    }
}

struct Renderer<'a> {
    ms: &'a MicroService,
    cfg: &'a RenderConfig,
    name: String,
    ns: String,
    owner: OwnerReference,
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

impl Renderer<'_> {
    /// The recommended labels every child carries.
    fn labels(&self) -> BTreeMap<String, String> {
        let mut l = selector_labels(&self.name);
        l.insert("app.kubernetes.io/part-of".into(), "trellis".into());
        l.insert(MANAGED_BY_LABEL.into(), FIELD_MANAGER.into());
        l
    }

    /// The labels of the Deployment and its pods: those of every child plus
    /// `app.kubernetes.io/version`. Only the versioned objects carry it, so an
    /// image update rewrites the Deployment and nothing else.
    fn versioned_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels();
        if let Some(v) = image_version(&self.ms.spec.image) {
            l.insert("app.kubernetes.io/version".into(), v);
        }
        l
    }

    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.ns.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    fn config_map(&self) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(config_map_name(&self.name)),
            data: Some(self.ms.spec.config.clone()),
            ..ConfigMap::default()
        }
    }

    fn policy_config_map(&self, policy: &SidecarPolicy) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(sidecar_name(&self.name)),
            data: Some(BTreeMap::from([(POLICY_KEY.into(), policy.to_json())])),
            ..ConfigMap::default()
        }
    }

    fn service_account(&self) -> ServiceAccount {
        ServiceAccount {
            metadata: self.meta(self.name.clone()),
            // The token is projected into the sidecar alone (see `pod_spec`).
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        }
    }

    /// The sidecar may read EndpointSlices (discovery) and its own policy
    /// ConfigMap, nothing else. `resourceNames` restricts get by name; for
    /// list and watch the apiserver honours it only when the request carries
    /// `fieldSelector=metadata.name=<name>-sidecar`, which is how the sidecar
    /// watches it.
    fn role(&self) -> Role {
        Role {
            metadata: self.meta(sidecar_name(&self.name)),
            rules: Some(vec![
                PolicyRule {
                    api_groups: Some(strings(&["discovery.k8s.io"])),
                    resources: Some(strings(&["endpointslices"])),
                    verbs: strings(&["get", "list", "watch"]),
                    ..PolicyRule::default()
                },
                PolicyRule {
                    api_groups: Some(strings(&[""])),
                    resources: Some(strings(&["configmaps"])),
                    resource_names: Some(vec![sidecar_name(&self.name)]),
                    verbs: strings(&["get", "list", "watch"]),
                    ..PolicyRule::default()
                },
            ]),
        }
    }

    fn role_binding(&self) -> RoleBinding {
        RoleBinding {
            metadata: self.meta(sidecar_name(&self.name)),
            role_ref: RoleRef {
                api_group: s("rbac.authorization.k8s.io"),
                kind: s("Role"),
                name: sidecar_name(&self.name),
            },
            subjects: Some(vec![Subject {
                kind: s("ServiceAccount"),
                name: self.name.clone(),
                namespace: Some(self.ns.clone()),
                ..Subject::default()
            }]),
        }
    }

    fn security_context() -> SecurityContext {
        SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(strings(&["ALL"])),
                ..Capabilities::default()
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: s("RuntimeDefault"),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }
    }

    fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
        Probe {
            http_get: Some(HTTPGetAction {
                path: Some(s(path)),
                port: IntOrString::Int(ADMIN_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(period),
            timeout_seconds: Some(1),
            failure_threshold: Some(failures),
            ..Probe::default()
        }
    }

    fn env(name: &str, value: impl Into<String>) -> EnvVar {
        EnvVar {
            name: s(name),
            value: Some(value.into()),
            ..EnvVar::default()
        }
    }

    fn field_env(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: s(name),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: s(path),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }
    }

    fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
        VolumeMount {
            name: s(name),
            mount_path: s(path),
            read_only: read_only.then_some(true),
            ..VolumeMount::default()
        }
    }

    /// Who the sidecar serves and where its policy is; the trace endpoint and
    /// the version its spans carry when tracing is on.
    fn sidecar_env(&self) -> Vec<EnvVar> {
        let mut env = vec![
            Self::env("TRELLIS_SERVICE", self.name.clone()),
            Self::env("TRELLIS_POLICY_CONFIGMAP", sidecar_name(&self.name)),
            Self::field_env("POD_NAMESPACE", "metadata.namespace"),
            Self::field_env("POD_NAME", "metadata.name"),
        ];
        if let Some(endpoint) = &self.cfg.otlp_endpoint {
            env.push(Self::env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
            if let Some(version) = image_version(&self.ms.spec.image) {
                env.push(Self::env("TRELLIS_SERVICE_VERSION", version));
            }
        }
        env
    }

    /// The sidecar, as a native sidecar (init container with `restartPolicy: Always`).
    ///
    /// Its startup probe is `/livez`, not `/readyz`: the app container starts
    /// only once the sidecar's startup probe passes, and `/readyz` includes the
    /// app's own health, so waiting on it would wait forever.
    fn sidecar(&self) -> Container {
        Container {
            name: s(SIDECAR_CONTAINER),
            image: Some(self.cfg.sidecar_image.clone()),
            image_pull_policy: Some(s("IfNotPresent")),
            restart_policy: Some(s("Always")),
            ports: Some(vec![
                ContainerPort {
                    name: Some(s("inbound")),
                    container_port: INBOUND_PORT,
                    protocol: Some(s("TCP")),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some(s("admin")),
                    container_port: ADMIN_PORT,
                    protocol: Some(s("TCP")),
                    ..ContainerPort::default()
                },
            ]),
            env: Some(self.sidecar_env()),
            startup_probe: Some(Self::http_probe("/livez", 1, 60)),
            readiness_probe: Some(Self::http_probe("/readyz", 5, 3)),
            liveness_probe: Some(Self::http_probe("/livez", 10, 3)),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    (s("cpu"), Quantity(s("10m"))),
                    (s("memory"), Quantity(s("32Mi"))),
                ])),
                limits: Some(BTreeMap::from([(s("memory"), Quantity(s("256Mi")))])),
                ..ResourceRequirements::default()
            }),
            security_context: Some(Self::security_context()),
            volume_mounts: Some(vec![
                Self::mount("policy", POLICY_MOUNT, true),
                Self::mount("sidecar-tmp", "/tmp", false),
                Self::mount(
                    "sidecar-token",
                    "/var/run/secrets/kubernetes.io/serviceaccount",
                    true,
                ),
            ]),
            ..Container::default()
        }
    }

    fn app(&self) -> Container {
        let outbound = format!("http://127.0.0.1:{OUTBOUND_PORT}");
        Container {
            name: s(APP_CONTAINER),
            image: Some(self.ms.spec.image.clone()),
            image_pull_policy: Some(s("IfNotPresent")),
            env: Some(vec![
                Self::env("PORT", self.ms.spec.port.to_string()),
                Self::env("HTTP_PROXY", outbound.clone()),
                Self::env("TRELLIS_OUTBOUND", outbound),
                Self::env("NO_PROXY", "localhost,127.0.0.1"),
            ]),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: config_map_name(&self.name),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]),
            readiness_probe: Some(Self::http_probe("/readyz", 5, 3)),
            resources: Some(
                self.ms
                    .spec
                    .resources
                    .clone()
                    .unwrap_or_else(default_app_resources),
            ),
            security_context: Some(Self::security_context()),
            volume_mounts: Some(vec![
                Self::mount("config", CONFIG_MOUNT, true),
                Self::mount("app-tmp", "/tmp", false),
            ]),
            ..Container::default()
        }
    }

    fn volumes(&self) -> Vec<Volume> {
        let config_map = |volume: &str, cm: String| Volume {
            name: s(volume),
            config_map: Some(ConfigMapVolumeSource {
                name: cm,
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        };
        let empty_dir = |volume: &str| Volume {
            name: s(volume),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(s("64Mi"))),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        };
        // What the kubelet would automount, for the sidecar alone.
        let token = Volume {
            name: s("sidecar-token"),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o444),
                sources: Some(vec![
                    VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            path: s("token"),
                            expiration_seconds: Some(3607),
                            ..ServiceAccountTokenProjection::default()
                        }),
                        ..VolumeProjection::default()
                    },
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: s("kube-root-ca.crt"),
                            items: Some(vec![KeyToPath {
                                key: s("ca.crt"),
                                path: s("ca.crt"),
                                ..KeyToPath::default()
                            }]),
                            ..ConfigMapProjection::default()
                        }),
                        ..VolumeProjection::default()
                    },
                    VolumeProjection {
                        downward_api: Some(DownwardAPIProjection {
                            items: Some(vec![DownwardAPIVolumeFile {
                                path: s("namespace"),
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: s("metadata.namespace"),
                                    ..ObjectFieldSelector::default()
                                }),
                                ..DownwardAPIVolumeFile::default()
                            }]),
                        }),
                        ..VolumeProjection::default()
                    },
                ]),
            }),
            ..Volume::default()
        };
        vec![
            config_map("config", config_map_name(&self.name)),
            config_map("policy", sidecar_name(&self.name)),
            empty_dir("app-tmp"),
            empty_dir("sidecar-tmp"),
            token,
        ]
    }

    fn pod_spec(&self) -> PodSpec {
        PodSpec {
            service_account_name: Some(self.name.clone()),
            // The app gets no API token; the sidecar gets one through its own mount.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: s("RuntimeDefault"),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            init_containers: Some(vec![self.sidecar()]),
            containers: vec![self.app()],
            volumes: Some(self.volumes()),
            topology_spread_constraints: Some(self.spread()),
            ..PodSpec::default()
        }
    }

    /// One replica per node and per zone as far as they go, as a preference
    /// (`ScheduleAnyway`), so a single-node cluster still runs every replica.
    /// Counted per ReplicaSet (`pod-template-hash`), so a rollout's new pods
    /// spread among themselves rather than around the old ones.
    fn spread(&self) -> Vec<TopologySpreadConstraint> {
        SPREAD_TOPOLOGY_KEYS
            .iter()
            .map(|key| TopologySpreadConstraint {
                max_skew: 1,
                topology_key: s(key),
                when_unsatisfiable: s("ScheduleAnyway"),
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(&self.name)),
                    ..LabelSelector::default()
                }),
                match_label_keys: Some(strings(&["pod-template-hash"])),
                ..TopologySpreadConstraint::default()
            })
            .collect()
    }

    fn deployment(&self) -> Deployment {
        let spec = &self.ms.spec;
        let mut annotations = BTreeMap::from([(
            s("kubectl.kubernetes.io/default-container"),
            s(APP_CONTAINER),
        )]);
        if !spec.hot_reload {
            annotations.insert(s(CONFIG_CHECKSUM_ANNOTATION), config_checksum(&spec.config));
        }
        Deployment {
            metadata: ObjectMeta {
                labels: Some(self.versioned_labels()),
                ..self.meta(self.name.clone())
            },
            spec: Some(DeploymentSpec {
                // Left to the HorizontalPodAutoscaler when autoscaling.
                replicas: spec.autoscaling.is_none().then_some(spec.replicas),
                selector: LabelSelector {
                    match_labels: Some(selector_labels(&self.name)),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(self.versioned_labels()),
                        annotations: Some(annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(self.pod_spec()),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    fn service(&self) -> Service {
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

    /// A PodDisruptionBudget when more than one pod runs (or may run, with autoscaling).
    fn pdb(&self) -> Option<PodDisruptionBudget> {
        let spec = &self.ms.spec;
        let pods = spec
            .autoscaling
            .as_ref()
            .map_or(spec.replicas, |a| a.min_replicas);
        (pods > 1).then(|| PodDisruptionBudget {
            metadata: self.meta(self.name.clone()),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(&self.name)),
                    ..LabelSelector::default()
                }),
                unhealthy_pod_eviction_policy: Some(s("AlwaysAllow")),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        })
    }

    fn hpa(&self) -> Option<HorizontalPodAutoscaler> {
        let a = self.ms.spec.autoscaling.as_ref()?;
        Some(HorizontalPodAutoscaler {
            metadata: self.meta(self.name.clone()),
            spec: Some(HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some(s("apps/v1")),
                    kind: s("Deployment"),
                    name: self.name.clone(),
                },
                min_replicas: Some(a.min_replicas),
                max_replicas: a.max_replicas,
                metrics: Some(vec![MetricSpec {
                    type_: s("Resource"),
                    resource: Some(ResourceMetricSource {
                        name: s("cpu"),
                        target: MetricTarget {
                            type_: s("Utilization"),
                            average_utilization: Some(a.target_cpu_utilization),
                            ..MetricTarget::default()
                        },
                    }),
                    ..MetricSpec::default()
                }]),
                ..HorizontalPodAutoscalerSpec::default()
            }),
            ..HorizontalPodAutoscaler::default()
        })
    }
}

/// True when `owners` names `ms` as the controlling owner.
pub fn is_controlled_by(owners: Option<&[OwnerReference]>, ms: &MicroService) -> bool {
    let uid = ms.uid();
    owners.unwrap_or_default().iter().any(|o| {
        o.controller == Some(true)
            && Some(&o.uid) == uid.as_ref()
            && o.kind == MicroService::kind(&())
    })
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
