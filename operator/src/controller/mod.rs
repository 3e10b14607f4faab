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
//! Reads come from the watches' caches ([`Caches`]), not from the apiserver.
//! The caches hold every object of the children's kinds in the watched
//! namespaces, reduced to what reconciling reads (`controller/slim.rs`:
//! anyone else's to metadata, the operator's own to metadata, a content
//! fingerprint and a Deployment's rollout figures), and a reconcile waits
//! until each has listed once: a name missing from the cache is free and the
//! child is created without a read, one taken by someone else is refused
//! from memory. A child that already holds what is rendered (same
//! [`APPLIED_HASH_ANNOTATION`], and every rendered field equal, as recorded
//! for its content fingerprint) is not written again, and the status is
//! written only when it changes; so a reconcile of a converged MicroService
//! makes no request.
//!
//! Every watch backs off on its own after an error ([`WatchBackoff`]).
//! kube-runtime's `Controller` would otherwise pause its one merged trigger
//! stream, all watches at once, with a backoff growing to 30 s (plus jitter)
//! after any watch error, and an API outage makes every watch fail at
//! once, so events would stop for the length of that backoff after each
//! restart of the apiserver.

use std::{
    collections::HashMap,
    fmt::Debug,
    future::Future,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
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

mod apply;
mod callers;
mod error;
#[cfg(test)]
mod fake_api;
#[cfg(test)]
mod reconcile_tests;
mod report;
mod report_wait;
mod secrets;
mod slim;
#[cfg(test)]
mod tests;
mod watch;

pub use apply::APPLIED_HASH_ANNOTATION;
use apply::{Applied, AppliedDeployment, apply};
pub(crate) use apply::{Plan, Preflight, execute, plan};
pub use error::Error;
use error::list_failure_hint;
pub(crate) use report::publish;
use report::{Written, update_status};
use report_wait::ReportWait;
pub use watch::Caches;
pub(crate) use watch::ChildKind;
pub use watch::WatchBackoff;
use watch::{NoPause, child_key, child_watch, ms_fingerprint, scoped};

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
    /// The longest a MicroService's status waits for the Deployment
    /// controller to report on a Deployment the operator created or
    /// changed. Waiting makes the way to Ready one status write and one
    /// Event; zero writes a status at once (Progressing) and another when
    /// the report comes. No status waits while that controller is behind
    /// (`controller/report_wait.rs`).
    pub report_wait: Duration,
    /// Reconcile only the MicroServices with these labels (a label selector,
    /// `key=value,...`); all when `None`.
    pub selector: Option<String>,
    /// The mesh identity sidecars get, once the trust bundle exists;
    /// `None`: sidecars speak plaintext.
    pub identity: Option<IdentityConfig>,
}

/// Where the mesh identity comes from.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// The trust domain of SPIFFE IDs.
    pub trust_domain: String,
    /// The identity service's `host:port`.
    pub issuer_address: String,
    /// The namespace of the `trellis-trust-bundle` ConfigMap.
    pub bundle_namespace: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            render: RenderConfig::default(),
            namespace: None,
            concurrency: 4,
            instance: None,
            resync: Duration::from_secs(300),
            report_wait: REPORT_WAIT,
            selector: None,
            identity: None,
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
    /// Whether a status waits for the Deployment controller's report.
    report_wait: ReportWait,
    /// The statuses written that the cache may not show yet.
    written: Written,
    /// The children's caches.
    pub(crate) caches: Caches,
    /// The last apply per child (`Kind/namespace/name`); forgotten when the
    /// watch reports the child deleted.
    applied: Arc<Mutex<HashMap<String, Applied>>>,
    /// The trust bundle as last read (PEM), when identity is on.
    trust_bundle: Arc<std::sync::RwLock<Option<String>>>,
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
        let report_wait = settings.report_wait;
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            failures: Mutex::default(),
            report_wait: ReportWait::new(report_wait),
            written: Written::default(),
            caches,
            applied,
            trust_bundle: Arc::default(),
        }
    }

    /// Forgets what is kept per MicroService, once it is deleted.
    fn forget(&self, key: &ObjectRef<MicroService>) {
        self.failures.lock().expect("not poisoned").remove(key);
        self.report_wait.forget(key);
        self.written.forget(key);
    }

    /// What rendering needs now: the settings, with the mesh identity once
    /// the trust bundle has been read.
    pub fn render_config(&self) -> RenderConfig {
        let mut cfg = self.settings.render.clone();
        if let (Some(id), Some(bundle)) = (
            &self.settings.identity,
            self.trust_bundle.read().expect("bundle lock").clone(),
        ) {
            cfg.mesh = Some(trellis_policy::MeshIdentity {
                trust_domain: id.trust_domain.clone(),
                trust_bundle: bundle,
                issuer_address: id.issuer_address.clone(),
            });
        }
        cfg
    }
}

/// Follows the trust bundle ConfigMap: each change is stored in `slot`
/// and yields `()`, so every MicroService is reconciled and its sidecars
/// get the new bundle through their policy (a root rotation's overlap).
fn trust_bundle_watch(
    client: &Client,
    id: &IdentityConfig,
    slot: Arc<std::sync::RwLock<Option<String>>>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &id.bundle_namespace);
    let config = watcher::Config::default().fields(&format!(
        "metadata.name={}",
        crate::identity::store::TRUST_BUNDLE
    ));
    watcher(api, config)
        .backoff(WatchBackoff::default())
        .applied_objects()
        .filter_map(move |cm| {
            let slot = slot.clone();
            async move {
                let bundle = cm
                    .ok()?
                    .data?
                    .remove(crate::identity::store::TRUST_BUNDLE_KEY)?;
                let mut current = slot.write().expect("bundle lock");
                if current.as_deref() == Some(bundle.as_str()) {
                    return None;
                }
                if trellis_identity::TrustBundle::from_pem(&bundle).is_err() {
                    warn!("the trust bundle ConfigMap holds no valid PEM certificate; keeping the last bundle");
                    return None;
                }
                info!("the trust bundle changed; reconciling every MicroService");
                *current = Some(bundle);
                Some(())
            }
        })
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

    // Every object of the children's kinds, not only those with the
    // operator's label: a child's name missing from the cache is then free,
    // and creating it needs no read first. Anyone else's objects are kept as
    // metadata only (`watch::strip_foreign`).
    let children = watcher::Config::default().any_semantic();
    let applied: Arc<Mutex<HashMap<String, Applied>>> = Arc::default();
    let unverified = slim::Unverified::default();
    let (config_maps, cm_trigger) =
        child_watch::<ConfigMap>(&client, ns, &children, &applied, &unverified);
    let (service_accounts, sa_trigger) = child_watch(&client, ns, &children, &applied, &unverified);
    let (roles, role_trigger) = child_watch(&client, ns, &children, &applied, &unverified);
    let (role_bindings, rb_trigger) = child_watch(&client, ns, &children, &applied, &unverified);
    let (deployments, deploy_trigger) = child_watch(&client, ns, &children, &applied, &unverified);
    let (services, svc_trigger) = child_watch(&client, ns, &children, &applied, &unverified);
    let (pdbs, pdb_trigger) = child_watch(&client, ns, &children, &applied, &unverified);
    let (hpas, hpa_trigger) = child_watch(&client, ns, &children, &applied, &unverified);
    // Secrets are not children: metadata only, every one in scope, since a
    // MicroService may list any Secret of its namespace.
    let (secrets, secret_trigger) = secrets::secret_watch(&client, ns);
    // The MicroServices: only a change the reconcile acts on (spec, labels,
    // annotations, deletion) triggers one, not the status it writes itself.
    let (ms_store, ms_writer) = reflector::store::<MicroService>();
    let caches = Caches {
        config_maps,
        service_accounts,
        roles,
        role_bindings,
        deployments,
        services,
        pdbs,
        hpas,
        secrets,
        microservices: ms_store.clone(),
        unverified,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        caches,
        applied,
    ));

    // A deletion, or a full list that may have missed some, wakes the sweep
    // of grants left by deleted MicroServices.
    let mut ms_config = watcher::Config::default().any_semantic();
    if let Some(selector) = &ctx.settings.selector {
        ms_config = ms_config.labels(selector);
    }
    let swept = Arc::new(Notify::new());
    let wake = swept.clone();
    let deleted = ctx.clone();
    let ms_trigger = watcher(microservices, ms_config)
        .backoff(WatchBackoff::default())
        // Nothing reads who manages which field; at a thousand MicroServices
        // the field sets are megabytes of the cache.
        .modify(|ms| ms.meta_mut().managed_fields = None)
        .reflect(ms_writer)
        .inspect(move |e| {
            if let Ok(watcher::Event::Delete(ms)) = e {
                // No reconcile comes for a MicroService gone from the cache.
                deleted.forget(&ObjectRef::from_obj(ms));
            }
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
    let listing = ms_store.clone();
    let bundle_changes: futures::stream::BoxStream<'static, ()> = match &ctx.settings.identity {
        Some(id) => Box::pin(trust_bundle_watch(&client, id, ctx.trust_bundle.clone())),
        None => Box::pin(futures::stream::pending()),
    };
    Controller::for_stream(ms_trigger, ms_store)
        .reconcile_all_on(bundle_changes)
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
        // A listed Secret created, changed or deleted: the MicroServices
        // listing it roll their pods or report it missing.
        .watches_stream(secret_trigger, move |secret| {
            secrets::referencing(&listing, &secret)
        })
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
            ctx.forget(&ObjectRef::from_obj(ms.as_ref()));
            return Ok(Action::await_change());
        }
        // A name missing from the caches is free only once they have listed.
        // False only when a watch ended: the controller is stopping.
        if !ctx.caches.ready().await {
            return Ok(Action::await_change());
        }
        let key = ObjectRef::from_obj(ms.as_ref());
        // The grants come after the MicroService's own children, so a
        // dependency namespace that does not exist holds back nothing else.
        let applied = match apply(&ms, &ctx).await {
            Ok(applied) => match grants::sync(&ms, &ctx).await {
                Ok(()) => Ok(applied),
                Err(e) => Err((Some(applied.deployment), e)),
            },
            // The pods keep running as they are: the status counts them.
            Err(e @ Error::SecretMissing { .. }) => Err((own_deployment(&ms, &ctx), e)),
            Err(e) => Err((None, e)),
        };
        match applied {
            Ok(AppliedDeployment {
                deployment,
                changed,
            }) => {
                ctx.failures.lock().expect("not poisoned").remove(&key);
                // A status from a Deployment its controller has not
                // observed yet would be overwritten moments later
                // (`controller/report_wait.rs`). The requeue writes it if
                // the report is later than the wait.
                let observed = status::rollout(&deployment).observed();
                let exists =
                    |ms: &ObjectRef<MicroService>| ctx.caches.microservices.get(ms).is_some();
                if ctx
                    .report_wait
                    .waits(&key, changed, observed, Instant::now(), exists)
                {
                    return Ok(Action::requeue(ctx.settings.report_wait));
                }
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

/// The Deployment of `ms` as the cache has it, if `ms` controls it.
fn own_deployment(ms: &MicroService, ctx: &Context) -> Option<Deployment> {
    let key = ObjectRef::new(&ms.name_any()).within(&ms.namespace().unwrap_or_default());
    Deployment::store(&ctx.caches)
        .get(&key)
        .filter(|d| render::is_controlled_by(d.metadata.owner_references.as_deref(), ms))
        .map(|d| d.as_ref().clone())
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

/// The default of [`Settings::report_wait`].
pub const REPORT_WAIT: Duration = Duration::from_secs(10);

/// The longest wait before retrying a failed reconcile. Nothing else brings
/// a MicroService whose reconcile failed for an API error back: when the
/// apiserver returns, the watches resume from their last resourceVersion
/// without a re-list, so no event fires, and a longer cap would leave a
/// MicroService unreconciled that long after the apiserver is back.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// The delay before retry number `attempt` (from 1), times `jitter`.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = 2f64.powi(attempt.saturating_sub(1).min(16) as i32);
    Duration::from_secs_f64((base * jitter).min(MAX_RETRY_DELAY.as_secs_f64()))
}
