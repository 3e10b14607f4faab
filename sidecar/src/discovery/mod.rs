//! Service discovery: which endpoints serve a service, kept up to date.
//!
//! A [`Resolver`] hands out one `watch` channel per service; the balancer of
//! that service follows the channel, so a change in the endpoint set reaches
//! traffic without any request noticing. Two sources fill the channels:
//! [`kube`] (EndpointSlices through the Kubernetes API) and [`static`]
//! (flags or a file, for running without Kubernetes).

pub mod kube;
pub mod r#static;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
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

/// A watch on one service's endpoints.
pub type EndpointsWatch = watch::Receiver<Discovered>;

/// A source of endpoints: what both discovery modes implement.
pub trait Resolve: Send + Sync + 'static {
    /// Starts following a service (if not already) and returns its watch.
    fn resolve(&self, service: &ServiceName) -> EndpointsWatch;

    /// Whether every service followed so far has had its first answer.
    fn is_synced(&self) -> bool;

    /// Every followed service and what is known of it, for the status page.
    fn snapshot(&self) -> BTreeMap<ServiceName, Discovered>;
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
    metrics: Metrics,
}

impl Directory {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self {
            services: Arc::default(),
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

    pub(crate) fn len(&self) -> usize {
        self.services.lock().expect("directory lock").len()
    }
}
