//! Health: liveness, readiness and the detailed `/healthz` report.
//!
//! Kubernetes probes the sidecar, not the application; the sidecar
//! aggregates. `/readyz` is ready when the listeners are bound, discovery
//! has answered for every service followed, and the application's own
//! health check — a GET of the policy's `health.path`, polled every
//! `health.interval` — passes. `/healthz` reports each check in the
//! design's `HealthStatus` shape, plus the policy: a refused policy makes `/healthz`
//! unhealthy (so it is seen) but not `/readyz` (the last good policy still
//! serves traffic correctly). Stale discovery — the Kubernetes API
//! unreachable after it once answered — is the same: `/healthz` is
//! unhealthy and `/readyz` stays ready but says so, because the last known
//! endpoints still serve, and failing readiness in every pod at once when
//! the control plane has trouble would turn its outage into the data
//! plane's.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use http::{Request, StatusCode};
use serde::Serialize;
use tokio::sync::watch;
use trellis_policy::Protocol;

use crate::{
    client::{UpstreamClient, UpstreamProtocol},
    discovery::{Discovered, Resolver},
    http::empty,
    mtls::MeshTls,
    outbound::router::declared,
    policy_watch::PolicyState,
};

/// The result of one check.
#[derive(Clone, Debug, Serialize)]
pub struct CheckStatus {
    /// `healthy` or `unhealthy`.
    pub status: &'static str,
    /// How long the check took, as text (`1.2ms`).
    pub duration: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CheckStatus {
    fn new(ok: bool, duration: Duration, error: Option<String>) -> Self {
        Self {
            status: if ok { "healthy" } else { "unhealthy" },
            duration: format!("{duration:?}"),
            error: if ok { None } else { error },
        }
    }

    fn healthy(&self) -> bool {
        self.status == "healthy"
    }
}

/// The `/healthz` body, in the design's `HealthStatus` shape.
#[derive(Clone, Debug, Serialize)]
pub struct HealthReport {
    /// `healthy` when every check is.
    pub status: &'static str,
    /// Each check by name.
    pub checks: BTreeMap<&'static str, CheckStatus>,
    /// How long the report took.
    pub duration: String,
    /// When it was made (RFC 3339).
    pub timestamp: String,
}

/// The last result of the application's health check.
#[derive(Clone, Debug)]
struct AppCheck {
    ok: bool,
    duration: Duration,
    error: Option<String>,
}

/// Everything health reports on.
#[derive(Clone)]
pub struct Health {
    listeners_bound: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    app: Arc<Mutex<AppCheck>>,
    resolver: Resolver,
    policy: watch::Receiver<PolicyState>,
    mesh: MeshTls,
}

impl Health {
    /// Health over `resolver` and `policy`; not ready until told the
    /// listeners are bound and the app check passes.
    pub fn new(resolver: Resolver, policy: watch::Receiver<PolicyState>, mesh: MeshTls) -> Self {
        Self {
            listeners_bound: Arc::default(),
            draining: Arc::default(),
            app: Arc::new(Mutex::new(AppCheck {
                ok: false,
                duration: Duration::ZERO,
                error: Some("not checked yet".into()),
            })),
            resolver,
            policy,
            mesh,
        }
    }

    /// Marks the listeners bound.
    pub fn set_listening(&self) {
        self.listeners_bound.store(true, Ordering::Release);
    }

    /// Marks that there is no application to check: a gateway forwards to
    /// its backends only.
    pub fn set_no_app(&self) {
        self.set_app(AppCheck {
            ok: true,
            duration: Duration::ZERO,
            error: None,
        });
    }

    /// Marks the sidecar draining: not ready any more, so traffic moves away.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn checks(&self) -> BTreeMap<&'static str, CheckStatus> {
        let mut checks = BTreeMap::new();
        let bound = self.listeners_bound.load(Ordering::Acquire);
        let draining = self.draining.load(Ordering::Acquire);
        let listeners_error = if draining {
            Some("draining: shutting down".to_owned())
        } else if !bound {
            Some("listeners not bound yet".to_owned())
        } else {
            None
        };
        checks.insert(
            "listeners",
            CheckStatus::new(listeners_error.is_none(), Duration::ZERO, listeners_error),
        );

        let start = Instant::now();
        let synced = self.dependencies_synced();
        let stale = self.stale_discovery();
        let mut problems = Vec::new();
        if !synced {
            problems.push("discovery has not answered for every dependency yet".to_owned());
        }
        problems.extend(stale.clone());
        checks.insert(
            "discovery",
            CheckStatus::new(
                problems.is_empty(),
                start.elapsed(),
                Some(problems.join("; ")),
            ),
        );

        let app = self.app.lock().expect("app check lock").clone();
        checks.insert("app", CheckStatus::new(app.ok, app.duration, app.error));

        // With a mesh identity, no valid certificate means mesh callers
        // cannot be served nor dependencies reached: not ready. A
        // certificate that could not be renewed but is still valid serves.
        let state = self.policy.borrow();
        let meshed = state.policy.as_ref().is_some_and(|p| p.identity.is_some());
        let identity_error = if meshed {
            self.mesh.problem(SystemTime::now())
        } else {
            None
        };
        checks.insert(
            "identity",
            CheckStatus::new(identity_error.is_none(), Duration::ZERO, identity_error),
        );
        let policy_error = match (&state.policy, &state.rejected) {
            (None, None) => Some("no policy loaded yet".to_owned()),
            (None, Some(r)) => Some(format!("no valid policy: {} (from {})", r.error, r.source)),
            (Some(_), Some(r)) => Some(format!(
                "running policy generation {}; a newer one was refused: {} (from {})",
                state.generation, r.error, r.source
            )),
            (Some(_), None) => None,
        };
        checks.insert(
            "policy",
            CheckStatus::new(policy_error.is_none(), Duration::ZERO, policy_error),
        );
        checks
    }

    /// Whether discovery has answered for every declared dependency that
    /// has been looked up. Other names an application calls do not count:
    /// a destination it may not read, or one that never answers, must not
    /// take the pod out of service. Before any policy, every name counts.
    fn dependencies_synced(&self) -> bool {
        let state = self.policy.borrow();
        let Some(policy) = state.policy.as_deref() else {
            return self.resolver.is_synced();
        };
        self.resolver
            .snapshot()
            .iter()
            .all(|(svc, known)| *known != Discovered::Pending || !declared(Some(policy), svc))
    }

    /// One line per service whose discovery is stale: since when, and why.
    fn stale_discovery(&self) -> Vec<String> {
        self.resolver
            .stale()
            .into_iter()
            .map(|(svc, s)| {
                let age = SystemTime::now()
                    .duration_since(s.since)
                    .unwrap_or_default()
                    .as_secs();
                format!(
                    "discovery of {svc} is stale for {age}s: serving the last known endpoints ({})",
                    s.error
                )
            })
            .collect()
    }

    /// What is degraded while the sidecar is still ready: stale discovery.
    /// `/readyz` lists these under "ready".
    pub fn warnings(&self) -> Vec<String> {
        self.stale_discovery()
    }

    /// Whether traffic should be sent here, and if not, why.
    pub fn readiness(&self) -> Result<(), String> {
        let checks = self.checks();
        // Discovery fails readiness only while a service has had no answer
        // at all; stale answers still serve (see the module docs).
        let synced = self.dependencies_synced();
        let failing: Vec<String> = ["listeners", "discovery", "app", "identity"]
            .iter()
            .filter(|name| **name != "discovery" || !synced)
            .filter_map(|name| {
                let c = &checks[name];
                (!c.healthy())
                    .then(|| format!("{name}: {}", c.error.as_deref().unwrap_or("failing")))
            })
            .collect();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing.join("\n"))
        }
    }

    /// The `/healthz` report.
    pub fn report(&self) -> HealthReport {
        let start = Instant::now();
        let checks = self.checks();
        let healthy = checks.values().all(CheckStatus::healthy);
        HealthReport {
            status: if healthy { "healthy" } else { "unhealthy" },
            checks,
            duration: format!("{:?}", start.elapsed()),
            timestamp: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }

    fn set_app(&self, check: AppCheck) {
        let mut app = self.app.lock().expect("app check lock");
        if app.ok != check.ok {
            if check.ok {
                tracing::info!("application health check passing");
            } else {
                tracing::warn!(error = ?check.error, "application health check failing");
            }
        }
        *app = check;
    }
}

/// Polls the application's health path for as long as the sidecar runs,
/// following the policy's path, interval and timeout as they change.
pub async fn poll_app(
    health: Health,
    client: UpstreamClient,
    app_host: IpAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut policy = health.policy.clone();
    loop {
        let current = policy.borrow_and_update().policy.clone();
        let interval = match current {
            None => {
                health.set_app(AppCheck {
                    ok: false,
                    duration: Duration::ZERO,
                    error: Some("no policy: the application's port is unknown".into()),
                });
                Duration::from_secs(1)
            }
            Some(p) => {
                let addr = SocketAddr::new(app_host, p.app_port);
                let protocol = if p.protocol == Protocol::Grpc {
                    UpstreamProtocol::H2c
                } else {
                    UpstreamProtocol::Http1
                };
                let check = check_app(
                    &client,
                    addr,
                    &p.health.path,
                    protocol,
                    p.health.timeout.get(),
                )
                .await;
                health.set_app(check);
                p.health.interval.get().max(Duration::from_millis(100))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            // A new policy may move the port or path: check again at once.
            _ = policy.changed() => {}
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        }
    }
}

async fn check_app(
    client: &UpstreamClient,
    addr: SocketAddr,
    path: &str,
    protocol: UpstreamProtocol,
    timeout: Duration,
) -> AppCheck {
    let start = Instant::now();
    let req = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "trellis-sidecar/health")
        .body(empty())
        .expect("a validated path makes a request");
    let exchange = async {
        let rsp = client.send(req, addr, protocol, None).await?;
        let status = rsp.status();
        // Read the (small) body so the pooled connection can be reused.
        let _ = http_body_util::BodyExt::collect(rsp.into_body()).await;
        Ok::<_, crate::client::ClientError>(status)
    };
    let result = tokio::time::timeout(timeout, exchange).await;
    let duration = start.elapsed();
    let error = match result {
        Err(_) => Some(format!("GET {path} on {addr} took longer than {timeout:?}")),
        Ok(Err(e)) => Some(format!("GET {path}: {e}")),
        Ok(Ok(status)) if status.is_success() => None,
        Ok(Ok(status)) => Some(format!("GET {path} on {addr} answered {status}")),
    };
    AppCheck {
        ok: error.is_none(),
        duration,
        error,
    }
}

/// The status code of a readiness or health answer.
pub fn status_code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{discovery::EndpointsWatch, outbound::target::ServiceName};
    use std::collections::BTreeMap;
    use trellis_policy::{Dependency, SidecarPolicy};

    /// Discovery that never answers: every name stays pending.
    #[derive(Default)]
    struct NeverAnswers(Mutex<BTreeMap<ServiceName, watch::Sender<Discovered>>>);

    impl crate::discovery::Resolve for NeverAnswers {
        fn resolve(&self, service: &ServiceName) -> EndpointsWatch {
            let mut map = self.0.lock().unwrap();
            map.entry(service.clone())
                .or_insert_with(|| watch::channel(Discovered::Pending).0)
                .subscribe()
        }
        fn identity(&self, _: &ServiceName) -> crate::discovery::IdentityWatch {
            watch::channel(None).1
        }

        fn is_synced(&self) -> bool {
            self.0.lock().unwrap().is_empty()
        }
        fn snapshot(&self) -> BTreeMap<ServiceName, Discovered> {
            let map = self.0.lock().unwrap();
            map.iter()
                .map(|(k, v)| (k.clone(), v.borrow().clone()))
                .collect()
        }
    }

    fn ready_health(resolver: Resolver) -> Health {
        let mut policy =
            SidecarPolicy::from_json(r#"{"service":"order","namespace":"shop","appPort":8080}"#)
                .unwrap();
        policy.dependencies.push(Dependency::named("user"));
        let state = PolicyState {
            policy: Some(Arc::new(policy)),
            generation: 1,
            ..PolicyState::default()
        };
        let (_tx, rx) = watch::channel(state);
        std::mem::forget(_tx);
        let health = Health::new(resolver, rx, MeshTls::default());
        health.set_listening();
        health.set_app(AppCheck {
            ok: true,
            duration: Duration::ZERO,
            error: None,
        });
        health
    }

    #[test]
    fn only_a_pending_dependency_makes_the_sidecar_unready() {
        let resolver = Resolver::new(NeverAnswers::default());
        let health = ready_health(resolver.clone());
        assert_eq!(health.readiness(), Ok(()));
        // Names the app called that are not dependencies: no answer from
        // discovery must not take the pod out of service.
        resolver.resolve(&ServiceName::new("example", "com"));
        resolver.resolve(&ServiceName::new("nosuch", "shop"));
        assert_eq!(health.readiness(), Ok(()));
        // A declared dependency with no answer yet does.
        resolver.resolve(&ServiceName::new("user", "shop"));
        let err = health.readiness().unwrap_err();
        assert!(err.contains("discovery"), "{err}");
    }
}
