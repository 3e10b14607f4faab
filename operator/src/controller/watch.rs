//! The watches: the children's caches, the triggers that bring a
//! MicroService back when one of its children changes, and the backoff of
//! each watch. (The watch of the Secrets MicroServices list is in
//! `secrets.rs`.)

use super::{
    secrets::SecretMeta,
    slim::{Unverified, is_operators, slim},
    *,
};

/// The watches' caches of the children's kinds: every object of those kinds
/// in the watched namespaces, so a name missing from a cache is free, each
/// reduced to what reconciling reads (`controller/slim.rs`).
#[derive(Clone)]
pub struct Caches {
    pub(super) config_maps: Store<ConfigMap>,
    pub(super) service_accounts: Store<ServiceAccount>,
    pub(super) roles: Store<Role>,
    pub(super) role_bindings: Store<RoleBinding>,
    pub(super) deployments: Store<Deployment>,
    pub(super) services: Store<Service>,
    pub(super) pdbs: Store<PodDisruptionBudget>,
    pub(super) hpas: Store<HorizontalPodAutoscaler>,
    /// Not children: the metadata of the Secrets MicroServices list
    /// (`controller/secrets.rs`).
    pub(super) secrets: Store<SecretMeta>,
    /// The MicroServices themselves, as the controller's own watch has them
    /// (authorization rules name other MicroServices: `controller/callers.rs`).
    pub(super) microservices: Store<MicroService>,
    /// Full copies of children not yet compared with what is rendered.
    pub(super) unverified: Unverified,
}

impl Caches {
    /// Waits until every child kind's cache has had its first full list, so
    /// that an object missing from one does not exist (as of the watch).
    /// False when a watch ended first (the controller is stopping).
    pub(super) async fn ready(&self) -> bool {
        grants::until_ready(&self.config_maps).await
            && grants::until_ready(&self.service_accounts).await
            && grants::until_ready(&self.roles).await
            && grants::until_ready(&self.role_bindings).await
            && grants::until_ready(&self.deployments).await
            && grants::until_ready(&self.services).await
            && grants::until_ready(&self.pdbs).await
            && grants::until_ready(&self.hpas).await
    }
}

/// A kind of child the operator renders, applies and watches, with the
/// cache its watch fills.
pub(crate) trait ChildKind:
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
    /// Drops everything but the metadata.
    fn clear_body(&mut self);
}

macro_rules! child_kinds {
    ($($kind:ty => $field:ident { $($body:ident),* }),* $(,)?) => {
        $(impl ChildKind for $kind {
            fn store(caches: &Caches) -> &Store<Self> {
                &caches.$field
            }
            fn clear_body(&mut self) {
                $(self.$body = Default::default();)*
            }
        })*
    };
}

child_kinds! {
    ConfigMap => config_maps { data, binary_data, immutable },
    ServiceAccount => service_accounts { secrets, image_pull_secrets, automount_service_account_token },
    Role => roles { rules },
    RoleBinding => role_bindings { subjects, role_ref },
    Deployment => deployments { spec, status },
    Service => services { spec, status },
    PodDisruptionBudget => pdbs { spec, status },
    HorizontalPodAutoscaler => hpas { spec, status },
}

/// The watch of one kind of child: its cache (every object of the kind in
/// scope, see [`Caches`]), and the stream of changed children that triggers
/// their owners' reconciles. Only the operator's objects trigger; changes of
/// the status alone do not, except the Deployment's rollout figures that the
/// MicroService's status shows; deletions always do.
pub(super) fn child_watch<K: ChildKind>(
    client: &Client,
    ns: Option<&str>,
    config: &watcher::Config,
    applied: &Arc<Mutex<HashMap<String, Applied>>>,
    unverified: &Unverified,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = reflector::store::<K>();
    let (applied, unverified) = (applied.clone(), unverified.clone());
    let (slim_applied, slim_unverified) = (applied.clone(), unverified.clone());
    let mut seen: HashMap<String, u64> = HashMap::new();
    let trigger = watcher(scoped::<K>(client, ns), config.clone())
        .modify(move |k| slim(k, &slim_applied, &slim_unverified))
        .backoff(WatchBackoff::default())
        .reflect(writer)
        .filter_map(move |event| {
            let out = match event {
                Ok(watcher::Event::Apply(k) | watcher::Event::InitApply(k)) => {
                    let key = child_key(&k);
                    if !is_operators(k.meta()) {
                        // Not ours (any more): a reconcile has nothing to do with it.
                        seen.remove(&key);
                        return future::ready(None);
                    }
                    let fp = child_fingerprint(&k);
                    (seen.insert(key, fp) != Some(fp)).then_some(Ok(k))
                }
                Ok(watcher::Event::Delete(k)) => {
                    let key = child_key(&k);
                    if seen.remove(&key).is_none() && !is_operators(k.meta()) {
                        return future::ready(None);
                    }
                    unverified.lock().expect("not poisoned").remove(&key);
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

pub(super) fn child_key<K: Resource<DynamicType = ()>>(k: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        k.meta().namespace.as_deref().unwrap_or_default(),
        k.meta().name.as_deref().unwrap_or_default()
    )
}

/// What of a child's change matters to its owner: everything but the status
/// and the bookkeeping metadata (of a cached child, its content fingerprint
/// stands for its content); of a Deployment, the [`status::Rollout`] the
/// MicroService's status is computed from.
pub(super) fn child_fingerprint<K: Resource<DynamicType = ()> + Serialize + 'static>(k: &K) -> u64 {
    let rollout = (k as &dyn std::any::Any)
        .downcast_ref::<Deployment>()
        .map(status::rollout);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    super::slim::without_bookkeeping(k).to_string().hash(&mut h);
    rollout.hash(&mut h);
    h.finish()
}

/// What of a MicroService's change needs a reconcile: not its status.
pub(super) fn ms_fingerprint(ms: &MicroService) -> Option<u64> {
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
pub(super) struct NoPause;

impl Iterator for NoPause {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl Backoff for NoPause {
    fn reset(&mut self) {}
}

pub(super) fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Writers of the caches, for tests that fill them as the watches would.
#[cfg(test)]
pub(super) struct CacheWriters {
    config_maps: reflector::store::Writer<ConfigMap>,
    service_accounts: reflector::store::Writer<ServiceAccount>,
    roles: reflector::store::Writer<Role>,
    role_bindings: reflector::store::Writer<RoleBinding>,
    deployments: reflector::store::Writer<Deployment>,
    services: reflector::store::Writer<Service>,
    pdbs: reflector::store::Writer<PodDisruptionBudget>,
    hpas: reflector::store::Writer<HorizontalPodAutoscaler>,
    secrets: reflector::store::Writer<SecretMeta>,
    microservices: reflector::store::Writer<MicroService>,
    unverified: Unverified,
}

#[cfg(test)]
impl Caches {
    /// Empty caches, listed (ready), and their writers.
    pub(super) fn for_tests() -> (Self, CacheWriters) {
        let (config_maps, mut cm) = reflector::store();
        let (service_accounts, mut sa) = reflector::store();
        let (roles, mut role) = reflector::store();
        let (role_bindings, mut rb) = reflector::store();
        let (deployments, mut deploy) = reflector::store();
        let (services, mut svc) = reflector::store();
        let (pdbs, mut pdb) = reflector::store();
        let (hpas, mut hpa) = reflector::store();
        let (secrets, secret) = reflector::store();
        let (microservices, ms) = reflector::store();
        // Listed, and empty: what a reconcile waits for.
        for ready in [
            &mut cm,
            &mut sa,
            &mut role,
            &mut rb,
            &mut deploy,
            &mut svc,
            &mut pdb,
            &mut hpa,
        ] as [&mut dyn Listed; 8]
        {
            ready.listed();
        }
        let caches = Self {
            config_maps,
            service_accounts,
            roles,
            role_bindings,
            deployments,
            services,
            pdbs,
            hpas,
            secrets,
            microservices,
            unverified: Unverified::default(),
        };
        let writers = CacheWriters {
            unverified: caches.unverified.clone(),
            config_maps: cm,
            service_accounts: sa,
            roles: role,
            role_bindings: rb,
            deployments: deploy,
            services: svc,
            pdbs: pdb,
            hpas: hpa,
            secrets: secret,
            microservices: ms,
        };
        (caches, writers)
    }
}

/// A writer that can be told its first list is done.
#[cfg(test)]
trait Listed {
    fn listed(&mut self);
}

#[cfg(test)]
impl<K: ChildKind> Listed for reflector::store::Writer<K> {
    fn listed(&mut self) {
        self.apply_watcher_event(&watcher::Event::Init);
        self.apply_watcher_event(&watcher::Event::InitDone);
    }
}

#[cfg(test)]
impl CacheWriters {
    /// Puts `object`, a child of any kind as JSON, in its cache, as the
    /// watch would.
    pub(super) fn insert(&mut self, object: &serde_json::Value) {
        fn put<K: ChildKind>(
            w: &mut reflector::store::Writer<K>,
            unverified: &Unverified,
            o: &serde_json::Value,
        ) {
            let mut k: K = serde_json::from_value(o.clone()).expect("a child object");
            // A watch of a fresh start: nothing known yet.
            slim(&mut k, &Mutex::default(), unverified);
            w.apply_watcher_event(&watcher::Event::Apply(k));
        }
        let u = &self.unverified;
        match object["kind"].as_str().unwrap_or_default() {
            "ConfigMap" => put(&mut self.config_maps, u, object),
            "ServiceAccount" => put(&mut self.service_accounts, u, object),
            "Role" => put(&mut self.roles, u, object),
            "RoleBinding" => put(&mut self.role_bindings, u, object),
            "Deployment" => put(&mut self.deployments, u, object),
            "Service" => put(&mut self.services, u, object),
            "PodDisruptionBudget" => put(&mut self.pdbs, u, object),
            "HorizontalPodAutoscaler" => put(&mut self.hpas, u, object),
            // As the Secrets' watch has them: metadata, stripped.
            "Secret" => {
                let mut meta: SecretMeta =
                    serde_json::from_value(object.clone()).expect("a Secret");
                super::secrets::strip(&mut meta);
                self.secrets
                    .apply_watcher_event(&watcher::Event::Apply(meta));
            }
            "MicroService" => {
                let ms: MicroService =
                    serde_json::from_value(object.clone()).expect("a MicroService");
                self.microservices
                    .apply_watcher_event(&watcher::Event::Apply(ms));
            }
            other => panic!("not a child kind: {other:?}"),
        }
    }
}
