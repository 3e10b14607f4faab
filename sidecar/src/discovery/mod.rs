//! Service discovery: which endpoints serve a service, kept up to date.
//!
//! A [`Resolver`] hands out one `watch` channel per service; the balancer of
//! that service follows the channel, so a change in the endpoint set reaches
//! traffic without any request noticing. Two sources fill the channels:
//! [`kube`] (EndpointSlices through the Kubernetes API) and [`static`]
//! (flags or a file, for running without Kubernetes).
//!
//! When a source cannot be reached, what it said last stays in force — a
//! Kubernetes API outage must not take the data plane down with it — and
//! the service is marked [`Stale`], which `/readyz` and `/healthz` report.

pub mod kube;
pub mod r#static;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tokio::sync::watch;

use crate::{metrics::Metrics, outbound::target::ServiceName};

/// The addresses serving a service, ordered so that equal sets compare equal.
pub type EndpointSet = BTreeSet<SocketAddr>;

/// What discovery knows of one service right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovered {
    /// The first answer has not arrived yet.
    Pending,
    /// No such service.
    NotFound,
    /// The service exists; these endpoints are ready (possibly none).
    Ready(Arc<EndpointSet>),
}

impl Discovered {
    /// The ready endpoints as a list.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Self::Ready(set) => set.iter().copied().collect(),
            _ => Vec::new(),
        }
    }
}

/// Why what discovery knows of a service may be out of date: its source
/// failed, and has not answered since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stale {
    /// When the source first failed (kept across further failures).
    pub since: SystemTime,
    /// The latest failure.
    pub error: String,
}

/// A watch on one service's endpoints.
pub type EndpointsWatch = watch::Receiver<Discovered>;

/// A watch on the ServiceAccount a service's pods run as, when they are
/// meshed workloads (`None`: not meshed, or not known yet). The caller's
/// sidecar expects the server to prove this identity over mutual TLS.
/// Sources publish it before the endpoints of the same change, so whoever
/// sees an endpoint also sees the identity it must prove (read as `None`,
/// a meshed service's request would leave in plaintext).
pub type IdentityWatch = watch::Receiver<Option<Arc<str>>>;

type IdentitySender = watch::Sender<Option<Arc<str>>>;

/// The label on a MicroService's Service naming the ServiceAccount its pods
/// run as. The EndpointSlice controller copies a Service's labels onto its
/// slices, which is where discovery reads it.
pub const SERVICE_ACCOUNT_LABEL: &str = "trellis.dev/service-account";

/// A source of endpoints: what both discovery modes implement.
pub trait Resolve: Send + Sync + 'static {
    /// Starts following a service (if not already) and returns its watch.
    fn resolve(&self, service: &ServiceName) -> EndpointsWatch;

    /// Whether every service followed so far has had its first answer.
    fn is_synced(&self) -> bool;

    /// Every followed service and what is known of it, for the status page.
    fn snapshot(&self) -> BTreeMap<ServiceName, Discovered>;

    /// The mesh identity of `service`'s pods, kept up to date.
    fn identity(&self, service: &ServiceName) -> IdentityWatch;

    /// The services whose source is failing: what is known of them is the
    /// last answer, which may be out of date. Sources that cannot fail
    /// (static endpoints) are never stale.
    fn stale(&self) -> BTreeMap<ServiceName, Stale> {
        BTreeMap::new()
    }
}

/// A shared handle on the resolver in use.
#[derive(Clone)]
pub struct Resolver(Arc<dyn Resolve>);

impl Resolver {
    /// Wraps a resolver.
    pub fn new(r: impl Resolve) -> Self {
        Self(Arc::new(r))
    }
}

impl std::ops::Deref for Resolver {
    type Target = dyn Resolve;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Resolver").field(&self.0.snapshot()).finish()
    }
}

/// The channels of every followed service, shared by both resolvers: it
/// publishes changes, keeps the endpoints gauge in step and answers the
/// synced and snapshot questions.
#[derive(Clone)]
pub(crate) struct Directory {
    services: Arc<Mutex<HashMap<ServiceName, watch::Sender<Discovered>>>>,
    identities: Arc<Mutex<HashMap<ServiceName, IdentitySender>>>,
    stale: Arc<Mutex<BTreeMap<ServiceName, Stale>>>,
    metrics: Metrics,
}

impl Directory {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self {
            services: Arc::default(),
            identities: Arc::default(),
            stale: Arc::default(),
            metrics,
        }
    }

    /// The watch for `service`; `start` runs once, when the service is new,
    /// with the sender that will publish its endpoints.
    pub(crate) fn watch(
        &self,
        service: &ServiceName,
        initial: Discovered,
        start: impl FnOnce(watch::Sender<Discovered>),
    ) -> EndpointsWatch {
        let mut map = self.services.lock().expect("directory lock");
        if let Some(tx) = map.get(service) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(initial);
        map.insert(service.clone(), tx.clone());
        drop(map);
        start(tx);
        rx
    }

    /// Publishes a new state for `service`, creating its channel if needed.
    pub(crate) fn publish(&self, service: &ServiceName, state: Discovered) {
        let n = state.addrs().len();
        let mut map = self.services.lock().expect("directory lock");
        match map.get(service) {
            Some(tx) => {
                tx.send_if_modified(|cur| {
                    if *cur == state {
                        false
                    } else {
                        *cur = state;
                        true
                    }
                });
            }
            None => {
                map.insert(service.clone(), watch::channel(state).0);
            }
        }
        self.metrics.set_endpoints(&service.to_string(), n);
    }

    /// The identity watch of `service`.
    pub(crate) fn identity(&self, service: &ServiceName) -> IdentityWatch {
        let mut map = self.identities.lock().expect("identities lock");
        map.entry(service.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Publishes the ServiceAccount `service`'s pods run as.
    pub(crate) fn publish_identity(&self, service: &ServiceName, account: Option<&str>) {
        let mut map = self.identities.lock().expect("identities lock");
        let tx = map
            .entry(service.clone())
            .or_insert_with(|| watch::channel(None).0);
        tx.send_if_modified(|cur| {
            if cur.as_deref() == account {
                false
            } else {
                *cur = account.map(Into::into);
                true
            }
        });
    }

    pub(crate) fn is_synced(&self) -> bool {
        let map = self.services.lock().expect("directory lock");
        map.values().all(|tx| *tx.borrow() != Discovered::Pending)
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<ServiceName, Discovered> {
        let map = self.services.lock().expect("directory lock");
        map.iter()
            .map(|(k, tx)| (k.clone(), tx.borrow().clone()))
            .collect()
    }

    /// Marks `service` stale: its source failed with `error`.
    pub(crate) fn mark_stale(&self, service: &ServiceName, error: String) {
        let mut stale = self.stale.lock().expect("stale lock");
        stale
            .entry(service.clone())
            .and_modify(|s| s.error.clone_from(&error))
            .or_insert_with(|| Stale {
                since: SystemTime::now(),
                error,
            });
    }

    /// Marks `service` fresh: its source answered. Returns whether it was stale.
    pub(crate) fn mark_fresh(&self, service: &ServiceName) -> bool {
        self.stale
            .lock()
            .expect("stale lock")
            .remove(service)
            .is_some()
    }

    pub(crate) fn stale(&self) -> BTreeMap<ServiceName, Stale> {
        self.stale.lock().expect("stale lock").clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.services.lock().expect("directory lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_keeps_its_start_and_the_latest_error() {
        let dir = Directory::new(Metrics::default());
        let user = ServiceName::new("user", "shop");
        dir.publish(&user, Discovered::Ready(Arc::default()));
        dir.mark_stale(&user, "connection refused".into());
        let first = dir.stale()[&user].since;
        dir.mark_stale(&user, "timed out".into());
        assert_eq!(dir.stale()[&user].since, first);
        assert_eq!(dir.stale()[&user].error, "timed out");
        // What was known stays in force while stale.
        assert_eq!(
            *dir.snapshot().get(&user).unwrap(),
            Discovered::Ready(Arc::default())
        );
        assert!(dir.mark_fresh(&user));
        assert!(dir.stale().is_empty());
        assert!(!dir.mark_fresh(&user));
    }
}
