//! The controller: watches MicroServices and their children and reconciles
//! each MicroService into the objects [`render`](crate::render) produces.
//!
//! Every write is a server-side apply with the one field manager
//! [`FIELD_MANAGER`], forced, so the operator owns exactly the fields it
//! renders and takes them back from anyone who changed them. Every child
//! carries a controller owner reference, so the garbage collector deletes it
//! with its MicroService and `.owns()` turns any change of a child into an
//! immediate reconcile of its owner (drift is put back at once, not on a timer).
//!
//! An object with a child's name that this MicroService does not control is
//! never touched: the reconcile stops before the first write, reports
//! `ReconcileFailed` (reason `NameCollision`) and a Warning event.
//!
//! Reads come from the watches' caches ([`Caches`]), not from the apiserver:
//! a child is read live only when the cache has no object of its name (a
//! name taken by someone else carries no label of ours, so the labelled
//! watches cannot see it). A child whose cached object already holds what
//! is rendered (same [`APPLIED_HASH_ANNOTATION`], and every rendered field
//! equal) is not written again, and the status is written only when it
//! changes; so a reconcile of a converged MicroService makes no request.
//!
//! Every watch backs off on its own after an error ([`WatchBackoff`]).
//! kube-runtime's `Controller` would otherwise pause its one merged trigger
//! stream, all watches at once, with a backoff growing to 30 s (plus jitter)
//! after any watch error, and an API outage makes every watch fail: after
//! three apiserver restarts the operator saw no MicroService event for
//! minutes (tests/tests/faults.rs, tests/tests/operator_watch.rs).

use std::{
    collections::HashMap,
    fmt::Debug,
    future::Future,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt, future};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{ConfigMap, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{Role, RoleBinding},
    },
    jiff::Timestamp,
};
use kube::{
    Client, Resource, ResourceExt,
    api::{Api, DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        controller::{Action, Controller},
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        utils::Backoff,
        watcher,
    },
};
use rand::Rng;
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    crd::{MicroService, MicroServiceStatus, Phase},
    grants,
    metrics::Metrics,
    render::{self, Children, FIELD_MANAGER, RenderConfig, RenderError},
    status::{self, Failure, Observed},
};

/// The annotation on every child holding the sha256 of what the operator
/// last applied (the rendered object without this annotation): a rendered
/// object whose hash matches, and whose fields all hold, is not applied again.
pub const APPLIED_HASH_ANNOTATION: &str = "trellis.dev/applied-hash";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// What rendering needs (sidecar image, cluster domain).
    pub render: RenderConfig,
    /// Watch one namespace only; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// Identifies this replica in Events (`reportingInstance`), usually the pod name.
    pub instance: Option<String>,
    /// How often a healthy MicroService is reconciled even without a watch event.
    pub resync: Duration,
    /// Reconcile only the MicroServices with these labels (a label selector,
    /// `key=value,...`); all when `None`.
    pub selector: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            render: RenderConfig::default(),
            namespace: None,
            concurrency: 4,
            instance: None,
            resync: Duration::from_secs(300),
            selector: None,
        }
    }
}

/// The watches' caches of the children (the objects carrying the operator's
/// label, without their managed fields).
#[derive(Clone)]
pub struct Caches {
    config_maps: Store<ConfigMap>,
    service_accounts: Store<ServiceAccount>,
    roles: Store<Role>,
    role_bindings: Store<RoleBinding>,
    deployments: Store<Deployment>,
    services: Store<Service>,
    pdbs: Store<PodDisruptionBudget>,
    hpas: Store<HorizontalPodAutoscaler>,
}

/// A kind of child with its cache.
pub(crate) trait Cached:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    fn store(caches: &Caches) -> &Store<Self>;
}

macro_rules! cached {
    ($($kind:ty => $field:ident),* $(,)?) => {
        $(impl Cached for $kind {
            fn store(caches: &Caches) -> &Store<Self> {
                &caches.$field
            }
        })*
    };
}

cached! {
    ConfigMap => config_maps,
    ServiceAccount => service_accounts,
    Role => roles,
    RoleBinding => role_bindings,
    Deployment => deployments,
    Service => services,
    PodDisruptionBudget => pdbs,
    HorizontalPodAutoscaler => hpas,
}

/// What the operator last applied to one child: the hash of the rendered
/// object and the resourceVersion the apiserver answered with. Covers the
/// moment between an apply and its watch event, when the cache lags.
#[derive(Clone, Debug)]
struct Applied {
    hash: String,
    resource_version: Option<u64>,
}

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The settings the controller was started with.
    pub settings: Settings,
    /// Publishes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per MicroService, for backoff in [`error_policy`].
    failures: Mutex<HashMap<ObjectRef<MicroService>, u32>>,
    /// The children's caches.
    pub(crate) caches: Caches,
    /// The last apply per child (`Kind/namespace/name`); forgotten when the
    /// watch reports the child deleted.
    applied: Arc<Mutex<HashMap<String, Applied>>>,
}

impl Context {
    fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        caches: Caches,
        applied: Arc<Mutex<HashMap<String, Applied>>>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: settings.instance.clone(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            failures: Mutex::default(),
            caches,
            applied,
        }
    }
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or could not be reached; retried with backoff.
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    /// Objects with a child's name exist and are not controlled by this MicroService.
    #[error(
        "{} already exist{} and {} not owned by this MicroService; the operator leaves {} alone. Delete or rename {}, or rename the MicroService",
        .0.join(", "),
        if .0.len() == 1 { "s" } else { "" },
        if .0.len() == 1 { "is" } else { "are" },
        if .0.len() == 1 { "it" } else { "them" },
        if .0.len() == 1 { "it" } else { "them" },
    )]
    NameCollision(Vec<String>),
    /// The MicroService cannot be rendered (e.g. it depends on itself).
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Namespaces that dependencies name do not exist (yet); retried with backoff.
    #[error(
        "dependency namespace{} {} do{} not exist yet, so the sidecar cannot read the EndpointSlices there; the operator grants that read once {} created",
        if .0.len() == 1 { "" } else { "s" },
        .0.join(", "),
        if .0.len() == 1 { "es" } else { "" },
        if .0.len() == 1 { "it is" } else { "they are" },
    )]
    DependencyNamespaceMissing(Vec<String>),
    /// A namespaced operator cannot grant reads outside its namespace.
    #[error(
        "dependency namespace{} {} {} outside the namespace this operator watches ({watched}), so it cannot let the sidecar read the EndpointSlices there; install the operator for all namespaces (empty watchNamespace) or grant that read yourself",
        if .namespaces.len() == 1 { "" } else { "s" },
        .namespaces.join(", "),
        if .namespaces.len() == 1 { "is" } else { "are" },
    )]
    DependencyOutOfScope {
        /// The dependencies' namespaces.
        namespaces: Vec<String>,
        /// The namespace the operator watches.
        watched: String,
    },
}

impl Error {
    /// The `error` label of the error metric and the reason of the condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApiError",
            Error::NameCollision(_) => "NameCollision",
            Error::Render(_) => "InvalidSpec",
            Error::DependencyNamespaceMissing(_) => "DependencyNamespaceMissing",
            Error::DependencyOutOfScope { .. } => "DependencyOutOfScope",
        }
    }

    /// The reason and message for the ReconcileFailed condition and the
    /// Warning event: one sentence of at most [`status::MAX_MESSAGE`]
    /// characters saying what is wrong, naming the object or field, and what
    /// to do (or that the operator retries).
    pub fn failure(&self) -> Failure {
        let (reason, message) = match self {
            Error::Kube(e) => api_failure(e),
            Error::NameCollision(_)
            | Error::DependencyNamespaceMissing(_)
            | Error::DependencyOutOfScope { .. } => {
                (self.reason(), status::fit("", &self.to_string(), "."))
            }
            Error::Render(RenderError::Invalid(fields)) => {
                ("InvalidSpec", status::field_errors(fields))
            }
            Error::Render(e) => (
                "InvalidSpec",
                status::fit(
                    "",
                    &e.to_string(),
                    ". Fix the MicroService and apply it again.",
                ),
            ),
        };
        Failure {
            reason: reason.into(),
            message,
        }
    }

    /// Errors retrying cannot fix without a change by someone.
    fn is_permanent(&self) -> bool {
        !matches!(self, Error::Kube(_) | Error::DependencyNamespaceMissing(_))
    }
}

/// The reason and message for an error from the Kubernetes API, by its kind:
/// refused (fix the MicroService), forbidden (fix the operator's RBAC), or
/// failed or unreachable (the operator retries).
fn api_failure(e: &kube::Error) -> (&'static str, String) {
    const RETRIES: &str = "); the operator retries with backoff.";
    match e {
        kube::Error::Api(s) if s.code == 403 => (
            "ApiForbidden",
            status::fit(
                "",
                &s.message,
                ". Grant the operator's ServiceAccount that permission (charts/trellis \
                 templates/rbac.yaml).",
            ),
        ),
        kube::Error::Api(s) if s.code == 409 => (
            "ApiConflict",
            status::fit("The apiserver reported a conflict (", &s.message, RETRIES),
        ),
        kube::Error::Api(s) if s.code == 429 || s.code >= 500 || s.code == 0 => (
            "ApiUnavailable",
            status::fit(
                &format!("The Kubernetes API failed ({} {}: ", s.code, s.reason),
                &s.message,
                RETRIES,
            ),
        ),
        kube::Error::Api(s) => {
            let details = s.details.as_ref();
            let object = details
                .filter(|d| !d.kind.is_empty() && !d.name.is_empty())
                .map_or_else(
                    || "a child object".to_owned(),
                    |d| format!("{} {}", d.kind, d.name),
                );
            let causes: Vec<String> = details
                .map(|d| d.causes.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    if c.field.is_empty() {
                        c.message.clone()
                    } else {
                        format!("{}: {}", c.field, c.message)
                    }
                })
                .collect();
            let what = if causes.is_empty() {
                s.message.clone()
            } else {
                causes.join("; ")
            };
            (
                "ApiRefused",
                status::fit(
                    &format!("The apiserver refused {object}: "),
                    &what,
                    ". Fix the MicroService field it comes from and apply it again.",
                ),
            )
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => (
            "ApiUnavailable",
            status::fit(
                "The Kubernetes API could not be reached (",
                &e.to_string(),
                RETRIES,
            ),
        ),
        _ => (
            "ApiUnavailable",
            status::fit("The Kubernetes API call failed (", &e.to_string(), RETRIES),
        ),
    }
}

/// What to do when the first list of MicroServices fails, by its cause.
fn list_failure_hint(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 403 => {
            "the operator's ServiceAccount may not list them: check its (Cluster)Role and \
             binding; with `--watch-namespace` the namespace must exist before `helm install` \
             puts the Role in it"
        }
        kube::Error::Api(s) if s.code == 404 => {
            "the CRD is not installed: `kubectl apply -f crds/microservice.yaml`"
        }
        _ => "is the API reachable and the CRD installed?",
    }
}

/// Runs the controller until `shutdown` resolves (or forever).
///
/// Fails fast, saying what to fix, when MicroServices cannot be listed (no
/// CRD, no permission).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let ns = settings.namespace.clone();
    let ns = ns.as_deref();
    let microservices: Api<MicroService> = scoped(&client, ns);
    microservices
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot list MicroServices ({}): {e}", list_failure_hint(&e))
        })?;

    // Children carry the managed-by label; watching only those keeps the
    // caches small. An object that loses the label drops out of the selector,
    // which the watch reports like a deletion, so it is put back too.
    let children = watcher::Config::default()
        .labels("app.kubernetes.io/managed-by=trellis-operator")
        .any_semantic();
    let applied: Arc<Mutex<HashMap<String, Applied>>> = Arc::default();
    let (config_maps, cm_trigger) = child_watch::<ConfigMap>(&client, ns, &children, &applied);
    let (service_accounts, sa_trigger) = child_watch(&client, ns, &children, &applied);
    let (roles, role_trigger) = child_watch(&client, ns, &children, &applied);
    let (role_bindings, rb_trigger) = child_watch(&client, ns, &children, &applied);
    let (deployments, deploy_trigger) = child_watch(&client, ns, &children, &applied);
    let (services, svc_trigger) = child_watch(&client, ns, &children, &applied);
    let (pdbs, pdb_trigger) = child_watch(&client, ns, &children, &applied);
    let (hpas, hpa_trigger) = child_watch(&client, ns, &children, &applied);
    let caches = Caches {
        config_maps,
        service_accounts,
        roles,
        role_bindings,
        deployments,
        services,
        pdbs,
        hpas,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        caches,
        applied,
    ));

    // The MicroServices: only a change the reconcile acts on (spec, labels,
    // annotations, deletion) triggers one, not the status it writes itself.
    // A deletion, or a full list that may have missed some, wakes the sweep
    // of grants left by deleted MicroServices.
    let (ms_store, ms_writer) = reflector::store::<MicroService>();
    let mut ms_config = watcher::Config::default().any_semantic();
    if let Some(selector) = &ctx.settings.selector {
        ms_config = ms_config.labels(selector);
    }
    let swept = Arc::new(Notify::new());
    let wake = swept.clone();
    let ms_trigger = watcher(microservices, ms_config)
        .backoff(WatchBackoff::default())
        .reflect(ms_writer)
        .inspect(move |e| {
            if matches!(e, Ok(watcher::Event::Delete(_) | watcher::Event::InitDone)) {
                wake.notify_one();
            }
        })
        .applied_objects()
        .predicate_filter(ms_fingerprint, Default::default());
    // Only a cluster-wide operator makes grants in other namespaces.
    let _sweeper = ns
        .is_none()
        .then(|| grants::Sweeper::spawn(ctx.clone(), ms_store.clone(), swept));

    info!(
        namespace = ns.unwrap_or("<all>"),
        "starting the MicroService controller"
    );
    Controller::for_stream(ms_trigger, ms_store)
        .owns_stream(cm_trigger)
        .owns_stream(sa_trigger)
        // A Role or RoleBinding is the child of a MicroService in its own
        // namespace (owner reference) or a grant to one in another (labels).
        .watches_stream(role_trigger, grants::owners::<Role>)
        .watches_stream(rb_trigger, grants::owners::<RoleBinding>)
        .owns_stream(deploy_trigger)
        .owns_stream(svc_trigger)
        .owns_stream(pdb_trigger)
        .owns_stream(hpa_trigger)
        // Each watch backs off on its own (above); a backoff here would
        // pause every watch after an error of any one.
        .trigger_backoff(NoPause)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(%obj, "reconciled"),
                Err(kube::runtime::controller::Error::ReconcilerFailed(e, obj)) => {
                    warn!(%obj, error = %e, "reconcile failed")
                }
                Err(e) => debug!(error = %e, "controller event"),
            }
        })
        .await;
    info!("the MicroService controller stopped");
    Ok(())
}

/// The watch of one kind of child: its cache, and the stream of changed
/// children that triggers their owners' reconciles. Changes of the status
/// alone do not trigger, except the Deployment's rollout figures that the
/// MicroService's status shows; deletions always do.
fn child_watch<K: Cached>(
    client: &Client,
    ns: Option<&str>,
    config: &watcher::Config,
    applied: &Arc<Mutex<HashMap<String, Applied>>>,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = reflector::store::<K>();
    let applied = applied.clone();
    let mut seen: HashMap<String, u64> = HashMap::new();
    let trigger = watcher(scoped::<K>(client, ns), config.clone())
        .modify(|k| k.meta_mut().managed_fields = None)
        .backoff(WatchBackoff::default())
        .reflect(writer)
        .filter_map(move |event| {
            let out = match event {
                Ok(watcher::Event::Apply(k) | watcher::Event::InitApply(k)) => {
                    let key = child_key(&k);
                    let fp = child_fingerprint(&k);
                    (seen.insert(key, fp) != Some(fp)).then_some(Ok(k))
                }
                Ok(watcher::Event::Delete(k)) => {
                    let key = child_key(&k);
                    seen.remove(&key);
                    applied.lock().expect("not poisoned").remove(&key);
                    Some(Ok(k))
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                Err(e) => Some(Err(e)),
            };
            future::ready(out)
        });
    (store, trigger)
}

fn child_key<K: Resource<DynamicType = ()>>(k: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        k.meta().namespace.as_deref().unwrap_or_default(),
        k.meta().name.as_deref().unwrap_or_default()
    )
}

/// What of a child's change matters to its owner: everything but the status
/// and the bookkeeping metadata; of a Deployment, the rollout figures too.
fn child_fingerprint<K: Resource<DynamicType = ()> + Serialize>(k: &K) -> u64 {
    let mut v = serde_json::to_value(k).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        let status = o.remove("status");
        if K::kind(&()) == "Deployment" {
            o.insert("status".into(), rollout_figures(status));
        }
        if let Some(m) = o.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            for volatile in ["resourceVersion", "managedFields"] {
                m.remove(volatile);
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// The parts of a Deployment's status that [`status::compute`] reads.
fn rollout_figures(status: Option<serde_json::Value>) -> serde_json::Value {
    let Some(s) = status else {
        return serde_json::Value::Null;
    };
    let stalled = s["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["reason"] == "ProgressDeadlineExceeded" && c["status"] == "False")
    });
    serde_json::json!([
        s["observedGeneration"],
        s["replicas"],
        s["readyReplicas"],
        s["updatedReplicas"],
        s["availableReplicas"],
        stalled,
    ])
}

/// What of a MicroService's change needs a reconcile: not its status.
fn ms_fingerprint(ms: &MicroService) -> Option<u64> {
    let m = &ms.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.uid.hash(&mut h);
    m.generation.hash(&mut h);
    m.labels.hash(&mut h);
    m.annotations.hash(&mut h);
    m.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// The backoff of one watch after an error: 0.5 s doubling to 5 s, ±25%
/// jitter; reset by the next event. Short, because a watch that waits misses
/// nothing (it resumes from its resourceVersion or lists again) but delays
/// everything it would have seen, and a watch is one request per attempt.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    /// The first delay.
    pub const MIN: Duration = Duration::from_millis(500);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(delay.mul_f64(rand::rng().random_range(0.75..=1.25)))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// No pause: the controller's trigger stream is never held back.
struct NoPause;

impl Iterator for NoPause {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl Backoff for NoPause {
    fn reset(&mut self) {}
}

fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Reconciles one MicroService: apply the children, then report the status.
pub async fn reconcile(ms: Arc<MicroService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!(
        "reconcile",
        microservice = %ms.name_any(),
        namespace = %ms.namespace().unwrap_or_default(),
        generation = ms.metadata.generation.unwrap_or_default(),
    );
    async move {
        let _timer = ctx.metrics.reconcile_started();
        if ms.metadata.deletion_timestamp.is_some() {
            // The garbage collector deletes the children through their owner references.
            return Ok(Action::await_change());
        }
        let key = ObjectRef::from_obj(ms.as_ref());
        // The grants come after the MicroService's own children, so a
        // dependency namespace that does not exist holds back nothing else.
        let applied = match apply(&ms, &ctx).await {
            Ok(deployment) => match grants::sync(&ms, &ctx).await {
                Ok(()) => Ok(deployment),
                Err(e) => Err((Some(deployment), e)),
            },
            Err(e) => Err((None, e)),
        };
        match applied {
            Ok(deployment) => {
                ctx.failures.lock().expect("not poisoned").remove(&key);
                update_status(&ms, &ctx, Some(&deployment), None).await?;
                Ok(Action::requeue(ctx.settings.resync))
            }
            Err((deployment, e)) => {
                ctx.metrics.reconcile_failed(e.reason());
                let failure = e.failure();
                warn!(reason = %failure.reason, error = %e, "reconcile failed");
                publish(
                    &ms,
                    &ctx,
                    EventType::Warning,
                    e.reason(),
                    "Reconcile",
                    &failure.message,
                )
                .await;
                // Best effort: the apiserver may be the thing that is failing.
                if let Err(status_err) =
                    update_status(&ms, &ctx, deployment.as_ref(), Some(failure)).await
                {
                    debug!(error = %status_err, "could not report the failure in the status");
                }
                if e.is_permanent() {
                    // Nothing to retry until someone changes something; the
                    // watches bring us back when they do, the resync otherwise.
                    Ok(Action::requeue(Duration::from_secs(60)))
                } else {
                    Err(e)
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Requeues a failed reconcile with exponential backoff and jitter: 1s, 2s,
/// 4s ... up to [`MAX_RETRY_DELAY`], each randomised by ±25%.
pub fn error_policy(ms: Arc<MicroService>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(ms.as_ref());
    let attempt = {
        let mut failures = ctx.failures.lock().expect("not poisoned");
        let n = failures.entry(key).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(attempt, rand::rng().random_range(0.75..=1.25));
    debug!(%error, attempt, ?delay, "requeue after error");
    Action::requeue(delay)
}

/// The longest wait before retrying a failed reconcile. Nothing else brings
/// a MicroService whose reconcile failed for an API error back: when the
/// apiserver returns, the watches resume from their last resourceVersion
/// without a re-list, so no event fires. A cap of minutes left MicroServices
/// unreconciled for minutes after three apiserver restarts (tests/tests/faults.rs).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// The delay before retry number `attempt` (from 1), times `jitter`.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = 2f64.powi(attempt.saturating_sub(1).min(16) as i32);
    Duration::from_secs_f64((base * jitter).min(MAX_RETRY_DELAY.as_secs_f64()))
}

/// What tells whether an apply changed an object: the generation where there
/// is one (so status updates by other controllers do not count), else the
/// resourceVersion.
fn version<K: Resource>(k: &K) -> Option<String> {
    let m = k.meta();
    match m.generation {
        Some(g) => Some(format!("generation {g}")),
        None => m.resource_version.clone(),
    }
}

fn resource_version<K: Resource>(k: &K) -> Option<u64> {
    k.meta().resource_version.as_deref()?.parse().ok()
}

/// The sha256 of a rendered object (which carries no hash annotation yet).
fn applied_hash<K: Serialize>(obj: &K) -> String {
    let json = serde_json::to_vec(obj).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

/// True when every field of `want` holds in `have`: objects may have more
/// keys in `have` (defaults, other managers), lists must match element by element.
fn holds(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| holds(wv, hv)) || wv.is_null()),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(wv, hv)| holds(wv, hv))
        }
        (w, h) => w == h,
    }
}

/// Where one child stands before the apply.
pub(crate) enum Plan {
    /// No object of this name: it is created.
    Create,
    /// Ours, and not as rendered: applied.
    Update {
        what: String,
        before: Option<String>,
    },
    /// Ours and as rendered: not written.
    Keep,
}

/// A rendered child with its plan.
pub(crate) struct Step<K> {
    obj: K,
    hash: String,
    pub(crate) plan: Plan,
}

/// Decides what to do with the rendered `obj`: from the cache, or from a live
/// read when the cache has no object of its name. `Err` names it when an
/// object of that name is not controlled by `ms`.
pub(crate) async fn plan<K: Cached>(
    ms: &MicroService,
    ctx: &Context,
    mut obj: K,
) -> Result<Step<K>, Error> {
    // The MicroService's own namespace, or a dependency's for a grant.
    let ns = obj
        .namespace()
        .or_else(|| ms.namespace())
        .unwrap_or_default();
    let name = obj.name_any();
    let what = format!("{} {ns}/{name}", K::kind(&()));
    let hash = applied_hash(&obj);
    obj.annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.into(), hash.clone());
    let key = child_key(&obj);
    let applied = ctx.applied.lock().expect("not poisoned").get(&key).cloned();
    let cached = K::store(&ctx.caches).get(&ObjectRef::new(&name).within(&ns));
    let current: Option<Arc<K>> = match cached {
        Some(c) => Some(c),
        // We applied it and the watch has not reported it yet.
        None if applied.as_ref().is_some_and(|a| a.hash == hash) => {
            return Ok(Step {
                obj,
                hash,
                plan: Plan::Keep,
            });
        }
        None => {
            let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
            api.get_opt(&name).await?.map(Arc::new)
        }
    };
    let Some(current) = current else {
        return Ok(Step {
            obj,
            hash,
            plan: Plan::Create,
        });
    };
    let ours = if obj.namespace() == ms.namespace() {
        render::is_controlled_by(current.meta().owner_references.as_deref(), ms)
    } else {
        grants::is_granted_by(current.meta(), ms)
    };
    if !ours {
        return Err(Error::NameCollision(vec![what]));
    }
    // The cache is older than our last apply of the same object: that apply holds.
    let stale = match (&applied, resource_version(current.as_ref())) {
        (Some(a), Some(have)) => a.hash == hash && a.resource_version.is_some_and(|rv| rv > have),
        _ => false,
    };
    let same = stale
        || (current.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash)
            && holds(
                &serde_json::to_value(&obj).unwrap_or_default(),
                &serde_json::to_value(current.as_ref()).unwrap_or_default(),
            ));
    let plan = if same {
        Plan::Keep
    } else {
        Plan::Update {
            what,
            before: version(current.as_ref()),
        }
    };
    Ok(Step { obj, hash, plan })
}

/// Applies a child unless it is kept; returns whether it changed and the
/// object as it now is (`None` for a kept one: the cache has it).
pub(crate) async fn execute<K: Cached>(ctx: &Context, step: &Step<K>) -> Result<Option<K>, Error> {
    if matches!(step.plan, Plan::Keep) {
        return Ok(None);
    }
    let obj = &step.obj;
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = api
        .patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?;
    ctx.applied.lock().expect("not poisoned").insert(
        child_key(obj),
        Applied {
            hash: step.hash.clone(),
            resource_version: resource_version(&applied),
        },
    );
    Ok(Some(applied))
}

/// Collects collisions over all children before the first write.
#[derive(Default)]
pub(crate) struct Preflight {
    pub(crate) collisions: Vec<String>,
}

impl Preflight {
    pub(crate) fn record<K>(
        &mut self,
        r: Result<Step<K>, Error>,
    ) -> Result<Option<Step<K>>, Error> {
        match r {
            Ok(s) => Ok(Some(s)),
            Err(Error::NameCollision(mut names)) => {
                self.collisions.append(&mut names);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// What an apply did, for the Events.
#[derive(Default)]
struct Changes {
    created: Vec<String>,
    updated: Vec<String>,
}

impl Changes {
    fn note<K: Resource<DynamicType = ()>>(&mut self, step: &Step<K>, after: Option<&K>) {
        match (&step.plan, after) {
            (Plan::Create, _) => self.created.push(format!(
                "{} {}",
                K::kind(&()),
                step.obj.meta().name.as_deref().unwrap_or_default()
            )),
            (Plan::Update { what, before }, Some(after)) if *before != version(after) => {
                self.updated.push(what.clone())
            }
            _ => {}
        }
    }
}

/// Applies every child that is not as rendered; returns the Deployment as
/// the apiserver (or the cache) has it.
async fn apply(ms: &MicroService, ctx: &Context) -> Result<Deployment, Error> {
    let c: Children = render::render(ms, &ctx.settings.render)?;

    // 1. Nothing is written while any child's name is taken by someone else.
    let mut pre = Preflight::default();
    let config = pre.record(plan(ms, ctx, c.config).await)?;
    let policy = pre.record(plan(ms, ctx, c.policy).await)?;
    let service_account = pre.record(plan(ms, ctx, c.service_account).await)?;
    let role = pre.record(plan(ms, ctx, c.role).await)?;
    let role_binding = pre.record(plan(ms, ctx, c.role_binding).await)?;
    let deployment = pre.record(plan(ms, ctx, c.deployment).await)?;
    let service = pre.record(plan(ms, ctx, c.service).await)?;
    let pdb = match c.pdb {
        Some(pdb) => pre.record(plan(ms, ctx, pdb).await)?,
        None => None,
    };
    let hpa = match c.hpa {
        Some(hpa) => pre.record(plan(ms, ctx, hpa).await)?,
        None => None,
    };
    if !pre.collisions.is_empty() {
        return Err(Error::NameCollision(pre.collisions));
    }
    let (
        Some(config),
        Some(policy),
        Some(service_account),
        Some(role),
        Some(role_binding),
        Some(deployment),
        Some(service),
    ) = (
        config,
        policy,
        service_account,
        role,
        role_binding,
        deployment,
        service,
    )
    else {
        unreachable!("a child without a step is a collision");
    };

    // 2. Apply, in the order a pod needs them: config and RBAC before the Deployment.
    let mut changes = Changes::default();
    let after = execute(ctx, &config).await?;
    changes.note(&config, after.as_ref());
    let after = execute(ctx, &policy).await?;
    changes.note(&policy, after.as_ref());
    let after = execute(ctx, &service_account).await?;
    changes.note(&service_account, after.as_ref());
    let after = execute(ctx, &role).await?;
    changes.note(&role, after.as_ref());
    let after = execute(ctx, &role_binding).await?;
    changes.note(&role_binding, after.as_ref());
    let applied_deployment = execute(ctx, &deployment).await?;
    changes.note(&deployment, applied_deployment.as_ref());
    let after = execute(ctx, &service).await?;
    changes.note(&service, after.as_ref());
    if let Some(pdb) = &pdb {
        let after = execute(ctx, pdb).await?;
        changes.note(pdb, after.as_ref());
    }
    if let Some(hpa) = &hpa {
        let after = execute(ctx, hpa).await?;
        changes.note(hpa, after.as_ref());
    }

    // 3. Remove what is no longer wanted (only our own).
    let mut removed = Vec::new();
    if pdb.is_none() && remove::<PodDisruptionBudget>(ms, ctx).await? {
        removed.push("PodDisruptionBudget");
    }
    if hpa.is_none() && remove::<HorizontalPodAutoscaler>(ms, ctx).await? {
        removed.push("HorizontalPodAutoscaler");
    }

    // 4. Say what changed.
    let Changes { created, updated } = changes;
    if !created.is_empty() {
        info!(?created, "created children");
        publish(
            ms,
            ctx,
            EventType::Normal,
            "Created",
            "Apply",
            &format!("created {}", created.join(", ")),
        )
        .await;
    }
    if !updated.is_empty() {
        info!(?updated, "updated children");
        publish(
            ms,
            ctx,
            EventType::Normal,
            "Updated",
            "Apply",
            &format!("updated {}", updated.join(", ")),
        )
        .await;
    }
    if !removed.is_empty() {
        publish(
            ms,
            ctx,
            EventType::Normal,
            "Deleted",
            "Apply",
            &format!("deleted {}", removed.join(", ")),
        )
        .await;
    }
    // The Deployment as applied, else as cached (it was kept, so the cache
    // has it, or our apply moments ago does).
    let name = deployment.obj.name_any();
    let ns = ms.namespace().unwrap_or_default();
    match applied_deployment {
        Some(d) => Ok(d),
        None => match Deployment::store(&ctx.caches).get(&ObjectRef::new(&name).within(&ns)) {
            Some(d) => Ok(d.as_ref().clone()),
            None => Ok(Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                .get(&name)
                .await?),
        },
    }
}

/// Deletes the child of kind `K` named like the MicroService, if this
/// MicroService controls it (as the cache says). True when something was deleted.
async fn remove<K: Cached>(ms: &MicroService, ctx: &Context) -> Result<bool, Error> {
    let ns = ms.namespace().unwrap_or_default();
    let name = ms.name_any();
    let Some(obj) = K::store(&ctx.caches).get(&ObjectRef::new(&name).within(&ns)) else {
        return Ok(false);
    };
    if !render::is_controlled_by(obj.meta().owner_references.as_deref(), ms) {
        return Ok(false);
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Writes the status (server-side apply on the status subresource, same
/// field manager) when it differs from what is there.
async fn update_status(
    ms: &MicroService,
    ctx: &Context,
    deployment: Option<&Deployment>,
    failure: Option<Failure>,
) -> Result<(), Error> {
    let name = ms.name_any();
    let ns = ms.namespace().unwrap_or_default();
    let status: MicroServiceStatus = status::compute(&Observed {
        generation: ms.metadata.generation,
        deployment,
        url: render::service_url(&name, &ns, &ctx.settings.render.cluster_domain),
        failure,
        previous: ms.status.as_ref(),
        now: Timestamp::now(),
    });
    if ms.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let old_phase = ms.status.as_ref().and_then(|s| s.phase);
    let api: Api<MicroService> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": MicroService::api_version(&()),
        "kind": MicroService::kind(&()),
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    if old_phase != status.phase {
        let summary = status.replica_summary.clone().unwrap_or_default();
        match status.phase {
            Some(Phase::Ready) => {
                publish(
                    ms,
                    ctx,
                    EventType::Normal,
                    "Ready",
                    "Status",
                    &format!("{summary} replicas ready"),
                )
                .await
            }
            Some(Phase::Degraded) => {
                publish(
                    ms,
                    ctx,
                    EventType::Warning,
                    "Degraded",
                    "Status",
                    &format!("{summary} replicas ready"),
                )
                .await
            }
            _ => {}
        }
    }
    Ok(())
}

/// Publishes an Event about `ms`; a failure to publish is logged, not fatal.
pub(crate) async fn publish(
    ms: &MicroService,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let mut note = note.to_owned();
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &ms.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(5, 1.0), Duration::from_secs(16));
        assert_eq!(backoff(50, 1.0), MAX_RETRY_DELAY);
        assert_eq!(backoff(3, 0.75), Duration::from_secs(3));
    }

    #[test]
    fn a_failed_first_list_says_what_to_fix() {
        let api = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(list_failure_hint(&api(403)).contains("ServiceAccount may not list"));
        assert!(list_failure_hint(&api(404)).contains("kubectl apply -f crds/microservice.yaml"));
        assert!(list_failure_hint(&api(500)).contains("reachable"));
    }

    /// The body a 1.34 apiserver returns when it refuses a Deployment.
    fn refused_deployment() -> Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Deployment.apps \"order\" is invalid: \
                spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": \
                must be less than or equal to cpu limit of 1500m",
            "reason": "Invalid",
            "details": {
                "name": "order",
                "group": "apps",
                "kind": "Deployment",
                "causes": [{
                    "reason": "FieldValueInvalid",
                    "message": "Invalid value: \"2\": must be less than or equal to cpu limit of 1500m",
                    "field": "spec.template.spec.containers[0].resources.requests",
                }],
            },
            "code": 422,
        }))
        .unwrap();
        Error::Kube(kube::Error::Api(Box::new(status)))
    }

    fn assert_readable(m: &str) {
        assert!(
            m.chars().count() <= status::MAX_MESSAGE,
            "{} chars: {m}",
            m.chars().count()
        );
        for dump in [
            "Status {",
            "Some(",
            "ErrorResponse",
            "ApiError",
            "StatusCause",
        ] {
            assert!(!m.contains(dump), "{dump:?} in {m}");
        }
    }

    #[test]
    fn an_api_refusal_names_the_object_and_field_in_one_short_sentence() {
        let f = refused_deployment().failure();
        assert_eq!(f.reason, "ApiRefused");
        assert_readable(&f.message);
        assert_eq!(
            f.message,
            "The apiserver refused Deployment order: \
             spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be \
             less than or equal to cpu limit of 1500m. Fix the MicroService field it comes from \
             and apply it again."
        );
    }

    #[test]
    fn an_unreachable_or_failing_api_says_the_operator_retries() {
        let unavailable: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "message": "the server is currently unable to handle the request",
            "reason": "ServiceUnavailable",
            "code": 503,
        }))
        .unwrap();
        let f = Error::Kube(kube::Error::Api(Box::new(unavailable))).failure();
        assert_eq!(f.reason, "ApiUnavailable");
        assert_readable(&f.message);
        assert_eq!(
            f.message,
            "The Kubernetes API failed (503 ServiceUnavailable: the server is currently unable \
             to handle the request); the operator retries with backoff."
        );
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "x".repeat(400));
        let f = Error::Kube(kube::Error::Service(Box::new(refused))).failure();
        assert_eq!(f.reason, "ApiUnavailable");
        assert_readable(&f.message);
        assert!(
            f.message
                .starts_with("The Kubernetes API could not be reached (")
                && f.message
                    .ends_with("…); the operator retries with backoff."),
            "{}",
            f.message
        );
    }

    #[test]
    fn a_forbidden_request_points_at_the_operators_rbac() {
        let forbidden: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "message": "roles.rbac.authorization.k8s.io \"order-sidecar\" is forbidden: User \
                \"system:serviceaccount:trellis:trellis-operator\" cannot patch resource \
                \"roles\" in API group \"rbac.authorization.k8s.io\" in the namespace \"shop\"",
            "reason": "Forbidden",
            "details": {"name": "order-sidecar", "group": "rbac.authorization.k8s.io", "kind": "roles"},
            "code": 403,
        }))
        .unwrap();
        let f = Error::Kube(kube::Error::Api(Box::new(forbidden))).failure();
        assert_readable(&f.message);
        assert!(f.message.contains("cannot patch resource"), "{}", f.message);
        assert!(
            f.message.ends_with("Grant the operator's ServiceAccount that permission (charts/trellis templates/rbac.yaml)."),
            "{}",
            f.message
        );
    }

    #[test]
    fn an_invalid_spec_names_the_fields_within_the_bound() {
        let many = (0..30)
            .map(|i| trellis_policy::FieldError {
                field: format!("spec.dependencies[{i}].timeout"),
                message: "must be more than zero, such as 1s".into(),
            })
            .collect();
        let f = Error::Render(RenderError::Invalid(many)).failure();
        assert_eq!(f.reason, "InvalidSpec");
        assert_readable(&f.message);
        assert!(
            f.message
                .starts_with("spec.dependencies[0].timeout: must be more than zero, such as 1s; "),
            "{}",
            f.message
        );
        assert!(
            f.message
                .ends_with(" more. Fix the MicroService and apply it again."),
            "{}",
            f.message
        );
        let one = vec![trellis_policy::FieldError {
            field: "spec.resilience.timeout".into(),
            message: "must be more than zero, such as 1s".into(),
        }];
        assert_eq!(
            Error::Render(RenderError::Invalid(one)).failure().message,
            "spec.resilience.timeout: must be more than zero, such as 1s. Fix the MicroService \
             and apply it again."
        );
    }

    #[test]
    fn many_collisions_stay_within_the_bound() {
        let names = (0..20)
            .map(|i| format!("ConfigMap shop/order-{i}-config"))
            .collect();
        let f = Error::NameCollision(names).failure();
        assert_readable(&f.message);
        assert!(
            f.message.starts_with("ConfigMap shop/order-0-config, "),
            "{}",
            f.message
        );
    }

    #[test]
    fn collision_message_names_the_objects() {
        let e = Error::NameCollision(vec!["ConfigMap shop/order-config".into()]);
        assert_eq!(
            e.to_string(),
            "ConfigMap shop/order-config already exists and is not owned by this MicroService; \
             the operator leaves it alone. Delete or rename it, or rename the MicroService"
        );
        assert_eq!(e.reason(), "NameCollision");
    }
}
