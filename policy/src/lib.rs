//! The sidecar policy: what a Trellis sidecar enforces for one service.
//!
//! The operator renders a [`SidecarPolicy`] from a `MicroService` into the
//! ConfigMap `<name>-sidecar`; the sidecar parses it with [`SidecarPolicy::from_json`],
//! which also validates it, and keeps running the last good policy when a new
//! one is refused. The resilience types here are also the CRD's own
//! `spec.resilience`, `spec.inbound` and `spec.tracing`, so the schema users
//! write against, the operator's renderer and the sidecar's parser are one type.
//!
//! Field names are camelCase on the wire, like every Kubernetes API.

mod duration;
pub mod gateway;
mod validate;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use duration::{DURATION_PATTERN, Duration, NONZERO_DURATION_RULE, ParseDurationError};
pub use validate::{FieldError, PolicyError, is_dns_label};

/// The key under which the policy is stored in the `<name>-sidecar` ConfigMap.
pub const POLICY_KEY: &str = "policy.json";

/// Everything one sidecar enforces, rendered by the operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarPolicy {
    /// The service this sidecar serves (the MicroService's name).
    pub service: String,
    /// The namespace the service runs in; dependency names resolve here by default.
    pub namespace: String,
    /// The port the application listens on, on localhost.
    pub app_port: u16,
    /// The application's protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// The application's own health check, polled by the sidecar.
    #[serde(default)]
    pub health: HealthCheck,
    /// Defaults for every dependency.
    #[serde(default)]
    pub resilience: Resilience,
    /// The services this one calls, each with optional overrides of `resilience`.
    #[serde(default)]
    pub dependencies: Vec<Dependency>,
    /// Protection for the application itself.
    #[serde(default)]
    pub inbound: Inbound,
    /// Distributed tracing.
    #[serde(default)]
    pub tracing: Tracing,
    /// What becomes of calls to destinations outside the mesh.
    #[serde(default)]
    pub egress: Egress,
    /// The mesh identity: present when the mesh runs mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<MeshIdentity>,
}

impl SidecarPolicy {
    /// Parses and validates a policy; the error names every field at fault.
    pub fn from_json(json: &str) -> Result<Self, PolicyError> {
        let policy: Self = serde_json::from_str(json).map_err(PolicyError::Parse)?;
        policy.validate().map_err(PolicyError::Invalid)?;
        Ok(policy)
    }

    /// The policy as pretty JSON, the form stored in the ConfigMap.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a policy always serialises")
    }

    /// The dependency entry for Service `name` in `namespace`, if it is declared
    /// (a dependency without a namespace is in the policy's own).
    pub fn dependency(&self, name: &str, namespace: &str) -> Option<&Dependency> {
        self.dependencies
            .iter()
            .find(|d| d.name == name && d.namespace_or(&self.namespace) == namespace)
    }

    /// Whether the sidecar may discover Services in `namespace`: its own, and
    /// those its dependencies name, where the operator grants it read access.
    pub fn may_read(&self, namespace: &str) -> bool {
        self.namespace == namespace
            || self
                .dependencies
                .iter()
                .any(|d| d.namespace_or(&self.namespace) == namespace)
    }

    /// The resilience settings for calls to Service `name` in `namespace`:
    /// its dependency entry's overrides over the defaults when it is
    /// declared, the defaults when it is not.
    pub fn resilience_for(&self, name: &str, namespace: &str) -> Resilience {
        self.dependency(name, namespace)
            .map_or_else(|| self.resilience.clone(), |d| self.effective(d))
    }

    /// The effective settings for one dependency: its overrides over the defaults.
    pub fn effective(&self, dependency: &Dependency) -> Resilience {
        Resilience {
            timeout: dependency.timeout.unwrap_or(self.resilience.timeout),
            per_try_timeout: dependency
                .per_try_timeout
                .or(self.resilience.per_try_timeout),
            retry: dependency
                .retry
                .clone()
                .unwrap_or_else(|| self.resilience.retry.clone()),
            circuit_breaker: dependency
                .circuit_breaker
                .clone()
                .unwrap_or_else(|| self.resilience.circuit_breaker.clone()),
        }
    }
}

/// What the sidecar does with a call whose destination is neither a declared
/// dependency nor a Service it can discover: a name in a namespace it may
/// not read (`example.com` reads as Service `example` in namespace `com`),
/// a name that is no Service, an IP address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Egress {
    /// Resolve the host by DNS and forward the call, with the default
    /// `resilience.timeout` and metrics labelled `egress:<host>`.
    #[default]
    Allow,
    /// Refuse the call at once with 403, naming the host.
    Deny,
}

/// The protocol an application speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 when the client asks for it).
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// gRPC over cleartext HTTP/2 (h2c).
    #[serde(rename = "GRPC")]
    Grpc,
}

/// The application's own health check: an HTTP GET the sidecar polls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// The path to GET on the application; a 2xx answer means healthy.
    #[serde(default = "defaults::health_path")]
    #[schemars(regex(pattern = r"^/[^\s\v\x{85}\p{Z}]*$"), length(max = 256))]
    pub path: String,
    /// How often the sidecar polls the path.
    #[serde(default = "defaults::health_interval")]
    pub interval: Duration,
    /// How long one poll may take before it counts as failed.
    #[serde(default = "defaults::health_timeout")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": NONZERO_DURATION_RULE, "message": "must be more than zero, such as 1s",
    }]))]
    pub timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            path: defaults::health_path(),
            interval: defaults::health_interval(),
            timeout: defaults::health_timeout(),
        }
    }
}

/// A service this one calls, with optional overrides of the resilience defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dependency {
    /// The Kubernetes Service name of the dependency (a DNS label).
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,
    /// The dependency's namespace; the caller's own when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub namespace: Option<String>,
    /// Overrides `resilience.timeout` for this dependency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": NONZERO_DURATION_RULE, "message": "must be more than zero, such as 1s",
    }]))]
    pub timeout: Option<Duration>,
    /// Overrides `resilience.perTryTimeout` for this dependency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Overrides `resilience.retry` for this dependency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Overrides `resilience.circuitBreaker` for this dependency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

impl Dependency {
    /// A dependency with no overrides.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: None,
            timeout: None,
            per_try_timeout: None,
            retry: None,
            circuit_breaker: None,
        }
    }

    /// The namespace of the dependency's Service: the one it names, else
    /// `own`, the namespace of the service that depends on it.
    pub fn namespace_or<'a>(&'a self, own: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(own)
    }
}

/// How calls to dependencies are protected: deadlines, retries and a circuit breaker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.perTryTimeout) || duration(self.perTryTimeout) <= duration(self.timeout)",
    "message": "perTryTimeout must not exceed timeout",
    "fieldPath": ".perTryTimeout",
}]))]
pub struct Resilience {
    /// The overall deadline for one call, retries included. A call past it gets 504.
    #[serde(default = "defaults::timeout")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": NONZERO_DURATION_RULE, "message": "must be more than zero, such as 1s",
    }]))]
    pub timeout: Duration,
    /// The deadline for each try; unset means each try may use the whole `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Retries with exponential backoff and jitter, capped by a budget.
    #[serde(default)]
    pub retry: Retry,
    /// A circuit breaker with gobreaker semantics.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            timeout: defaults::timeout(),
            per_try_timeout: None,
            retry: Retry::default(),
            circuit_breaker: CircuitBreaker::default(),
        }
    }
}

/// Retries of failed calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// The most tries of one call, the first included: 1 turns retries off.
    #[serde(default = "defaults::attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub attempts: u32,
    /// The wait between tries.
    #[serde(default)]
    pub backoff: Backoff,
    /// Which failures are retried. Only idempotent methods (GET, HEAD, OPTIONS,
    /// PUT, DELETE) are retried unless the request carries `x-trellis-retryable: true`.
    //
    // On the wire this is `retryOn`, not `on`: kubectl reads YAML 1.1, where a
    // bare `on` key is the boolean `true`, so `on: [5xx]` in a manifest (and in
    // the CRD's own schema) would silently become a field named "true".
    // `on` is still accepted in JSON, where it is unambiguous.
    #[serde(default = "defaults::retry_on", rename = "retryOn", alias = "on")]
    #[schemars(length(max = 4))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub on: Vec<RetryOn>,
    /// The status codes that `5xx` retries.
    #[serde(default = "defaults::retry_statuses")]
    #[schemars(length(max = 16), inner(range(min = 500, max = 599)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub statuses: Vec<u16>,
    /// The largest request body buffered for replay; larger bodies are sent once.
    #[serde(default = "defaults::max_replay_bytes")]
    #[schemars(range(min = 0, max = 16_777_216))]
    pub max_replay_bytes: u32,
    /// Caps retries to a share of the traffic, so a failing upstream is not hit by a storm.
    #[serde(default)]
    pub budget: RetryBudget,
    /// The gRPC status codes retried, as in gRPC's own retry policy. gRPC
    /// calls (all `POST`) are retryable without `x-trellis-retryable`, but only
    /// on these codes, on `connect-failure` and on the statuses above; an empty
    /// list retries no gRPC status.
    #[serde(default = "defaults::grpc_codes")]
    #[schemars(length(max = 17))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub grpc_codes: Vec<GrpcCode>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: defaults::attempts(),
            backoff: Backoff::default(),
            on: defaults::retry_on(),
            statuses: defaults::retry_statuses(),
            max_replay_bytes: defaults::max_replay_bytes(),
            budget: RetryBudget::default(),
            grpc_codes: defaults::grpc_codes(),
        }
    }
}

/// A gRPC status code, by its canonical name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GrpcCode {
    /// 0: success.
    Ok,
    /// 1: the caller cancelled the call.
    Cancelled,
    /// 2: an error with no better code.
    Unknown,
    /// 3: the request is invalid whatever the server's state.
    InvalidArgument,
    /// 4: the deadline passed before the call completed.
    DeadlineExceeded,
    /// 5: what the request names does not exist.
    NotFound,
    /// 6: what the request would create exists.
    AlreadyExists,
    /// 7: the caller may not do this.
    PermissionDenied,
    /// 8: a quota or resource ran out.
    ResourceExhausted,
    /// 9: the system is not in the state the call needs.
    FailedPrecondition,
    /// 10: the call was aborted (a conflict, a failed transaction).
    Aborted,
    /// 11: past the valid range.
    OutOfRange,
    /// 12: the server does not implement the method.
    Unimplemented,
    /// 13: the server broke an invariant.
    Internal,
    /// 14: the service is unavailable for now; retrying is safe.
    Unavailable,
    /// 15: unrecoverable data loss.
    DataLoss,
    /// 16: the caller has no valid credentials.
    Unauthenticated,
}

impl GrpcCode {
    const ALL: [Self; 17] = [
        Self::Ok,
        Self::Cancelled,
        Self::Unknown,
        Self::InvalidArgument,
        Self::DeadlineExceeded,
        Self::NotFound,
        Self::AlreadyExists,
        Self::PermissionDenied,
        Self::ResourceExhausted,
        Self::FailedPrecondition,
        Self::Aborted,
        Self::OutOfRange,
        Self::Unimplemented,
        Self::Internal,
        Self::Unavailable,
        Self::DataLoss,
        Self::Unauthenticated,
    ];

    /// The code with number `n` (the value of `grpc-status`), if gRPC defines one.
    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.get(usize::from(n)).copied()
    }

    /// The code's number.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The canonical name, `UNAVAILABLE`.
    pub fn name(self) -> &'static str {
        [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ][usize::from(self.number())]
    }
}

/// A failure that may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    /// The connection could not be made (refused, reset before a response, no route).
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The upstream answered one of `retry.statuses`.
    #[serde(rename = "5xx")]
    ServerError,
    /// The upstream answered 429; its `Retry-After` is honoured.
    #[serde(rename = "429")]
    TooManyRequests,
    /// A try exceeded `perTryTimeout`.
    #[serde(rename = "timeout")]
    Timeout,
}

/// Exponential backoff: `min(max, base * multiplier^n)`, with full jitter when on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.base) <= duration(self.max)",
    "message": "backoff base must not exceed max",
    "fieldPath": ".base",
}]))]
pub struct Backoff {
    /// The wait before the first retry.
    #[serde(default = "defaults::backoff_base")]
    pub base: Duration,
    /// The longest wait between tries.
    #[serde(default = "defaults::backoff_max")]
    pub max: Duration,
    /// How much each wait grows over the last.
    #[serde(default = "defaults::multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,
    /// Randomise each wait between zero and its computed value (full jitter).
    #[serde(default = "defaults::yes")]
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: defaults::backoff_base(),
            max: defaults::backoff_max(),
            multiplier: defaults::multiplier(),
            jitter: true,
        }
    }
}

/// A retry budget like Linkerd's: retries may add at most `ratio` of the
/// original requests, plus `minPerSecond` so low traffic can still retry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed per original request, over a ten-second window.
    #[serde(default = "defaults::budget_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: f64,
    /// Retries always allowed per second, whatever the ratio.
    #[serde(default = "defaults::budget_min_per_second")]
    #[schemars(range(min = 0, max = 10_000))]
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: defaults::budget_ratio(),
            min_per_second: defaults::budget_min_per_second(),
        }
    }
}

/// A circuit breaker per dependency, with the semantics of sony/gobreaker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Trip when more than this many calls in a row fail.
    #[serde(default = "defaults::consecutive_failures")]
    #[schemars(range(min = 1, max = 10_000))]
    pub consecutive_failures: u32,
    /// Trip when the share of failed calls in the window exceeds this, in (0, 1].
    #[serde(default = "defaults::failure_ratio")]
    #[schemars(range(max = 1.0), extend("minimum" = 0.0, "exclusiveMinimum" = true))]
    pub failure_ratio: f64,
    /// The fewest calls in the window before `failureRatio` can trip the breaker.
    #[serde(default = "defaults::min_requests")]
    #[schemars(range(min = 1, max = 100_000))]
    pub min_requests: u32,
    /// The closed state's counting window; counts reset when it ends.
    #[serde(default = "defaults::interval")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": NONZERO_DURATION_RULE, "message": "must be more than zero, such as 1s",
    }]))]
    pub interval: Duration,
    /// How long the breaker stays open, failing fast, before it goes half-open.
    #[serde(default = "defaults::open_for")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": NONZERO_DURATION_RULE, "message": "must be more than zero, such as 1s",
    }]))]
    pub open_for: Duration,
    /// Calls let through while half-open; all must succeed to close the breaker.
    #[serde(default = "defaults::half_open_requests")]
    #[schemars(range(min = 1, max = 1000))]
    pub half_open_requests: u32,
    /// What counts as a failure.
    #[serde(default = "defaults::failure_on")]
    #[schemars(length(min = 1, max = 3))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub failure_on: Vec<FailureKind>,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::consecutive_failures(),
            failure_ratio: defaults::failure_ratio(),
            min_requests: defaults::min_requests(),
            interval: defaults::interval(),
            open_for: defaults::open_for(),
            half_open_requests: defaults::half_open_requests(),
            failure_on: defaults::failure_on(),
        }
    }
}

/// An outcome the circuit breaker counts as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FailureKind {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// A call that ran out of time.
    #[serde(rename = "timeout")]
    Timeout,
    /// A connection that could not be made.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
}

/// Protection for the application: rate, concurrency and time limits on inbound requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Inbound {
    /// A token bucket; requests over it get 429 with `Retry-After`. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Requests in flight to the application at once; more get 503 at once.
    #[serde(default = "defaults::max_concurrent")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_concurrent: u32,
    /// How long the application may take to answer; past it the caller gets 504.
    #[serde(default = "defaults::inbound_timeout")]
    pub timeout: Duration,
    /// Whether callers must come over mutual TLS from a meshed sidecar
    /// (`Strict`, the default) or may also call in plaintext (`Permissive`:
    /// for callers outside the mesh, such as the apiserver's service proxy,
    /// or while a namespace is being meshed). Applies once the mesh has
    /// identity (the chart's default); health probes and the admin port are
    /// always plaintext.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Which callers may reach the application, by identity. Unset: any caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}

impl Default for Inbound {
    fn default() -> Self {
        Self {
            rate_limit: None,
            max_concurrent: defaults::max_concurrent(),
            timeout: defaults::inbound_timeout(),
            mtls: MtlsMode::default(),
            authorization: None,
        }
    }
}

/// Whether plaintext callers are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// Only callers that present a mesh certificate; plaintext gets 403.
    #[default]
    Strict,
    /// Mesh callers over mutual TLS, and plaintext callers too (as a caller
    /// without identity, which `authorization` does not allow).
    Permissive,
}

/// Who may call the application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    /// `Enforce` answers a caller that no rule allows with 403 naming its
    /// identity; `Audit` lets it through, and logs and counts it, so a
    /// policy can be tried on live traffic first.
    #[serde(default)]
    pub mode: AuthorizationMode,
    /// The callers allowed; a request allowed by any rule goes through.
    /// Empty: nobody (in `Enforce`).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub allow: Vec<AllowRule>,
}

/// What happens to a caller no rule allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AuthorizationMode {
    /// Refused with 403.
    #[default]
    Enforce,
    /// Served, logged and counted as refused-in-audit.
    Audit,
}

/// One allowed caller, optionally narrowed to methods and a path prefix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.microService) != has(self.serviceAccount)",
    "message": "name exactly one of microService and serviceAccount",
}]))]
pub struct AllowRule {
    /// A MicroService (its pods' ServiceAccount has its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub micro_service: Option<String>,
    /// A ServiceAccount, for callers that are not MicroServices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub service_account: Option<String>,
    /// The caller's namespace; the application's own when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub namespace: Option<String>,
    /// HTTP methods allowed (`GET`, `POST`, ...); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub methods: Vec<HttpMethod>,
    /// Only paths that start with this (`/api/v1/users`; for gRPC,
    /// `/<package>.<Service>/`); unset: any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/[^\s]*$"), length(max = 256))]
    pub path_prefix: Option<String>,
}

/// An HTTP method an [`AllowRule`] may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl HttpMethod {
    /// The method as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
            Self::Options => "OPTIONS",
        }
    }
}

impl AllowRule {
    /// The ServiceAccount this rule allows, as (namespace, name), the
    /// namespace defaulting to `own`.
    pub fn caller<'a>(&'a self, own: &'a str) -> (&'a str, &'a str) {
        let name = self
            .micro_service
            .as_deref()
            .or(self.service_account.as_deref())
            .unwrap_or_default();
        (self.namespace.as_deref().unwrap_or(own), name)
    }
}

/// The mesh identity a sidecar needs: its trust domain, the roots it trusts
/// and where it gets its certificate. Rendered by the operator from the
/// chart's settings; absent when the mesh runs without identity, and then
/// the sidecar speaks plaintext.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshIdentity {
    /// The trust domain of SPIFFE IDs, `cluster.local` by default.
    pub trust_domain: String,
    /// The trust anchors, PEM (one or more CA certificates: two while a
    /// root is being rotated).
    pub trust_bundle: String,
    /// The identity service's address, `host:port`; its certificate names `host`.
    pub issuer_address: String,
}

/// A token bucket: `perSecond` tokens added each second, at most `burst` saved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per second.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub per_second: u32,
    /// Requests allowed at once above the sustained rate.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub burst: u32,
}

/// Distributed tracing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tracing {
    /// The share of new traces sampled, 0 to 1; a sampled parent is always followed.
    #[serde(default = "defaults::sample_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_ratio: f64,
}

impl Default for Tracing {
    fn default() -> Self {
        Self {
            sample_ratio: defaults::sample_ratio(),
        }
    }
}

/// The defaults, in one place: the values of the design's Go platform where it had them.
mod defaults {
    use super::{Duration, FailureKind, GrpcCode, RetryOn};

    pub fn health_path() -> String {
        "/health".into()
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn attempts() -> u32 {
        3
    }
    pub fn retry_on() -> Vec<RetryOn> {
        vec![
            RetryOn::ConnectFailure,
            RetryOn::ServerError,
            RetryOn::TooManyRequests,
        ]
    }
    pub fn grpc_codes() -> Vec<GrpcCode> {
        vec![GrpcCode::Unavailable]
    }
    pub fn retry_statuses() -> Vec<u16> {
        vec![502, 503, 504]
    }
    pub fn max_replay_bytes() -> u32 {
        64 * 1024
    }
    pub fn backoff_base() -> Duration {
        Duration::from_millis(50)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(1)
    }
    pub fn multiplier() -> f64 {
        2.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn budget_ratio() -> f64 {
        0.2
    }
    pub fn budget_min_per_second() -> u32 {
        10
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn failure_ratio() -> f64 {
        0.6
    }
    pub fn min_requests() -> u32 {
        10
    }
    pub fn interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn open_for() -> Duration {
        Duration::from_secs(30)
    }
    pub fn half_open_requests() -> u32 {
        5
    }
    pub fn failure_on() -> Vec<FailureKind> {
        vec![
            FailureKind::ServerError,
            FailureKind::Timeout,
            FailureKind::ConnectFailure,
        ]
    }
    pub fn max_concurrent() -> u32 {
        512
    }
    pub fn inbound_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn sample_ratio() -> f64 {
        0.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resilience_for_picks_the_dependency_overrides_then_the_defaults() {
        let mut p =
            SidecarPolicy::from_json(r#"{"service":"order","namespace":"shop","appPort":8080}"#)
                .unwrap();
        p.dependencies.push(Dependency {
            timeout: Some(Duration::from_millis(800)),
            ..Dependency::named("user")
        });
        p.dependencies.push(Dependency {
            namespace: Some("other".into()),
            timeout: Some(Duration::from_millis(100)),
            ..Dependency::named("product")
        });
        let t = |n, ns| p.resilience_for(n, ns).timeout;
        assert_eq!(t("user", "shop"), Duration::from_millis(800));
        assert_eq!(t("product", "other"), Duration::from_millis(100));
        assert_eq!(t("product", "shop"), Duration::from_secs(2));
        assert_eq!(t("user", "other"), Duration::from_secs(2));
        assert!(p.may_read("shop") && p.may_read("other") && !p.may_read("third"));
    }

    #[test]
    fn grpc_codes_have_grpc_numbers_and_names() {
        for n in 0..=16u8 {
            let code = GrpcCode::from_number(n).unwrap();
            assert_eq!(code.number(), n);
            let wire = serde_json::to_value(code).unwrap();
            assert_eq!(wire, code.name(), "serde and name() agree");
        }
        assert_eq!(GrpcCode::from_number(14), Some(GrpcCode::Unavailable));
        assert_eq!(GrpcCode::Unavailable.name(), "UNAVAILABLE");
        assert_eq!(GrpcCode::from_number(17), None);
        assert_eq!(Retry::default().grpc_codes, [GrpcCode::Unavailable]);
    }

    #[test]
    fn finds_dependencies_and_readable_namespaces() {
        let mut p =
            SidecarPolicy::from_json(r#"{"service":"order","namespace":"shop","appPort":8080}"#)
                .unwrap();
        p.dependencies.push(Dependency::named("user"));
        p.dependencies.push(Dependency {
            namespace: Some("billing".into()),
            ..Dependency::named("ledger")
        });
        assert!(p.dependency("user", "shop").is_some());
        assert!(p.dependency("user", "billing").is_none());
        assert!(p.dependency("ledger", "billing").is_some());
        assert!(p.dependency("ledger", "shop").is_none());
        assert!(p.may_read("shop") && p.may_read("billing"));
        assert!(!p.may_read("com"));
    }
}
