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

use std::{
    collections::HashMap,
    fmt::Debug,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
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
        controller::{Action, Controller},
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
        watcher,
    },
};
use rand::Rng;
use serde::{Serialize, de::DeserializeOwned};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    crd::{MicroService, MicroServiceStatus, Phase},
    metrics::Metrics,
    render::{self, Children, FIELD_MANAGER, RenderConfig, RenderError},
    status::{self, Failure, Observed},
};

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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            render: RenderConfig::default(),
            namespace: None,
            concurrency: 4,
            instance: None,
            resync: Duration::from_secs(300),
        }
    }
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
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
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
}

impl Error {
    /// The `error` label of the error metric and the reason of the condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApiError",
            Error::NameCollision(_) => "NameCollision",
            Error::Render(_) => "InvalidSpec",
        }
    }

    /// Errors retrying cannot fix without a change by someone.
    fn is_permanent(&self) -> bool {
        !matches!(self, Error::Kube(_))
    }
}

/// Runs the controller until `shutdown` resolves (or forever).
///
/// Fails fast when the MicroService CRD is not installed.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let ctx = Arc::new(Context::new(client.clone(), settings, metrics));
    let microservices: Api<MicroService> = scoped(&client, ctx.settings.namespace.as_deref());
    microservices
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot list MicroServices (is the CRD installed? `kubectl apply -f crds/microservice.yaml`): {e}"
            )
        })?;

    // Children carry the managed-by label; watching only those keeps the
    // caches small. An object that loses the label drops out of the selector,
    // which the watch reports like a deletion, so it is put back too.
    let children = watcher::Config::default()
        .labels("app.kubernetes.io/managed-by=trellis-operator")
        .any_semantic();
    let ns = ctx.settings.namespace.clone();
    let ns = ns.as_deref();
    info!(
        namespace = ns.unwrap_or("<all>"),
        "starting the MicroService controller"
    );
    Controller::new(microservices, watcher::Config::default().any_semantic())
        .owns(scoped::<ConfigMap>(&client, ns), children.clone())
        .owns(scoped::<ServiceAccount>(&client, ns), children.clone())
        .owns(scoped::<Role>(&client, ns), children.clone())
        .owns(scoped::<RoleBinding>(&client, ns), children.clone())
        .owns(scoped::<Deployment>(&client, ns), children.clone())
        .owns(scoped::<Service>(&client, ns), children.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, ns), children.clone())
        .owns(scoped::<HorizontalPodAutoscaler>(&client, ns), children)
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
        match apply(&ms, &ctx).await {
            Ok(deployment) => {
                ctx.failures.lock().expect("not poisoned").remove(&key);
                update_status(&ms, &ctx, Some(&deployment), None).await?;
                Ok(Action::requeue(ctx.settings.resync))
            }
            Err(e) => {
                ctx.metrics.reconcile_failed(e.reason());
                let failure = Failure {
                    reason: e.reason().into(),
                    message: e.to_string(),
                };
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
                if let Err(status_err) = update_status(&ms, &ctx, None, Some(failure)).await {
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

/// A child fetched before applying, to detect collisions and creations.
struct Existing {
    what: String,
    version: Option<String>,
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

/// Reads the current object named like `obj`; `Err` names it when it is not
/// controlled by `ms`.
async fn check<K>(ms: &MicroService, client: &Client, obj: &K) -> Result<Option<Existing>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let ns = ms.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let name = obj.name_any();
    let what = format!("{} {ns}/{name}", K::kind(&()));
    match api.get_opt(&name).await? {
        Some(current)
            if !render::is_controlled_by(current.meta().owner_references.as_deref(), ms) =>
        {
            Err(Error::NameCollision(vec![what]))
        }
        Some(current) => Ok(Some(Existing {
            what,
            version: version(&current),
        })),
        None => Ok(None),
    }
}

async fn ssa<K>(client: &Client, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api
        .patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?)
}

/// Collects collisions over all children before the first write.
#[derive(Default)]
struct Preflight {
    collisions: Vec<String>,
    existing: Vec<Option<Existing>>,
}

impl Preflight {
    fn record(&mut self, r: Result<Option<Existing>, Error>) -> Result<(), Error> {
        match r {
            Ok(e) => self.existing.push(e),
            Err(Error::NameCollision(mut names)) => self.collisions.append(&mut names),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Applies every child; returns the Deployment as the apiserver has it.
async fn apply(ms: &MicroService, ctx: &Context) -> Result<Deployment, Error> {
    let c: Children = render::render(ms, &ctx.settings.render)?;
    let client = &ctx.client;

    // 1. Nothing is written while any child's name is taken by someone else.
    let mut pre = Preflight::default();
    pre.record(check(ms, client, &c.config).await)?;
    pre.record(check(ms, client, &c.policy).await)?;
    pre.record(check(ms, client, &c.service_account).await)?;
    pre.record(check(ms, client, &c.role).await)?;
    pre.record(check(ms, client, &c.role_binding).await)?;
    pre.record(check(ms, client, &c.deployment).await)?;
    pre.record(check(ms, client, &c.service).await)?;
    if let Some(pdb) = &c.pdb {
        pre.record(check(ms, client, pdb).await)?;
    }
    if let Some(hpa) = &c.hpa {
        pre.record(check(ms, client, hpa).await)?;
    }
    if !pre.collisions.is_empty() {
        return Err(Error::NameCollision(pre.collisions));
    }

    // 2. Apply, in the order a pod needs them: config and RBAC before the Deployment.
    let mut after = Vec::new();
    after.push(version(&ssa(client, &c.config).await?));
    after.push(version(&ssa(client, &c.policy).await?));
    after.push(version(&ssa(client, &c.service_account).await?));
    after.push(version(&ssa(client, &c.role).await?));
    after.push(version(&ssa(client, &c.role_binding).await?));
    let deployment = ssa(client, &c.deployment).await?;
    after.push(version(&deployment));
    after.push(version(&ssa(client, &c.service).await?));
    if let Some(pdb) = &c.pdb {
        after.push(version(&ssa(client, pdb).await?));
    }
    if let Some(hpa) = &c.hpa {
        after.push(version(&ssa(client, hpa).await?));
    }

    // 3. Remove what is no longer wanted (only our own).
    let mut removed = Vec::new();
    if c.pdb.is_none() && remove::<PodDisruptionBudget>(ms, client).await? {
        removed.push("PodDisruptionBudget");
    }
    if c.hpa.is_none() && remove::<HorizontalPodAutoscaler>(ms, client).await? {
        removed.push("HorizontalPodAutoscaler");
    }

    // 4. Say what changed.
    let names = child_names(&c);
    let mut created = Vec::new();
    let mut updated = Vec::new();
    for ((before, rv), name) in pre.existing.iter().zip(&after).zip(&names) {
        match before {
            None => created.push(name.clone()),
            Some(b) if b.version != *rv => updated.push(b.what.clone()),
            Some(_) => {}
        }
    }
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
    Ok(deployment)
}

fn child_names(c: &Children) -> Vec<String> {
    fn n<K: Resource<DynamicType = ()>>(k: &K) -> String {
        format!(
            "{} {}",
            K::kind(&()),
            k.meta().name.as_deref().unwrap_or_default()
        )
    }
    let mut v = vec![
        n(&c.config),
        n(&c.policy),
        n(&c.service_account),
        n(&c.role),
        n(&c.role_binding),
        n(&c.deployment),
        n(&c.service),
    ];
    v.extend(c.pdb.as_ref().map(n));
    v.extend(c.hpa.as_ref().map(n));
    v
}

/// Deletes the child of kind `K` named like the MicroService, if this
/// MicroService controls it. True when something was deleted.
async fn remove<K>(ms: &MicroService, client: &Client) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &ms.namespace().unwrap_or_default());
    let name = ms.name_any();
    match api.get_opt(&name).await? {
        Some(obj) if render::is_controlled_by(obj.meta().owner_references.as_deref(), ms) => {
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        _ => Ok(false),
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
async fn publish(
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
