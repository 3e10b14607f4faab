//! The gateway controller: Gateway API `Gateway`s of a class whose
//! `controllerName` is Trellis's become a gateway Deployment and Service
//! running the Trellis sidecar in gateway mode, programmed from the
//! `HTTPRoute`s and `GRPCRoute`s attached to them.
//!
//! - [`api`]: the Gateway API types read and written.
//! - [`model`]: the specification's reasoning, a pure function from what
//!   the controller sees to every status and configuration.
//! - [`deploy`]: a Gateway's data-plane objects.
//! - [`edge_policy`]: the EdgePolicy CRD; [`policy_model`] applies
//!   policies to rules, [`policy_sync`] watches them, reads their key sets
//!   and writes their status.
//!
//! Gateway API objects refer to each other in every direction (a route
//! to Gateways and Services, a Gateway to Secrets, a ReferenceGrant to
//! both), so the controller does not reconcile one object at a time:
//! every change to anything it watches recomputes the whole [`model`]
//! from the caches, after a short quiet period, and writes only what
//! differs from what it wrote last.

pub mod api;
pub mod deploy;
pub mod edge_policy;
pub mod model;
#[cfg(test)]
mod model_tests;
pub mod policy_model;
pub mod policy_sync;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Namespace, Secret, Service},
        discovery::v1::EndpointSlice,
        rbac::v1::ClusterRoleBinding,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use trellis_policy::MeshIdentity;

use self::{
    api::*,
    deploy::{DeploySettings, MANAGED_BY_LABEL, MANAGER},
    model::{Deployed, Key, ServiceInfo, TlsPair, World},
};

/// The `controllerName` a GatewayClass names to be served by Trellis.
pub const CONTROLLER_NAME: &str = "trellis.dev/gateway-controller";

/// What the gateway controller needs.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    /// The controller name it answers to.
    pub controller_name: String,
    /// How data planes are built.
    pub deploy: DeploySettings,
    /// Where the mesh's trust bundle is, when the mesh runs mutual TLS:
    /// (the identity service's address, the trust domain, the namespace
    /// of the `trellis-trust-bundle` ConfigMap).
    pub identity: Option<(String, String, String)>,
    /// Which address a Gateway's status gives.
    pub address_from: AddressFrom,
    /// Only this namespace's Gateways, routes and Services (the chart's
    /// `watchNamespace`); every namespace when `None`.
    pub namespace: Option<String>,
}

/// Which address a Gateway's status gives: where clients reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AddressFrom {
    /// The gateway Service's load-balancer ingress, else its cluster IP.
    Service,
    /// A ready gateway pod's IP: for clusters where clients outside reach
    /// pods but not Services (a single local node).
    Pod,
}

/// The caches of everything the model reads.
#[derive(Clone)]
struct Stores {
    classes: reflector::Store<GatewayClass>,
    gateways: reflector::Store<Gateway>,
    http_routes: reflector::Store<HTTPRoute>,
    grpc_routes: reflector::Store<GRPCRoute>,
    grants: reflector::Store<ReferenceGrant>,
    services: reflector::Store<Service>,
    /// Every namespace's labels, installed for every namespace; installed
    /// for one, its labels are read at each recompute instead.
    namespaces: Option<reflector::Store<Namespace>>,
    /// The gateways' own EndpointSlices: which gateway pods are ready, and
    /// their addresses.
    slices: reflector::Store<EndpointSlice>,
    /// The gateways' Deployments: one deleted by hand is applied again.
    deployments: reflector::Store<Deployment>,
    /// EdgePolicies.
    edge_policies: policy_sync::PolicyStore,
}

impl Stores {
    /// Waits for every cache's first full list, so the first configuration
    /// written after a start is computed from all the routes, not from
    /// whichever list came in first. Says every 30 s what it waits for
    /// (a watch the operator's role does not allow never lists).
    async fn wait_until_ready(&self) {
        let all = async {
            let namespaces = async {
                if let Some(store) = &self.namespaces {
                    let _ = store.wait_until_ready().await;
                }
            };
            let _ = tokio::join!(
                self.classes.wait_until_ready(),
                self.gateways.wait_until_ready(),
                self.http_routes.wait_until_ready(),
                self.grpc_routes.wait_until_ready(),
                self.grants.wait_until_ready(),
                self.services.wait_until_ready(),
                self.slices.wait_until_ready(),
                self.deployments.wait_until_ready(),
                namespaces,
            );
        };
        tokio::pin!(all);
        loop {
            tokio::select! {
                () = &mut all => return,
                () = tokio::time::sleep(Duration::from_secs(30)) => tracing::warn!(
                    "the gateway controller is still waiting for its first lists of Gateway API objects, Services and EndpointSlices; `trellis check` names a missing permission"
                ),
            }
        }
    }
}

/// Starts a reflector of `K` that wakes `changed` on every event.
fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
) -> (reflector::Store<K>, BoxFuture<'static, ()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    // Nothing here reads who manages which field: the caches keep none.
    let objects = watcher(api, config).modify(|k| k.meta_mut().managed_fields = None);
    let stream = reflector(writer, objects)
        .default_backoff()
        .for_each(move |event| {
            if let Err(error) = event {
                tracing::warn!(%kind, %error, "gateway controller watch failed; retrying");
            }
            changed.notify_one();
            async {}
        });
    (reader, Box::pin(stream))
}

/// An API for `K` in the namespace the controller serves, or in all.
pub(super) fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the gateway controller until the future is dropped. Waits, idle,
/// while the Gateway API CRDs are not installed.
pub async fn run(client: Client, settings: GatewaySettings) {
    let classes: Api<GatewayClass> = Api::all(client.clone());
    loop {
        match classes.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(error) => {
                tracing::info!(%error, "the Gateway API CRDs are not installed (or not readable); the gateway controller waits for them");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
    let changed = Arc::new(Notify::new());
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let mut tasks = Vec::new();
    macro_rules! store {
        ($api:expr, $config:expr) => {{
            let (store, task) = follow($api, $config, changed.clone());
            tasks.push(task);
            store
        }};
    }
    let ns = settings.namespace.as_deref();
    let all = watcher::Config::default;
    let stores = Stores {
        classes: store!(Api::all(client.clone()), all()),
        gateways: store!(scoped(&client, ns), all()),
        http_routes: store!(scoped(&client, ns), all()),
        grpc_routes: store!(scoped(&client, ns), all()),
        grants: store!(scoped(&client, ns), all()),
        services: store!(scoped(&client, ns), all()),
        namespaces: ns
            .is_none()
            .then(|| store!(Api::all(client.clone()), all())),
        slices: store!(scoped(&client, ns), managed.clone()),
        deployments: store!(scoped(&client, ns), managed),
        edge_policies: policy_sync::watch(&client, ns, changed.clone(), &mut tasks).await,
    };
    // TLS Secrets, metadata only: a change wakes the controller, which then
    // reads the Secrets its listeners name, and only those.
    let tls = watcher::Config::default().fields("type=kubernetes.io/tls");
    tasks.push(
        follow(
            scoped::<PartialObjectMeta<Secret>>(&client, ns),
            tls,
            changed.clone(),
        )
        .1,
    );
    // The mesh's trust bundle, metadata only: a root rotation reaches every
    // gateway's configuration at once (it is read at each recompute).
    if let Some((_, _, bundle_ns)) = &settings.identity {
        let bundle = watcher::Config::default().fields(&format!(
            "metadata.name={}",
            crate::identity::store::TRUST_BUNDLE
        ));
        tasks.push(
            follow(
                Api::<PartialObjectMeta<ConfigMap>>::namespaced(client.clone(), bundle_ns),
                bundle,
                changed.clone(),
            )
            .1,
        );
    }
    for task in tasks {
        tokio::spawn(task);
    }
    let mut writer = Writer {
        client: client.clone(),
        settings,
        applied: HashMap::new(),
        edge_in_force: BTreeMap::new(),
    };
    stores.wait_until_ready().await;
    let mut forgotten = std::time::Instant::now();
    loop {
        // A quiet period: a burst of events (a test applying ten objects)
        // is one recompute.
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Every ten minutes everything is applied again, whatever was last
        // applied: puts back what someone changed or deleted by hand where
        // no watch would tell (a cluster-wide binding, a Role).
        if forgotten.elapsed() > Duration::from_secs(600) {
            writer.applied.clear();
            forgotten = std::time::Instant::now();
        }
        let started = std::time::Instant::now();
        if let Err(error) = writer.sync(&stores).await {
            tracing::warn!(%error, "gateway sync failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            changed.notify_one();
        }
        tracing::debug!(took = ?started.elapsed(), "gateway sync");
    }
}

/// Applies outcomes, remembering what it wrote so an unchanged outcome
/// writes nothing.
struct Writer {
    client: Client,
    settings: GatewaySettings,
    /// Hash of what was last applied, by object (kind/namespace/name).
    applied: HashMap<String, String>,
    /// The JWT check of each EdgePolicy last in force, kept while its key
    /// set cannot be read or used.
    edge_in_force: BTreeMap<Key, trellis_policy::gateway::JwtRule>,
}

fn hash<T: Serialize>(v: &T) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(v).unwrap_or_default()))
}

fn world(
    stores: &Stores,
    controller: &str,
    address_from: AddressFrom,
    secrets: BTreeMap<Key, TlsPair>,
    edge: policy_model::EdgeInputs,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
) -> World {
    let services = stores
        .services
        .state()
        .iter()
        .map(|s| {
            let ports = s
                .spec
                .iter()
                .flat_map(|spec| spec.ports.iter().flatten())
                .map(|p| (p.port, p.app_protocol.clone()))
                .collect();
            (
                (s.namespace().unwrap_or_default(), s.name_any()),
                ServiceInfo { ports },
            )
        })
        .collect::<BTreeMap<_, _>>();
    // Ready gateway pods' addresses, by Gateway (the slices carry the
    // Service's labels, the Gateway's name among them).
    let mut pods: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    for slice in stores.slices.state() {
        let Some(gw) = slice.labels().get(deploy::GATEWAY_LABEL) else {
            continue;
        };
        let key = (slice.namespace().unwrap_or_default(), gw.clone());
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().cloned());
        pods.entry(key).or_default().extend(ready);
    }
    let deployed = stores
        .gateways
        .state()
        .iter()
        .map(|g| {
            let key = (g.namespace().unwrap_or_default(), g.name_any());
            let ready_pods = pods.get(&key).cloned().unwrap_or_default();
            let address = match address_from {
                AddressFrom::Pod => ready_pods.iter().min().cloned(),
                AddressFrom::Service => stores
                    .services
                    .get(&reflector::ObjectRef::new(&deploy::child_name(&key.1)).within(&key.0))
                    .and_then(|s| {
                        let ingress = s
                            .status
                            .as_ref()?
                            .load_balancer
                            .as_ref()?
                            .ingress
                            .as_ref()?
                            .first()?
                            .clone();
                        ingress.ip.or(ingress.hostname)
                    })
                    .or_else(|| {
                        stores
                            .services
                            .get(
                                &reflector::ObjectRef::new(&deploy::child_name(&key.1))
                                    .within(&key.0),
                            )
                            .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
                            .filter(|ip| ip != "None")
                    }),
            };
            (
                key,
                Deployed {
                    address,
                    ready: !ready_pods.is_empty(),
                },
            )
        })
        .collect();
    World {
        controller: controller.to_owned(),
        classes: stores.classes.state(),
        gateways: stores.gateways.state(),
        http_routes: stores.http_routes.state(),
        grpc_routes: stores.grpc_routes.state(),
        grants: stores.grants.state(),
        services,
        namespaces,
        secrets,
        deployed,
        edge,
    }
}

/// The TLS Secrets the listeners of `gateways` name that exist and hold a
/// usable certificate and key.
async fn certificates(client: &Client, gateways: &[Arc<Gateway>]) -> BTreeMap<Key, TlsPair> {
    let mut out = BTreeMap::new();
    for gw in gateways {
        let gw_ns = gw.namespace().unwrap_or_default();
        for r in gw
            .spec
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .flat_map(|t| &t.certificate_refs)
        {
            let key = (
                r.namespace.clone().unwrap_or_else(|| gw_ns.clone()),
                r.name.clone(),
            );
            if out.contains_key(&key) {
                continue;
            }
            let api: Api<Secret> = Api::namespaced(client.clone(), &key.0);
            let Ok(Some(s)) = api.get_opt(&key.1).await else {
                continue;
            };
            let pair = s.data.as_ref().and_then(|data| {
                let chain = String::from_utf8(data.get("tls.crt")?.0.clone()).ok()?;
                let key = String::from_utf8(data.get("tls.key")?.0.clone()).ok()?;
                valid_pair(&chain, &key).then_some(TlsPair {
                    chain_pem: chain,
                    key_pem: key,
                })
            });
            if let Some(pair) = pair {
                out.insert(key, pair);
            }
        }
    }
    out
}

/// Whether a certificate chain and key are PEM a TLS server can use.
fn valid_pair(chain: &str, key: &str) -> bool {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Result<Vec<CertificateDer>, _> =
        CertificateDer::pem_slice_iter(chain.as_bytes()).collect();
    let Ok(key) = PrivateKeyDer::from_pem_slice(key.as_bytes()) else {
        return false;
    };
    certs.is_ok_and(|c| !c.is_empty())
        && rustls::crypto::ring::sign::any_supported_type(&key).is_ok()
}

/// Conditions as they should be written: where a condition's status is
/// unchanged, its transition time stays; a changed one is stamped now.
fn with_times(new: &mut [Condition], old: &[Condition]) {
    let now = k8s_openapi::jiff::Timestamp::now();
    for c in new {
        c.last_transition_time = match old
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            Some(o) => o.last_transition_time.clone(),
            None => k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
        };
    }
}

/// Conditions equal but for their times.
fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

impl Writer {
    async fn mesh(&self) -> Option<MeshIdentity> {
        let (address, domain, namespace) = self.settings.identity.clone()?;
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &namespace);
        let bundle = cms
            .get_opt(crate::identity::store::TRUST_BUNDLE)
            .await
            .ok()
            .flatten()?
            .data?
            .get(crate::identity::store::TRUST_BUNDLE_KEY)?
            .clone();
        Some(MeshIdentity {
            trust_domain: domain,
            trust_bundle: bundle,
            issuer_address: address,
        })
    }

    /// Every namespace's labels (for routes' namespace selectors): from the
    /// cache, or, installed for one namespace, that one's, read now.
    async fn namespaces(&self, stores: &Stores) -> BTreeMap<String, BTreeMap<String, String>> {
        if let Some(store) = &stores.namespaces {
            return store
                .state()
                .iter()
                .map(|n| (n.name_any(), n.labels().clone()))
                .collect();
        }
        let Some(name) = &self.settings.namespace else {
            return BTreeMap::new();
        };
        match Api::<Namespace>::all(self.client.clone()).get(name).await {
            Ok(n) => BTreeMap::from([(name.clone(), n.labels().clone())]),
            Err(error) => {
                tracing::warn!(%error, namespace = %name, "cannot read the watched namespace's labels; routes selecting namespaces by label do not attach");
                BTreeMap::new()
            }
        }
    }

    /// Server-side applies `obj` unless what was last applied is the same.
    async fn apply<K>(&mut self, api: Api<K>, obj: &K) -> Result<(), kube::Error>
    where
        K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let id = format!(
            "{}/{}/{}",
            K::kind(&K::DynamicType::default()),
            obj.meta().namespace.clone().unwrap_or_default(),
            obj.meta().name.clone().unwrap_or_default()
        );
        let h = hash(obj);
        if self.applied.get(&id) == Some(&h) {
            return Ok(());
        }
        let name = obj.meta().name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(obj).unwrap_or_default();
        body["apiVersion"] = K::api_version(&K::DynamicType::default()).into();
        body["kind"] = K::kind(&K::DynamicType::default()).into();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
        self.applied.insert(id, h);
        Ok(())
    }

    async fn sync(&mut self, stores: &Stores) -> Result<(), kube::Error> {
        // Only the Secrets of Gateways this controller serves are read.
        let classes: Vec<String> = stores
            .classes
            .state()
            .iter()
            .filter(|c| c.spec.controller_name == self.settings.controller_name)
            .map(|c| c.name_any())
            .collect();
        let ours: Vec<Arc<Gateway>> = stores
            .gateways
            .state()
            .into_iter()
            .filter(|g| classes.contains(&g.spec.gateway_class_name))
            .collect();
        let secrets = certificates(&self.client, &ours).await;
        let edge =
            policy_sync::inputs(&self.client, &stores.edge_policies, &self.edge_in_force).await?;
        let namespaces = self.namespaces(stores).await;
        let world = world(
            stores,
            &self.settings.controller_name,
            self.settings.address_from,
            secrets,
            edge,
            namespaces,
        );
        let outcome = world.outcome();
        self.edge_in_force = outcome.edge.good.clone();
        let mesh = self.mesh().await;

        for (name, mut status) in outcome.classes {
            let Some(current) = stores.classes.get(&reflector::ObjectRef::new(&name)) else {
                continue;
            };
            let old = current.status.clone().unwrap_or_default();
            if same_conditions(&status.conditions, &old.conditions) {
                continue;
            }
            with_times(&mut status.conditions, &old.conditions);
            let api: Api<GatewayClass> = Api::all(self.client.clone());
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": status})),
            )
            .await?;
        }

        let mut live_bindings = Vec::new();
        for gw_out in &outcome.gateways {
            let (ns, name) = &gw_out.key;
            let Some(gw) = stores
                .gateways
                .get(&reflector::ObjectRef::new(name).within(ns))
            else {
                continue;
            };
            let children = deploy::render(
                &gw,
                &gw_out.ports,
                &gw_out.backends,
                mesh.clone(),
                &self.settings.deploy,
            );
            live_bindings.push(deploy::binding_name(ns, name));
            // What was applied and is gone (deleted by hand) is applied again.
            let child = deploy::child_name(name);
            let deployment = reflector::ObjectRef::new(&child).within(ns);
            if stores.deployments.get(&deployment).is_none() {
                self.applied.remove(&format!("Deployment/{ns}/{child}"));
            }
            let service = reflector::ObjectRef::new(&child).within(ns);
            if stores.services.get(&service).is_none() {
                self.applied.remove(&format!("Service/{ns}/{child}"));
            }
            let c = self.client.clone();
            self.apply(Api::namespaced(c.clone(), ns), &children.service_account)
                .await?;
            self.apply(Api::namespaced(c.clone(), ns), &children.role)
                .await?;
            self.apply(Api::namespaced(c.clone(), ns), &children.role_binding)
                .await?;
            match &children.discovery {
                deploy::DiscoveryBinding::Cluster(b) => self.apply(Api::all(c.clone()), b).await?,
                deploy::DiscoveryBinding::Namespace(b) => {
                    self.apply(Api::namespaced(c.clone(), ns), b).await?;
                }
            }
            self.apply(Api::namespaced(c.clone(), ns), &children.config)
                .await?;
            if let Some(svc) = &children.service {
                self.apply(Api::namespaced(c.clone(), ns), svc).await?;
            }
            self.apply(Api::namespaced(c.clone(), ns), &children.deployment)
                .await?;

            let old = gw.status.clone().unwrap_or_default();
            let mut status = gw_out.status.clone();
            let unchanged = status.addresses == old.addresses
                && same_conditions(&status.conditions, &old.conditions)
                && status.listeners.len() == old.listeners.len()
                && status.listeners.iter().zip(&old.listeners).all(|(a, b)| {
                    a.name == b.name
                        && a.attached_routes == b.attached_routes
                        && a.supported_kinds == b.supported_kinds
                        && same_conditions(&a.conditions, &b.conditions)
                });
            if unchanged {
                continue;
            }
            with_times(&mut status.conditions, &old.conditions);
            for l in &mut status.listeners {
                let old_l = old
                    .listeners
                    .iter()
                    .find(|o| o.name == l.name)
                    .map(|o| o.conditions.clone())
                    .unwrap_or_default();
                with_times(&mut l.conditions, &old_l);
            }
            let api: Api<Gateway> = Api::namespaced(self.client.clone(), ns);
            api.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": status})),
            )
            .await?;
        }

        // Routes: this controller's entries, beside other controllers'.
        let ours: BTreeMap<(&str, Key), &Vec<RouteParentStatus>> = outcome
            .routes
            .iter()
            .map(|r| ((r.kind, r.key.clone()), &r.parents))
            .collect();
        let controller = self.settings.controller_name.clone();
        for r in stores.http_routes.state() {
            let key = (r.namespace().unwrap_or_default(), r.name_any());
            let want = ours
                .get(&("HTTPRoute", key.clone()))
                .map(|p| p.as_slice())
                .unwrap_or_default();
            self.route_status::<HTTPRoute>(
                &key,
                r.status.clone().unwrap_or_default(),
                want,
                &controller,
            )
            .await?;
        }
        for r in stores.grpc_routes.state() {
            let key = (r.namespace().unwrap_or_default(), r.name_any());
            let want = ours
                .get(&("GRPCRoute", key.clone()))
                .map(|p| p.as_slice())
                .unwrap_or_default();
            self.route_status::<GRPCRoute>(
                &key,
                r.status.clone().unwrap_or_default(),
                want,
                &controller,
            )
            .await?;
        }

        policy_sync::write_status(
            &self.client,
            &stores.edge_policies,
            &outcome.edge,
            &self.settings.controller_name,
        )
        .await?;

        // Cluster-wide bindings have no owner to be collected with;
        // namespaced ones are their Gateway's.
        if self.settings.deploy.namespaced {
            return Ok(());
        }
        let bindings: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        let ours = format!(
            "{MANAGED_BY_LABEL}={MANAGER},{}={}",
            deploy::CONTROLLER_LABEL,
            deploy::controller_label(&self.settings.controller_name)
        );
        let stale = bindings.list(&ListParams::default().labels(&ours)).await?;
        for b in stale.items {
            let name = b.name_any();
            if !live_bindings.contains(&name) {
                tracing::info!(binding = %name, "removing the discovery binding of a Gateway that is gone");
                let _ = bindings.delete(&name, &DeleteParams::default()).await;
                self.applied
                    .retain(|k, _| !k.ends_with(&format!("//{name}")));
            }
        }
        Ok(())
    }

    async fn route_status<K>(
        &self,
        key: &Key,
        old: RouteStatus,
        want: &[RouteParentStatus],
        controller: &str,
    ) -> Result<(), kube::Error>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let old_ours: Vec<&RouteParentStatus> = old
            .parents
            .iter()
            .filter(|p| p.controller_name == controller)
            .collect();
        let unchanged = old_ours.len() == want.len()
            && want.iter().all(|w| {
                old_ours.iter().any(|o| {
                    o.parent_ref == w.parent_ref && same_conditions(&o.conditions, &w.conditions)
                })
            });
        if unchanged {
            return Ok(());
        }
        let mut parents: Vec<RouteParentStatus> = old
            .parents
            .iter()
            .filter(|p| p.controller_name != controller)
            .cloned()
            .collect();
        for w in want {
            let mut w = w.clone();
            let before = old_ours
                .iter()
                .find(|o| o.parent_ref == w.parent_ref)
                .map(|o| o.conditions.clone())
                .unwrap_or_default();
            with_times(&mut w.conditions, &before);
            parents.push(w);
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &key.0);
        api.patch_status(
            &key.1,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"parents": parents}})),
        )
        .await?;
        Ok(())
    }
}
