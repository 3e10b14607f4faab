//! Grants: the sidecar's read of EndpointSlices in the namespaces its
//! dependencies live in, when that is not its own.
//!
//! The sidecar's own Role (see [`render`](crate::render)) covers its own
//! namespace only. For each other namespace a dependency names, the operator
//! renders a Role (get, list and watch of EndpointSlices, nothing else) and a
//! RoleBinding to the sidecar's ServiceAccount, in that namespace.
//!
//! Kubernetes refuses owner references across namespaces, so the garbage
//! collector cannot remove these: each carries the owning MicroService in
//! labels ([`OWNER_NAMESPACE_LABEL`], [`OWNER_NAME_LABEL`]) and the operator
//! removes them itself. A grant whose dependency went away is deleted by the
//! owner's reconcile; a grant whose MicroService is gone is deleted by a
//! sweep ([`sweep`]) that runs when a MicroService is deleted, after every
//! full list of MicroServices (so deletions made while the operator was down
//! count too) and at each resync. The sweep deletes a grant only when the
//! MicroService cache lacks its owner *and* a fresh list by name finds none.
//!
//! Why not a finalizer on the MicroService: a finalizer blocks the deletion
//! of every MicroService, and of its namespace, for as long as no operator
//! runs (`helm uninstall` leaves MicroServices behind, and an uninstalled
//! operator never comes back to remove it), for the sake of a grant that only
//! lets a ServiceAccount read EndpointSlices. The sweep never blocks a
//! deletion; the cost is that a grant may outlive its MicroService until the
//! operator runs again.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams},
    runtime::{
        events::EventType,
        reflector::{ObjectRef, Store},
    },
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    controller::{self, Caches, ChildKind, Context, Error, Plan, Preflight},
    crd::MicroService,
    render::{FIELD_MANAGER, MANAGED_BY_LABEL, RenderError},
};

/// The label naming the namespace of the MicroService a grant is for.
pub const OWNER_NAMESPACE_LABEL: &str = "trellis.dev/microservice-namespace";
/// The label naming the MicroService a grant is for.
pub const OWNER_NAME_LABEL: &str = "trellis.dev/microservice-name";

/// The Role and RoleBinding that let one sidecar read EndpointSlices in one
/// namespace other than its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// The namespace of the dependency (where both objects live).
    pub namespace: String,
    /// get, list and watch of EndpointSlices.
    pub role: Role,
    /// Binds [`Grant::role`] to the sidecar's ServiceAccount.
    pub role_binding: RoleBinding,
}

/// The name of a grant's Role and RoleBinding in the dependency's namespace:
/// `trellis-sidecar.<namespace>.<name>` of the MicroService. Namespaces and
/// MicroService names are DNS labels, so the dots keep two MicroServices
/// apart and no child of a MicroService (`<name>`, `<name>-sidecar`) can
/// take it.
pub fn grant_name(ms_namespace: &str, ms_name: &str) -> String {
    format!("trellis-sidecar.{ms_namespace}.{ms_name}")
}

/// The namespaces other than its own that a MicroService's dependencies name.
pub fn namespaces(ms: &MicroService) -> BTreeSet<String> {
    let own = ms.metadata.namespace.as_deref().unwrap_or_default();
    ms.spec
        .dependencies
        .iter()
        .map(|d| d.namespace_or(own))
        .filter(|ns| *ns != own)
        .map(str::to_owned)
        .collect()
}

/// The labels of every grant of `ms_namespace/ms_name`.
pub fn labels(ms_namespace: &str, ms_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/part-of".into(), "trellis".into()),
        (MANAGED_BY_LABEL.into(), FIELD_MANAGER.into()),
        (OWNER_NAMESPACE_LABEL.into(), ms_namespace.into()),
        (OWNER_NAME_LABEL.into(), ms_name.into()),
    ])
}

/// The MicroService a grant is for, from its labels; `None` for any other object.
pub fn owner(meta: &ObjectMeta) -> Option<ObjectRef<MicroService>> {
    let labels = meta.labels.as_ref()?;
    let ns = labels.get(OWNER_NAMESPACE_LABEL)?;
    let name = labels.get(OWNER_NAME_LABEL)?;
    Some(ObjectRef::new(name).within(ns))
}

/// True when `meta` is a grant of `ms`.
pub fn is_granted_by(meta: &ObjectMeta, ms: &MicroService) -> bool {
    owner(meta).is_some_and(|o| {
        Some(o.name.as_str()) == ms.metadata.name.as_deref()
            && o.namespace.as_deref() == ms.metadata.namespace.as_deref()
    })
}

/// Renders one [`Grant`] per namespace in [`namespaces`].
pub fn render(ms: &MicroService) -> Result<Vec<Grant>, RenderError> {
    let name = ms
        .metadata
        .name
        .as_deref()
        .ok_or(RenderError::MissingMetadata("name"))?;
    let own = ms
        .metadata
        .namespace
        .as_deref()
        .ok_or(RenderError::MissingMetadata("namespace"))?;
    let object = grant_name(own, name);
    Ok(namespaces(ms)
        .into_iter()
        .map(|ns| {
            let meta = ObjectMeta {
                name: Some(object.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels(own, name)),
                ..ObjectMeta::default()
            };
            Grant {
                role: Role {
                    metadata: meta.clone(),
                    rules: Some(vec![PolicyRule {
                        api_groups: Some(vec!["discovery.k8s.io".into()]),
                        resources: Some(vec!["endpointslices".into()]),
                        verbs: vec!["get".into(), "list".into(), "watch".into()],
                        ..PolicyRule::default()
                    }]),
                },
                role_binding: RoleBinding {
                    metadata: meta,
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "Role".into(),
                        name: object.clone(),
                    },
                    // The sidecar's ServiceAccount is named like the MicroService.
                    subjects: Some(vec![Subject {
                        kind: "ServiceAccount".into(),
                        name: name.into(),
                        namespace: Some(own.into()),
                        ..Subject::default()
                    }]),
                },
                namespace: ns,
            }
        })
        .collect())
}

/// The MicroServices to reconcile when a Role or RoleBinding changes: its
/// controlling MicroService (a child in the same namespace) or the one it
/// grants to (a grant in another namespace).
pub fn owners<K: Resource<DynamicType = ()>>(obj: K) -> Option<ObjectRef<MicroService>> {
    let meta = obj.meta();
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true))
        .find_map(|o| ObjectRef::from_owner_ref(meta.namespace.as_deref(), o, ()));
    controller.or_else(|| owner(meta))
}

/// True when the API answered that a namespace does not exist: server-side
/// apply of an object can only be "not found" for that reason.
fn namespace_missing(e: &Error) -> bool {
    matches!(e, Error::Kube(kube::Error::Api(s)) if s.code == 404)
}

/// Makes the grants of `ms` what its dependencies need: applies the missing
/// or changed ones and deletes those no dependency names any more.
///
/// A namespace that does not exist yet is skipped and reported in
/// [`Error::DependencyNamespaceMissing`] once everything else is done, so the
/// reconcile is retried with backoff until it appears. A namespaced operator
/// cannot grant outside its namespace: [`Error::DependencyOutOfScope`].
pub(crate) async fn sync(ms: &MicroService, ctx: &Context) -> Result<(), Error> {
    let wanted = render(ms)?;
    if let Some(watched) = &ctx.settings.namespace {
        let outside: Vec<String> = wanted.into_iter().map(|g| g.namespace).collect();
        if outside.is_empty() {
            return Ok(());
        }
        return Err(Error::DependencyOutOfScope {
            namespaces: outside,
            watched: watched.clone(),
        });
    }

    // Nothing is written while a grant's name is taken by someone else.
    let mut pre = Preflight::default();
    let mut steps = Vec::new();
    for g in wanted.iter().cloned() {
        let role = pre.record(controller::plan(ms, ctx, g.role).await)?;
        let binding = pre.record(controller::plan(ms, ctx, g.role_binding).await)?;
        steps.push((g.namespace, role, binding));
    }
    if !pre.collisions.is_empty() {
        return Err(Error::NameCollision(pre.collisions));
    }

    let mut granted = Vec::new();
    let mut missing = Vec::new();
    for (ns, role, binding) in steps {
        let (Some(role), Some(binding)) = (role, binding) else {
            unreachable!("a grant without a step is a collision");
        };
        let created = matches!(role.plan, Plan::Create) || matches!(binding.plan, Plan::Create);
        let applied = async {
            controller::execute(ctx, &role).await?;
            controller::execute(ctx, &binding).await
        }
        .await;
        match applied {
            Ok(_) if created => granted.push(ns),
            Ok(_) => {}
            Err(e) if namespace_missing(&e) => missing.push(ns),
            Err(e) => return Err(e),
        }
    }

    // Grants of this MicroService in namespaces no dependency names.
    let keep: BTreeSet<&str> = wanted.iter().map(|g| g.namespace.as_str()).collect();
    let stale = |meta: &ObjectMeta| {
        is_granted_by(meta, ms) && !keep.contains(meta.namespace.as_deref().unwrap_or_default())
    };
    let mut revoked = BTreeSet::new();
    for ns in delete_matching::<Role>(ctx, &stale).await? {
        revoked.insert(ns);
    }
    for ns in delete_matching::<RoleBinding>(ctx, &stale).await? {
        revoked.insert(ns);
    }

    if !granted.is_empty() {
        info!(namespaces = ?granted, "granted EndpointSlice reads");
        controller::publish(
            ms,
            ctx,
            EventType::Normal,
            "Granted",
            "Apply",
            &format!(
                "the sidecar may read EndpointSlices in {}",
                granted.join(", ")
            ),
        )
        .await;
    }
    if !revoked.is_empty() {
        let revoked: Vec<String> = revoked.into_iter().collect();
        info!(namespaces = ?revoked, "revoked EndpointSlice reads");
        controller::publish(
            ms,
            ctx,
            EventType::Normal,
            "Revoked",
            "Apply",
            &format!(
                "the sidecar no longer reads EndpointSlices in {}",
                revoked.join(", ")
            ),
        )
        .await;
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::DependencyNamespaceMissing(missing))
    }
}

/// Deletes the cached objects of kind `K` for which `matches` holds; returns
/// their namespaces.
async fn delete_matching<K: ChildKind>(
    ctx: &Context,
    matches: &(dyn Fn(&ObjectMeta) -> bool + Sync),
) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    for obj in K::store(&ctx.caches).state() {
        if !matches(obj.meta()) {
            continue;
        }
        let ns = obj.namespace().unwrap_or_default();
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
        match api
            .delete(&obj.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => done.push(ns),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// The grants in the caches whose MicroService is not in `microservices`.
pub(crate) fn orphans(
    caches: &Caches,
    microservices: &Store<MicroService>,
) -> HashSet<ObjectRef<MicroService>> {
    let roles = Role::store(caches).state();
    let bindings = RoleBinding::store(caches).state();
    roles
        .iter()
        .map(|r| r.meta())
        .chain(bindings.iter().map(|b| b.meta()))
        .filter_map(owner)
        .filter(|o| microservices.get(o).is_none())
        .collect()
}

/// The task running [`sweep`]; stopped when dropped, so it ends with the
/// controller that started it, however that ends.
pub(crate) struct Sweeper(tokio::task::JoinHandle<()>);

impl Sweeper {
    /// Starts the sweep; only a cluster-wide operator runs it (a namespaced
    /// one makes no grants).
    pub(crate) fn spawn(
        ctx: Arc<Context>,
        microservices: Store<MicroService>,
        wake: Arc<Notify>,
    ) -> Self {
        Self(tokio::spawn(sweep(ctx, microservices, wake)))
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes the grants of MicroServices that no longer exist, each time
/// `wake` is notified and every `resync`, once the caches are filled.
async fn sweep(ctx: Arc<Context>, microservices: Store<MicroService>, wake: Arc<Notify>) {
    let ready = until_ready(&microservices).await
        && until_ready(Role::store(&ctx.caches)).await
        && until_ready(RoleBinding::store(&ctx.caches)).await;
    if !ready {
        return;
    }
    loop {
        for gone in orphans(&ctx.caches, &microservices) {
            if let Err(e) = sweep_one(&ctx, &gone).await {
                warn!(microservice = %gone, error = %e, "could not remove the grants of a deleted MicroService");
            }
        }
        let _ = tokio::time::timeout(ctx.settings.resync, wake.notified()).await;
        // Let a burst of deletions settle into one pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `store` has had its first full list; false when its writer
/// is gone first.
///
/// kube's `Store::wait_until_ready` wakes only the last of several tasks
/// waiting at once (the one-shot channel behind it keeps a single waker),
/// and the controller waits on the MicroService store too, so a single
/// wait here could sleep forever. Each wait is given up after a second and
/// made again, which registers this task anew.
pub(crate) async fn until_ready<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(ready) =
            tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await
        {
            return ready.is_ok();
        }
    }
}

/// Deletes the grants of `gone` when a list by name confirms it does not exist.
async fn sweep_one(ctx: &Context, gone: &ObjectRef<MicroService>) -> Result<(), Error> {
    let ns = gone.namespace.as_deref().unwrap_or_default();
    let api: Api<MicroService> = Api::namespaced(ctx.client.clone(), ns);
    let found = api
        .list_metadata(&ListParams::default().fields(&format!("metadata.name={}", gone.name)))
        .await?;
    if !found.items.is_empty() {
        debug!(microservice = %gone, "a grant's MicroService exists; the cache lags");
        return Ok(());
    }
    let of_gone = |meta: &ObjectMeta| owner(meta).as_ref() == Some(gone);
    let mut swept = delete_matching::<Role>(ctx, &of_gone).await?;
    swept.extend(delete_matching::<RoleBinding>(ctx, &of_gone).await?);
    if !swept.is_empty() {
        swept.sort();
        swept.dedup();
        info!(microservice = %gone, namespaces = ?swept, "removed the grants of a deleted MicroService");
    }
    Ok(())
}

#[cfg(test)]
#[path = "grants_tests.rs"]
mod tests;
