//! Kubernetes discovery: a reflector over a Service's EndpointSlices.
//!
//! Each service followed gets its own kube-runtime watcher, selected by the
//! label the EndpointSlice controller puts on every slice it manages,
//! `kubernetes.io/service-name=<name>`, so the sidecar lists and watches only
//! what it routes to (and its RBAC need not allow more). The reflector's store
//! holds every slice of the service; after each event the ready endpoints of
//! all slices are recomputed and published.
//!
//! On a watch error (the API unreachable, the connection cut, access
//! refused) the service is marked stale and the watch is started afresh —
//! a new list, then a new watch — after a backoff with jitter, until the
//! list succeeds and the service is fresh again. A fresh list is the only
//! proof the API is back: kube-runtime's watcher resumes a broken watch
//! silently, so it would never say so. Meanwhile the last known endpoints
//! stay in force.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use kube::{
    Api, Client,
    runtime::{reflector, watcher},
};

use super::{
    Directory, Discovered, EndpointsWatch, IdentityWatch, Resolve, SERVICE_ACCOUNT_LABEL, Stale,
};
use crate::{metrics::Metrics, outbound::target::ServiceName};

/// The label the EndpointSlice controller sets to the owning Service's name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The first wait before following a service again after its watch failed.
const RETRY_MIN: Duration = Duration::from_millis(250);

/// The longest wait between attempts while the API stays unreachable.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Port names preferred when a slice lists several ports.
const PREFERRED_PORT_NAMES: [&str; 3] = ["http", "grpc", "http2"];

/// Follows services' EndpointSlices through the Kubernetes API.
#[derive(Clone)]
pub struct KubeResolver {
    dir: Directory,
    client: Client,
    max_services: usize,
}

impl KubeResolver {
    /// A resolver that starts a reflector per service on first use, and
    /// follows at most `max_services`, so an application cannot make its
    /// sidecar open an unbounded number of watches by asking for many names.
    pub fn new(client: Client, metrics: Metrics, max_services: usize) -> Self {
        Self {
            dir: Directory::new(metrics),
            client,
            max_services,
        }
    }
}

impl Resolve for KubeResolver {
    fn resolve(&self, service: &ServiceName) -> EndpointsWatch {
        let full = self.dir.len() >= self.max_services;
        let initial = if full {
            Discovered::NotFound
        } else {
            Discovered::Pending
        };
        let (dir, client) = (self.dir.clone(), self.client.clone());
        let svc = service.clone();
        self.dir.watch(service, initial, move |_| {
            if full {
                tracing::warn!(service = %svc, "not following more services: limit reached");
                return;
            }
            tokio::spawn(follow(client, dir, svc));
        })
    }

    fn is_synced(&self) -> bool {
        self.dir.is_synced()
    }

    fn snapshot(&self) -> BTreeMap<ServiceName, Discovered> {
        self.dir.snapshot()
    }

    fn stale(&self) -> BTreeMap<ServiceName, Stale> {
        self.dir.stale()
    }

    fn identity(&self, service: &ServiceName) -> IdentityWatch {
        self.dir.identity(service)
    }
}

/// Follows one service's EndpointSlices for as long as the process runs,
/// starting over after each failure (see the module docs).
async fn follow(client: Client, dir: Directory, service: ServiceName) {
    let mut wait = RETRY_MIN;
    loop {
        let (listed, error) = follow_once(&client, &dir, &service).await;
        if listed {
            wait = RETRY_MIN;
        }
        tracing::warn!(%service, %error, retry_in = ?wait, "EndpointSlice watch failed; keeping the last known endpoints");
        dir.mark_stale(&service, error);
        // Full jitter over the upper half, so many sidecars that lost the
        // API at once do not come back at once.
        let jittered = wait.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::time::sleep(jittered).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Lists and watches until the first error; returns whether the list
/// completed, and the error.
async fn follow_once(client: &Client, dir: &Directory, service: &ServiceName) -> (bool, String) {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &service.namespace);
    let config =
        watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", service.name));
    let (store, writer) = reflector::store();
    let mut stream = std::pin::pin!(reflector(writer, watcher(api, config)));
    tracing::info!(%service, "following EndpointSlices");
    let mut listed = false;
    while let Some(event) = stream.next().await {
        match event {
            // The store is complete after InitDone and changes on each Apply
            // and Delete; Init and InitApply are mid-list and would publish a
            // partial set.
            Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                let slices = store.state();
                let state = discovered_from_slices(&slices);
                tracing::debug!(%service, endpoints = state.addrs().len(), "endpoints changed");
                // The identity first: a request waiting for endpoints is
                // sent the moment they are published, possibly on another
                // thread, and reads the identity then. Published after, a
                // meshed service's first requests would leave in plaintext.
                dir.publish_identity(service, service_account(&slices));
                dir.publish(service, state);
                if !listed && dir.mark_fresh(service) {
                    tracing::info!(%service, "EndpointSlices listed again; discovery is fresh");
                }
                listed = true;
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(error) => return (listed, crate::http::response::with_causes(&error)),
        }
    }
    (listed, "the watch ended".into())
}

/// The endpoints a set of slices describes: every ready address of every
/// slice, on the slice's serving port. No slice at all means no such service
/// (the EndpointSlice controller makes one, possibly empty, for every Service
/// with a selector).
pub fn discovered_from_slices(slices: &[Arc<EndpointSlice>]) -> Discovered {
    if slices.is_empty() {
        return Discovered::NotFound;
    }
    let mut set = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue; // FQDN slices name hosts, not addresses.
        }
        let Some(port) = slice.ports.as_deref().and_then(serving_port) else {
            continue;
        };
        for ep in &slice.endpoints {
            // An unset `ready` means ready, as the API documents.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            set.extend(
                ep.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, port)),
            );
        }
    }
    Discovered::Ready(Arc::new(set))
}

/// The ServiceAccount the service's pods run as, from the label the
/// operator puts on a MicroService's Service (copied onto its slices).
fn service_account(slices: &[Arc<EndpointSlice>]) -> Option<&str> {
    slices.iter().find_map(|s| {
        s.metadata
            .labels
            .as_ref()?
            .get(SERVICE_ACCOUNT_LABEL)
            .map(String::as_str)
    })
}

/// The port to send traffic to: a TCP port named like an HTTP port, else the
/// first TCP port.
fn serving_port(ports: &[EndpointPort]) -> Option<u16> {
    let tcp = || {
        ports.iter().filter(|p| {
            p.protocol.as_deref().is_none_or(|proto| proto == "TCP") && p.port.is_some()
        })
    };
    let chosen = tcp()
        .find(|p| {
            p.name
                .as_deref()
                .is_some_and(|n| PREFERRED_PORT_NAMES.contains(&n))
        })
        .or_else(|| tcp().next())?;
    chosen.port.and_then(|p| u16::try_from(p).ok())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    use super::*;

    fn endpoint(addr: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![addr.to_owned()],
            conditions: Some(EndpointConditions {
                ready,
                serving: ready,
                terminating: ready.map(|r| !r),
            }),
            ..Endpoint::default()
        }
    }

    fn slice(
        kind: &str,
        ports: Vec<(Option<&str>, i32)>,
        eps: Vec<Endpoint>,
    ) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            address_type: kind.to_owned(),
            endpoints: eps,
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, port)| EndpointPort {
                        name: name.map(str::to_owned),
                        port: Some(port),
                        protocol: Some("TCP".into()),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            ..EndpointSlice::default()
        })
    }

    fn addrs(d: &Discovered) -> Vec<String> {
        d.addrs().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn keeps_only_ready_endpoints_across_slices() {
        let slices = [
            slice(
                "IPv4",
                vec![(Some("http"), 15006)],
                vec![
                    endpoint("10.0.0.1", Some(true)),
                    endpoint("10.0.0.2", Some(false)),
                    endpoint("10.0.0.3", None),
                ],
            ),
            slice(
                "IPv6",
                vec![(Some("http"), 15006)],
                vec![endpoint("fd00::1", Some(true))],
            ),
            slice(
                "FQDN",
                vec![(Some("http"), 80)],
                vec![endpoint("example", Some(true))],
            ),
        ];
        assert_eq!(
            addrs(&discovered_from_slices(&slices)),
            ["10.0.0.1:15006", "10.0.0.3:15006", "[fd00::1]:15006"]
        );
    }

    #[test]
    fn no_slices_is_unknown_and_no_ready_endpoints_is_empty() {
        assert_eq!(discovered_from_slices(&[]), Discovered::NotFound);
        let slices = [slice(
            "IPv4",
            vec![(None, 80)],
            vec![endpoint("10.0.0.1", Some(false))],
        )];
        assert_eq!(
            discovered_from_slices(&slices),
            Discovered::Ready(Arc::default())
        );
    }

    #[test]
    fn prefers_an_http_port_over_the_first() {
        let slices = [slice(
            "IPv4",
            vec![(Some("metrics"), 9090), (Some("http"), 15006)],
            vec![endpoint("10.0.0.1", Some(true))],
        )];
        assert_eq!(addrs(&discovered_from_slices(&slices)), ["10.0.0.1:15006"]);
        let slices = [slice(
            "IPv4",
            vec![(Some("a"), 1000), (Some("b"), 2000)],
            vec![endpoint("10.0.0.1", Some(true))],
        )];
        assert_eq!(addrs(&discovered_from_slices(&slices)), ["10.0.0.1:1000"]);
    }
}
