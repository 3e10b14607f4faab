//! The `MicroService` custom resource (`trellis.dev/v1alpha1`).
//!
//! Every field carries a doc comment: it becomes the field's `description` in
//! the CRD, which is what `kubectl explain microservice.spec...` prints.
//! Validation lives in the schema itself (types, ranges, patterns, enums and
//! CEL rules), so the apiserver refuses a bad resource at `kubectl apply` and
//! names the field; the operator never sees it.
//!
//! The resilience, inbound, tracing, health and dependency types are the
//! sidecar's own policy types from `trellis-policy`: the schema users write,
//! the operator's renderer and the sidecar's parser are one type.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::ResourceRequirements,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_policy::{Dependency, Egress, HealthCheck, Inbound, Protocol, Resilience, Tracing};

/// The API group of every Trellis resource.
pub const GROUP: &str = "trellis.dev";

/// Ports the sidecar binds in every pod; the application may not use them.
pub const RESERVED_PORTS: [i32; 3] = [15001, 15006, 15020];

/// The desired state of a MicroService: the application, how many copies of
/// it run, its configuration and what the Trellis sidecar enforces around it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "MicroService",
    plural = "microservices",
    singular = "microservice",
    shortname = "ms",
    category = "trellis",
    namespaced,
    status = "MicroServiceStatus",
    derive = "PartialEq",
    doc = "A MicroService is one application run by Trellis: the operator turns it into a \
           Deployment with the Trellis sidecar, a Service, configuration, RBAC and, optionally, \
           a PodDisruptionBudget and a HorizontalPodAutoscaler.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every desired replica is ready"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.replicaSummary",
        description = "Ready replicas / desired replicas"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Progressing, Ready, Degraded or Failed"
    ),
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".status.url",
        description = "Where other services in the cluster reach this one"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new(SELF_DEPENDENCY_RULE)
        .message("a service may not depend on itself")
        .field_path(".spec.dependencies"),
    validation = kube::core::Rule::new(NAME_RULE).message(NAME_MESSAGE)
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(self.port in [15001, 15006, 15020])",
    "message": "port 15001, 15006 and 15020 are used by the Trellis sidecar",
    "fieldPath": ".port",
}, {
    "rule": DEPENDENCY_PER_TRY_RULE,
    "message": "a dependency's perTryTimeout (its own or resilience.perTryTimeout) must not exceed its timeout (its own or resilience.timeout)",
    "fieldPath": ".dependencies",
}]))]
pub struct MicroServiceSpec {
    /// The application's container image, such as `trellis/order-service:0.1.0`.
    /// Its tag becomes the `app.kubernetes.io/version` label.
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s\v\x{85}\p{Z}]+$"))]
    pub image: String,

    /// How many pods run the service. Ignored while `autoscaling` is set, when the
    /// HorizontalPodAutoscaler decides. A PodDisruptionBudget keeps one pod
    /// available through voluntary disruptions when more than one runs.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// The port the application listens on inside the pod (it may bind 127.0.0.1
    /// only: the sidecar reaches it over localhost). Not 15001, 15006 or 15020,
    /// which the sidecar uses.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// The application's protocol: `HTTP` (HTTP/1.1 and HTTP/2) or `GRPC` (gRPC
    /// over cleartext HTTP/2). The Service port is named after it.
    #[serde(default)]
    pub protocol: Protocol,

    /// The application's configuration: stored in the ConfigMap `<name>-config`,
    /// exposed as environment variables and mounted as files under
    /// `/etc/trellis/config`. A change rolls the pods unless `hotReload` is true.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": CONFIG_KEY_RULE,
        "message": CONFIG_KEY_MESSAGE,
    }, {
        "rule": CONFIG_SIZE_RULE,
        "message": CONFIG_SIZE_MESSAGE,
    }]))]
    pub config: BTreeMap<String, String>,

    /// Secrets in the MicroService's own namespace whose keys the application
    /// reads, by name only: their values never appear in the MicroService, its
    /// status or the `<name>-config` ConfigMap. Each is given to the app
    /// container as environment variables (`env`, the default) and/or as
    /// read-only files under `/etc/trellis/secrets/<name>` (`files`); the
    /// sidecar gets none of them. A change of a listed Secret rolls the pods
    /// unless `hotReload` is true. A key in both `config` and a Secret takes
    /// the Secret's value (the later Secret's, when in two). The operator
    /// applies nothing until every listed Secret exists, and says which one
    /// is missing in the ReconcileFailed condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub secrets: Vec<SecretRef>,

    /// The application's own health check, polled by the sidecar; the pod is
    /// ready only while it passes. Defaults to GET `/health` every 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,

    /// The services this one calls, by Service name, each with optional
    /// overrides of `resilience`. Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub dependencies: Vec<Dependency>,

    /// How calls to dependencies are protected (deadlines, retries, circuit
    /// breaking): the defaults for every dependency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resilience: Option<Resilience>,

    /// Protection for the application itself: rate, concurrency and time limits
    /// on the requests it receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Inbound>,

    /// Distributed tracing by the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,

    /// Calls to destinations outside the mesh — hosts that are neither
    /// dependencies nor Services the sidecar can read — are forwarded by DNS
    /// (`Allow`, the default) or refused with 403 naming the host (`Deny`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,

    /// Scale on CPU with a HorizontalPodAutoscaler instead of a fixed `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,

    /// CPU and memory for the application container (the sidecar has its own).
    /// When set, used as given (Kubernetes defaults a missing request to its
    /// limit). When unset: requests `cpu: 50m` and `memory: 64Mi`, a memory
    /// limit of `256Mi`, and no CPU limit. Only `cpu`, `memory` and
    /// `ephemeral-storage` may be named, each a valid quantity, requests no
    /// more than limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": RESOURCE_NAMES_RULE,
        "message": RESOURCE_NAMES_MESSAGE,
    }, {
        "rule": RESOURCE_QUANTITY_RULE,
        "message": RESOURCE_QUANTITY_MESSAGE,
    }, {
        "rule": RESOURCE_REQUESTS_RULE,
        "message": RESOURCE_REQUESTS_MESSAGE,
        "fieldPath": ".requests",
    }]))]
    pub resources: Option<ResourceRequirements>,

    /// When true, a change of `config` or of a Secret in `secrets` does not
    /// roll the pods: the mounted files under `/etc/trellis/config` and
    /// `/etc/trellis/secrets` update in place (environment variables do not).
    #[serde(default)]
    pub hot_reload: bool,
}

/// The root CEL rule: a MicroService may not list itself as a dependency. CEL
/// at the root can see `metadata.name` but not `metadata.namespace`, so a
/// dependency with an explicit namespace passes here; the operator refuses a
/// self-dependency in the own namespace when it renders the policy.
pub const SELF_DEPENDENCY_RULE: &str = "!has(self.spec.dependencies) || \
     self.spec.dependencies.all(d, d.name != self.metadata.name || has(d.__namespace__))";

/// The root CEL rule on the name: every child is named after the
/// MicroService, and a Service's name must be a DNS-1035 label.
pub const NAME_RULE: &str =
    "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
/// What [`NAME_RULE`] says when it refuses a name.
pub const NAME_MESSAGE: &str = "metadata.name must be a DNS-1035 label, as the Service named after \
     it must be: at most 63 characters, lowercase letters, digits and '-', starting with a letter \
     and ending with a letter or digit";

/// A dependency's effective per-try timeout may not exceed its effective
/// timeout; the default timeout is [`trellis_policy::Resilience`]'s (2s).
pub const DEPENDENCY_PER_TRY_RULE: &str = "!has(self.dependencies) || self.dependencies.all(d, \
     !(has(d.perTryTimeout) || (has(self.resilience) && has(self.resilience.perTryTimeout))) || \
     duration(has(d.perTryTimeout) ? d.perTryTimeout : self.resilience.perTryTimeout) <= \
     duration(has(d.timeout) ? d.timeout : has(self.resilience) ? self.resilience.timeout : '2s'))";

/// Config keys are ConfigMap keys.
pub const CONFIG_KEY_RULE: &str = "self.all(k, k.matches('^[-._a-zA-Z0-9]+$') && size(k) <= 253 \
     && k != '.' && !k.startsWith('..'))";
/// What [`CONFIG_KEY_RULE`] says when it refuses a key.
pub const CONFIG_KEY_MESSAGE: &str = "config keys may contain only letters, digits, '-', '_' and \
     '.', at most 253 of them, and may not be '.' or start with '..'";
/// The most a ConfigMap may hold, keys and values together.
pub const CONFIG_MAX_BYTES: usize = 1024 * 1024;
/// The config fits in its ConfigMap. CEL counts characters, not bytes, so
/// text beyond ASCII can pass here and still be refused by the operator.
pub const CONFIG_SIZE_RULE: &str = "self.map(k, size(k) + size(self[k])).sum() <= 1048576";
/// What [`CONFIG_SIZE_RULE`] says when it refuses a config.
pub const CONFIG_SIZE_MESSAGE: &str =
    "config keys and values together must not exceed 1 MiB, the most a ConfigMap holds";

/// The resources the application container may name.
pub const RESOURCE_NAMES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];
/// Only [`RESOURCE_NAMES`] in `requests` and `limits`.
pub const RESOURCE_NAMES_RULE: &str = "(!has(self.requests) || self.requests.all(k, k in \
     ['cpu', 'memory', 'ephemeral-storage'])) && (!has(self.limits) || self.limits.all(k, k in \
     ['cpu', 'memory', 'ephemeral-storage']))";
/// What [`RESOURCE_NAMES_RULE`] says.
pub const RESOURCE_NAMES_MESSAGE: &str =
    "requests and limits may name only cpu, memory and ephemeral-storage";
/// Every request and limit is a non-negative quantity.
pub const RESOURCE_QUANTITY_RULE: &str = "(!has(self.requests) || self.requests.all(k, \
     isQuantity(string(self.requests[k])) && !quantity(string(self.requests[k])).isLessThan(quantity('0')))) && \
     (!has(self.limits) || self.limits.all(k, isQuantity(string(self.limits[k])) && \
     !quantity(string(self.limits[k])).isLessThan(quantity('0'))))";
/// What [`RESOURCE_QUANTITY_RULE`] says.
pub const RESOURCE_QUANTITY_MESSAGE: &str =
    "requests and limits must be non-negative quantities, such as 250m, 0.5 or 128Mi";
/// No request above its limit.
pub const RESOURCE_REQUESTS_RULE: &str = "!has(self.requests) || !has(self.limits) || \
     self.requests.all(k, !(k in self.limits) || !isQuantity(string(self.requests[k])) || \
     !isQuantity(string(self.limits[k])) || \
     quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)";
/// What [`RESOURCE_REQUESTS_RULE`] says.
pub const RESOURCE_REQUESTS_MESSAGE: &str = "each request must not exceed its limit";

fn default_replicas() -> i32 {
    1
}

/// The most Secrets a MicroService may list.
pub const MAX_SECRETS: usize = 32;
/// A Secret's name is a DNS subdomain: lowercase letters, digits, '-' and
/// '.', each dot-separated part starting and ending with a letter or digit.
pub const SECRET_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A listed Secret reaches the app one way at least.
pub const SECRET_USE_RULE: &str = "self.env || self.files";
/// What [`SECRET_USE_RULE`] says when it refuses an entry.
pub const SECRET_USE_MESSAGE: &str =
    "at least one of env and files must be true, or the Secret reaches the app neither way";

/// A Secret the application reads, named, never copied: the kubelet hands
/// its keys to the app container, so its values stay in the Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": SECRET_USE_RULE,
    "message": SECRET_USE_MESSAGE,
}]))]
pub struct SecretRef {
    /// The Secret's name, in the MicroService's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,
    /// Every key of the Secret becomes an environment variable of the app
    /// container (keys that are not valid variable names are skipped by the
    /// kubelet, which records an event). Default true.
    #[serde(default = "default_true")]
    pub env: bool,
    /// Every key of the Secret becomes a read-only file under
    /// `/etc/trellis/secrets/<name>`, readable by the app's user and no other.
    /// Default false.
    #[serde(default)]
    pub files: bool,
}

impl SecretRef {
    /// A Secret given as environment variables only, the default.
    pub fn env(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            env: true,
            files: false,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Horizontal pod autoscaling on CPU utilisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "minReplicas must not exceed maxReplicas",
    "fieldPath": ".minReplicas",
}]))]
pub struct Autoscaling {
    /// The fewest pods the autoscaler keeps.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: i32,
    /// The most pods the autoscaler may run.
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// The average CPU utilisation to aim for, in percent of the requested CPU.
    /// Set `resources.requests.cpu`, or the autoscaler has nothing to compare with.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: i32,
}

fn default_min_replicas() -> i32 {
    1
}

fn default_target_cpu() -> i32 {
    80
}

/// Where a MicroService stands, as last seen by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicroServiceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The pods the Deployment wants.
    #[serde(default)]
    pub replicas: i32,
    /// The pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// `readyReplicas/replicas`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_summary: Option<String>,
    /// Pending, Progressing, Ready, Degraded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The in-cluster URL of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The identity its pods prove over mutual TLS (`spiffe://…/ns/<ns>/sa/<name>`);
    /// unset when the mesh runs without identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// How callers are checked: `mtls <Strict|Permissive>`, and the
    /// authorization mode with its number of rules, or `any caller`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<String>,
    /// Ready, Progressing, Degraded and ReconcileFailed, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
}

/// A one-word summary of a MicroService's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted; the Deployment has not reported yet.
    Pending,
    /// A rollout is under way.
    Progressing,
    /// Every desired replica is ready and up to date.
    Ready,
    /// Running, but with fewer ready replicas than desired, or a stalled rollout.
    Degraded,
    /// The operator cannot reconcile it; see the ReconcileFailed condition.
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The CRD as installed: the derived one, tidied for the apiserver.
///
/// - schemars writes `format: uint32` and `uint16` for unsigned fields; those
///   are not OpenAPI formats Kubernetes knows (their `minimum` already says
///   what they mean), so they are dropped.
/// - `resources.claims` (dynamic resource allocation) needs pod-level claims
///   the operator does not render, so it is not offered.
/// - `resources.limits` and `requests` get bounds (3 names, quantities of at
///   most 64 characters) so the CEL rules on them stay within the
///   apiserver's cost budget.
///
/// (CEL escapes property names that are CEL keywords, hence
/// `d.__namespace__` in [`SELF_DEPENDENCY_RULE`].)
pub fn crd() -> CustomResourceDefinition {
    let mut crd = MicroService::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            tidy(schema);
            if let Some(resources) = schema
                .properties
                .as_mut()
                .and_then(|p| p.get_mut("spec"))
                .and_then(|s| s.properties.as_mut())
                .and_then(|p| p.get_mut("resources"))
                .and_then(|r| r.properties.as_mut())
            {
                resources.remove("claims");
                for key in ["limits", "requests"] {
                    let Some(list) = resources.get_mut(key) else {
                        continue;
                    };
                    list.max_properties = Some(RESOURCE_NAMES.len() as i64);
                    if let Some(JSONSchemaPropsOrBool::Schema(q)) =
                        list.additional_properties.as_mut()
                    {
                        q.max_length = Some(64);
                    }
                }
            }
        }
    }
    crd
}

/// Drops the `uint*` formats schemars writes, which Kubernetes does not know.
pub(crate) fn tidy(schema: &mut JSONSchemaProps) {
    if matches!(
        schema.format.as_deref(),
        Some("uint8" | "uint16" | "uint32" | "uint64")
    ) {
        schema.format = None;
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        tidy(child);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        tidy(items);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        tidy(extra);
    }
}

/// The CRD as YAML, the content of `crds/microservice.yaml`.
pub fn crd_yaml() -> String {
    let mut out = String::from(
        "# Generated by `cargo run -p trellis-operator --bin crdgen`; do not edit.\n\
         # CI checks it against the Rust types with `crdgen --check`.\n",
    );
    out.push_str(&serde_yaml::to_string(&crd()).expect("a CRD always serialises"));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn schema() -> Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn rules(v: &Value) -> Vec<String> {
        v["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["rule"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Every string, array and map under a CEL rule needs a bound, or the
    /// apiserver's cost estimate refuses the CRD; every node needs a type
    /// (structural schema) unless it is int-or-string or preserves unknown fields.
    fn walk(path: &str, v: &Value, problems: &mut Vec<String>) {
        let o = v.as_object().unwrap();
        for key in [
            "oneOf",
            "anyOf",
            "allOf",
            "not",
            "$ref",
            "definitions",
            "$defs",
        ] {
            if o.contains_key(key) {
                problems.push(format!("{path}: has {key}"));
            }
        }
        if o.get("format")
            .and_then(Value::as_str)
            .is_some_and(|f| f.starts_with("uint"))
        {
            problems.push(format!("{path}: format {}", o["format"]));
        }
        let typed = o.contains_key("type")
            || o.contains_key("x-kubernetes-int-or-string")
            || o.contains_key("x-kubernetes-preserve-unknown-fields");
        if !typed {
            problems.push(format!("{path}: no type"));
        }
        if o.get("type") == Some(&Value::from("array")) && !o.contains_key("maxItems") {
            problems.push(format!("{path}: array without maxItems"));
        }
        for (k, child) in o
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            walk(&format!("{path}.{k}"), child, problems);
        }
        if let Some(items) = o.get("items") {
            walk(&format!("{path}[]"), items, problems);
        }
        if let Some(extra) = o.get("additionalProperties").filter(|v| v.is_object()) {
            walk(&format!("{path}{{}}"), extra, problems);
        }
    }

    #[test]
    fn names_scope_and_subresources() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("microservices.trellis.dev")
        );
        assert_eq!(crd.spec.group, "trellis.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "MicroService");
        assert_eq!(crd.spec.names.short_names, Some(vec!["ms".to_owned()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.served && v.storage);
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
                ("Replicas", ".status.replicaSummary"),
                ("Phase", ".status.phase"),
                ("URL", ".status.url"),
                ("Age", ".metadata.creationTimestamp"),
            ]
        );
    }

    #[test]
    fn schema_is_structural_and_bounded() {
        let mut problems = Vec::new();
        walk("", &schema(), &mut problems);
        // Resource lists from k8s-openapi have no maxItems and no CEL on them.
        problems.retain(|p| !p.starts_with(".spec.resources"));
        assert!(problems.is_empty(), "{problems:#?}");
    }

    /// kubectl reads YAML 1.1, where `on`, `off`, `yes`, `no`, `y` and `n` are
    /// booleans: a property with such a name cannot be written in a manifest.
    #[test]
    fn no_property_name_is_a_yaml_1_1_boolean() {
        fn walk(path: &str, v: &Value, bad: &mut Vec<String>) {
            for (k, child) in v["properties"].as_object().into_iter().flatten() {
                let p = format!("{path}.{k}");
                let lower = k.to_ascii_lowercase();
                if ["y", "n", "yes", "no", "on", "off", "true", "false"].contains(&lower.as_str()) {
                    bad.push(p.clone());
                }
                walk(&p, child, bad);
                walk(&format!("{p}[]"), &child["items"], bad);
            }
        }
        let mut bad = Vec::new();
        walk("", &schema(), &mut bad);
        assert!(bad.is_empty(), "{bad:?}");
    }

    #[test]
    fn every_field_is_documented() {
        fn walk(path: &str, v: &Value, missing: &mut Vec<String>) {
            for (k, child) in v["properties"].as_object().into_iter().flatten() {
                let p = format!("{path}.{k}");
                if child.get("description").is_none() {
                    missing.push(p.clone());
                }
                walk(&p, child, missing);
                walk(&format!("{p}[]"), &child["items"], missing);
            }
        }
        let mut missing = Vec::new();
        walk("", &schema(), &mut missing);
        missing.retain(|p| p != ".spec" && p != ".status");
        assert!(missing.is_empty(), "{missing:#?}");
    }

    #[test]
    fn cel_rules_are_in_the_schema() {
        let s = schema();
        let spec = &s["properties"]["spec"]["properties"];
        assert_eq!(rules(&s), [SELF_DEPENDENCY_RULE, NAME_RULE]);
        assert!(SELF_DEPENDENCY_RULE.contains("d.name != self.metadata.name"));
        assert_eq!(
            rules(&s["properties"]["spec"]),
            [
                "!(self.port in [15001, 15006, 15020])",
                DEPENDENCY_PER_TRY_RULE
            ]
        );
        // The default timeout the rule assumes is the policy's.
        assert!(DEPENDENCY_PER_TRY_RULE.contains(&format!(
            "'{}'",
            trellis_policy::Resilience::default().timeout
        )));
        assert_eq!(
            rules(&spec["resources"]),
            [
                RESOURCE_NAMES_RULE,
                RESOURCE_QUANTITY_RULE,
                RESOURCE_REQUESTS_RULE
            ]
        );
        let nonzero = [trellis_policy::NONZERO_DURATION_RULE];
        let resilience = &spec["resilience"]["properties"];
        let breaker = &resilience["circuitBreaker"]["properties"];
        let dependency = &spec["dependencies"]["items"]["properties"];
        for duration in [
            &spec["health"]["properties"]["timeout"],
            &resilience["timeout"],
            &breaker["interval"],
            &breaker["openFor"],
            &dependency["timeout"],
            &dependency["circuitBreaker"]["properties"]["openFor"],
        ] {
            assert_eq!(rules(duration), nonzero, "{duration:#}");
        }
        for may_be_zero in [
            &spec["health"]["properties"]["interval"],
            &resilience["perTryTimeout"],
            &resilience["retry"]["properties"]["backoff"]["properties"]["base"],
        ] {
            assert!(rules(may_be_zero).is_empty(), "{may_be_zero:#}");
        }
        assert_eq!(
            rules(&spec["autoscaling"]),
            ["self.minReplicas <= self.maxReplicas"]
        );
        assert_eq!(
            rules(&spec["resilience"]),
            ["!has(self.perTryTimeout) || duration(self.perTryTimeout) <= duration(self.timeout)"]
        );
        assert_eq!(
            rules(&spec["resilience"]["properties"]["retry"]["properties"]["backoff"]),
            ["duration(self.base) <= duration(self.max)"]
        );
        assert_eq!(rules(&spec["secrets"]["items"]), [SECRET_USE_RULE]);
        assert_eq!(rules(&spec["config"]), [CONFIG_KEY_RULE, CONFIG_SIZE_RULE]);
        assert!(CONFIG_SIZE_RULE.contains(&CONFIG_MAX_BYTES.to_string()));
    }

    #[test]
    fn ranges_patterns_and_list_types() {
        let s = schema();
        let spec = &s["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["image", "port"]));
        let p = &spec["properties"];
        assert_eq!(
            (
                p["replicas"]["minimum"].as_f64(),
                p["replicas"]["maximum"].as_f64()
            ),
            (Some(0.0), Some(100.0))
        );
        assert_eq!(p["replicas"]["default"], 1);
        assert_eq!(
            (p["port"]["minimum"].as_f64(), p["port"]["maximum"].as_f64()),
            (Some(1.0), Some(65535.0))
        );
        assert_eq!(p["protocol"]["enum"], serde_json::json!(["HTTP", "GRPC"]));
        assert_eq!(p["dependencies"]["x-kubernetes-list-type"], "map");
        assert_eq!(
            p["dependencies"]["x-kubernetes-list-map-keys"],
            serde_json::json!(["name"])
        );
        assert_eq!(p["dependencies"]["maxItems"], 64);
        let dep = &p["dependencies"]["items"]["properties"];
        assert_eq!(dep["name"]["pattern"], "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$");
        assert_eq!(dep["timeout"]["pattern"], trellis_policy::DURATION_PATTERN);
        let cb = &p["resilience"]["properties"]["circuitBreaker"]["properties"];
        assert_eq!(cb["halfOpenRequests"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(cb["failureRatio"]["exclusiveMinimum"], true);
        assert_eq!(cb["failureRatio"]["maximum"].as_f64(), Some(1.0));
        assert!(p["resources"]["properties"].get("claims").is_none());
        let secrets = &p["secrets"];
        assert_eq!(secrets["x-kubernetes-list-type"], "map");
        assert_eq!(
            secrets["x-kubernetes-list-map-keys"],
            serde_json::json!(["name"])
        );
        assert_eq!(secrets["maxItems"], MAX_SECRETS);
        let secret = &secrets["items"];
        assert_eq!(secret["required"], serde_json::json!(["name"]));
        let secret = &secret["properties"];
        assert_eq!(secret["name"]["pattern"], SECRET_NAME_PATTERN);
        assert_eq!(secret["name"]["maxLength"], 253);
        assert_eq!(secret["env"]["default"], true);
        assert_eq!(secret["files"]["default"], false);
        assert_eq!(
            s["properties"]["status"]["properties"]["conditions"]["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
    }

    #[test]
    fn a_minimal_spec_gets_defaults() {
        let spec: MicroServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "order:1", "port": 8080})).unwrap();
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.protocol, Protocol::Http);
        assert!(!spec.hot_reload);
        assert!(spec.config.is_empty() && spec.dependencies.is_empty());
        assert!(spec.secrets.is_empty());
    }

    #[test]
    fn a_secret_named_alone_is_given_as_environment_variables() {
        let spec: MicroServiceSpec = serde_json::from_value(serde_json::json!({
            "image": "order:1", "port": 8080, "secrets": [{"name": "order-db"}],
        }))
        .unwrap();
        assert_eq!(spec.secrets, [SecretRef::env("order-db")]);
        // A MicroService without secrets serialises without the field.
        let none: MicroServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "order:1", "port": 8080})).unwrap();
        assert!(
            serde_json::to_value(&none)
                .unwrap()
                .get("secrets")
                .is_none()
        );
    }

    #[test]
    fn yaml_starts_with_the_generated_notice() {
        let y = crd_yaml();
        assert!(y.starts_with("# Generated by"));
        assert!(y.contains("kind: CustomResourceDefinition"));
    }
}
