//! Pure rendering: a `MicroService` in, the Kubernetes objects that run it out.
//!
//! Nothing here talks to a cluster, so every field of every child is unit
//! tested. The controller applies what [`render`] returns with server-side
//! apply; a field left out here is a field the operator does not own.
//!
//! This module is the public surface: the constants the sidecar and the
//! controller share with the renderer, [`RenderConfig`], [`Children`],
//! [`render`] and the names of the children. Each child kind is rendered in
//! its own module, as methods of the private `Renderer`:
//!
//! - `labels`: the labels and metadata every child carries.
//! - `app_config`: the application's ConfigMap and its checksum.
//! - `policy`: the sidecar policy and its ConfigMap.
//! - `rbac`: the ServiceAccount, Role and RoleBinding of the pods.
//! - `deployment`: the Deployment and its pod template's metadata.
//! - `pod`: the pod spec: pod security, volumes, topology spread.
//! - `containers`: the sidecar and application containers.
//! - `secrets`: the Secrets the app reads, by name, and their checksum.
//! - `service`: the Service.
//! - `disruption_budget`: the PodDisruptionBudget.
//! - `autoscaler`: the HorizontalPodAutoscaler.

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{ConfigMap, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{Role, RoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{Resource, ResourceExt};

use crate::crd::MicroService;

mod app_config;
mod autoscaler;
mod containers;
mod deployment;
mod disruption_budget;
mod labels;
mod pod;
mod policy;
mod rbac;
mod secrets;
mod service;

pub use app_config::config_checksum;
pub use containers::{
    admin_probe, default_app_resources, env_var, field_env, restricted_security_context,
};
pub use labels::{image_version, selector_labels};
pub use pod::IDENTITY_TOKEN_DIR;
pub use policy::sidecar_policy;
pub use secrets::{SECRET_FILE_MODE, SecretVersions, secrets_checksum};

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
/// The pod template annotation holding the sha256 of the names, uids and
/// resourceVersions of the Secrets in `spec.secrets` (never their values).
pub const SECRETS_CHECKSUM_ANNOTATION: &str = "trellis.dev/secrets-checksum";
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
/// Where each Secret given as files is mounted, in a folder named after it.
pub const SECRETS_MOUNT: &str = "/etc/trellis/secrets";
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
    /// The mesh identity every sidecar gets (trust domain, trust bundle,
    /// the identity service's address); `None`: sidecars speak plaintext.
    pub mesh: Option<trellis_policy::MeshIdentity>,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            sidecar_image: DEFAULT_SIDECAR_IMAGE.into(),
            cluster_domain: "cluster.local".into(),
            otlp_endpoint: None,
            mesh: None,
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

/// Renders every child of a MicroService. `secrets` holds the versions of
/// the Secrets it lists (`spec.secrets`), read by the caller; a MicroService
/// that lists none renders the same with [`SecretVersions::new`].
pub fn render(
    ms: &MicroService,
    cfg: &RenderConfig,
    secrets: &SecretVersions,
) -> Result<Children, RenderError> {
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
    let mut policy = sidecar_policy(ms)?;
    policy.identity = cfg.mesh.clone();
    let r = Renderer {
        ms,
        cfg,
        secrets,
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

/// The in-cluster URL of a MicroService.
pub fn service_url(name: &str, ns: &str, cluster_domain: &str) -> String {
    format!("http://{name}.{ns}.svc.{cluster_domain}")
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

/// One MicroService being rendered: what every child's method reads. Each
/// child kind adds its methods in its own module.
struct Renderer<'a> {
    ms: &'a MicroService,
    cfg: &'a RenderConfig,
    secrets: &'a SecretVersions,
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

#[cfg(test)]
mod tests;
