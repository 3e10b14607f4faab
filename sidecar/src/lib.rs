//! The Trellis sidecar: a proxy beside each service.
//!
//! Three listeners — inbound (the pod's address → the application),
//! outbound (127.0.0.1 → dependencies) and admin (health, metrics, status) —
//! each a tower stack assembled in [`stack`]. Discovery, balancing, policy,
//! health and metrics are each one module. [`start`] runs it all in-process
//! and returns the bound addresses, which is how the binary and the
//! integration tests both run it.

mod admin;
mod balance;
mod client;
mod config;
mod discovery;
mod file_watch;
mod gateway;
mod health;
mod http;
mod inbound;
mod metrics;
mod mtls;
mod outbound;
mod policy_watch;
mod process;
mod reload;
mod resilience;
mod server;
mod shared;
mod shutdown;
mod stack;
mod trace;

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use config::{Args, Config, Discovery, GatewaySource};
pub use mtls::MeshTls;
pub use policy_watch::PolicyState;
pub use resilience::outlier::OutlierSettings;
pub use server::ServerLimits;

/// What the fuzz targets drive: request-head checks and the outbound
/// router's name parsing. Not a stable interface.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::{
        http::{framing::check_head, response::ProxyError},
        outbound::target::{NameRules, ServiceName, ServiceTarget},
    };
}

use crate::{
    admin::{Admin, Identity},
    client::UpstreamClient,
    discovery::{
        Resolver,
        kube::KubeResolver,
        r#static::{StaticEndpoints, StaticResolver, parse_file},
    },
    health::Health,
    metrics::Metrics,
    outbound::target::{NameRules, ServiceName},
    policy_watch::PolicyStore,
    stack::StackParts,
};

/// A running sidecar.
pub struct Running {
    /// Where the inbound listener is bound.
    pub inbound: SocketAddr,
    /// Where the outbound listener is bound.
    pub outbound: SocketAddr,
    /// Where the admin listener is bound.
    pub admin: SocketAddr,
    /// The metrics.
    pub metrics: Metrics,
    /// The policy store (offer a policy directly, or read the state).
    pub policy: PolicyStore,
    /// Health.
    pub health: Health,
    /// The mesh credentials (tests put their own in force with `set`).
    pub mesh: MeshTls,
    static_resolver: Option<StaticResolver>,
    tracing: trace::Tracing,
    shutdown: watch::Sender<bool>,
    admin_shutdown: watch::Sender<bool>,
    proxies: Vec<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
}

impl Running {
    /// The static resolver, when discovery is static: set endpoints live.
    pub fn static_endpoints(&self) -> Option<&StaticResolver> {
        self.static_resolver.as_ref()
    }

    /// Drains: readiness fails, the proxy listeners stop accepting, in-flight
    /// requests finish (within the drain grace), then admin stops.
    pub async fn shutdown(self) {
        self.health.set_draining();
        let _ = self.shutdown.send(true);
        for task in self.proxies {
            let _ = task.await;
        }
        // The drained requests' spans are the last ones: send them.
        self.tracing.flush(std::time::Duration::from_secs(5)).await;
        let _ = self.admin_shutdown.send(true);
        let _ = self.admin_task.await;
        tracing::info!("drained; exiting");
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the {what} listener on {addr}"))?;
    let local = l.local_addr()?;
    Ok((l, local))
}

/// Starts the sidecar: policy sources, discovery, the three listeners and
/// the application health check. Returns once every listener is bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Metrics::default();
    let policy = PolicyStore::new(metrics.clone());
    let (shutdown, shutdown_rx) = watch::channel(false);

    let kube = if config.needs_kubernetes() {
        Some(
            kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API (use --static-endpoints and --policy-file to run without it)")?,
        )
    } else {
        None
    };

    // Policy: the file first, read now so a policy is in force before the
    // listeners serve; then the ConfigMap, which overrides it.
    if let Some(path) = &config.policy_file {
        if let Ok(text) = tokio::fs::read_to_string(path).await {
            let _ = policy.offer(&text, &format!("file:{}", path.display()));
        }
        tokio::spawn(policy_watch::watch_file(
            policy.clone(),
            path.clone(),
            config.file_poll_interval,
            shutdown_rx.clone(),
        ));
    }
    // Gateway mode: the policy comes with the gateway's configuration.
    let gateway_store = config.gateway.as_ref().map(|source| {
        let store = gateway::GatewayStore::new(policy.clone());
        match (source, &kube) {
            (GatewaySource::Secret(name), Some(client)) => {
                tokio::spawn(gateway::watch_secret(
                    store.clone(),
                    client.clone(),
                    config.namespace.clone(),
                    name.clone(),
                    shutdown_rx.clone(),
                ));
            }
            (GatewaySource::File(path), _) => {
                tokio::spawn(gateway::watch_file(
                    store.clone(),
                    path.clone(),
                    config.file_poll_interval,
                    shutdown_rx.clone(),
                ));
            }
            (GatewaySource::Secret(_), None) => unreachable!("a Secret source needs the API"),
        }
        store
    });
    if let (Some(name), Some(client)) = (&config.policy_configmap, &kube) {
        tokio::spawn(policy_watch::watch_configmap(
            policy.clone(),
            client.clone(),
            config.namespace.clone(),
            name.clone(),
            shutdown_rx.clone(),
        ));
    }

    let (resolver, static_resolver) = match &config.discovery {
        Discovery::Kubernetes { max_services } => {
            if !config.static_identities.is_empty() {
                tracing::warn!(
                    "--static-identity is ignored with Kubernetes discovery: the Service's trellis.dev/service-account label says who its pods are"
                );
            }
            let client = kube.clone().context("Kubernetes discovery needs the API")?;
            (
                Resolver::new(KubeResolver::new(client, metrics.clone(), *max_services)),
                None,
            )
        }
        Discovery::Static { endpoints, file } => {
            let r = StaticResolver::new(&config.namespace, metrics.clone());
            // Identities before endpoints: a request for a service is sent
            // as soon as it has endpoints, and reads its identity then.
            for (name, account) in &config.static_identities {
                r.set_identity(name, Some(account));
            }
            r.replace_all(endpoints);
            if let Some(path) = file {
                follow_endpoints_file(&r, endpoints, path, &config, shutdown_rx.clone()).await;
            }
            (Resolver::new(r.clone()), Some(r))
        }
    };
    tokio::spawn(follow_declared_dependencies(
        resolver.clone(),
        policy.subscribe(),
        config.namespace.clone(),
    ));

    let mesh = MeshTls::new(metrics.certificate_expiry());
    tokio::spawn(mtls::certify::run(
        mesh.clone(),
        policy.subscribe(),
        mtls::certify::CertifyConfig {
            token_file: config.identity_token_file.clone(),
            namespace: config.namespace.clone(),
            service_account: config
                .service_account
                .clone()
                .or_else(|| config.service.clone())
                .unwrap_or_else(|| "default".into()),
        },
        metrics.clone(),
        shutdown_rx.clone(),
    ));
    let client = UpstreamClient::new(&config.client, mesh.clone());
    let resilience = resilience::Registry::new(metrics.clone());
    let health = Health::new(resolver.clone(), policy.subscribe(), mesh.clone());
    let tracing = trace::Tracing::start(
        &trace::TraceConfig {
            otlp_endpoint: config.otlp_endpoint.clone(),
            service: config.service.clone().unwrap_or_else(|| "unknown".into()),
            namespace: config.namespace.clone(),
            pod: config.pod_name.clone(),
            version: config.service_version.clone(),
            export: config.trace_export.clone(),
        },
        policy.subscribe(),
        metrics.clone(),
    )?;
    let parts = StackParts {
        tracing: tracing.clone(),
        metrics: metrics.clone(),
        client: client.clone(),
        resolver: resolver.clone(),
        policy: policy.subscribe(),
        rules: NameRules {
            default_namespace: config.namespace.clone(),
            cluster_domain: config.cluster_domain.clone(),
        },
        balance: config.balance.clone(),
        discovery_timeout: config.discovery_timeout,
        app_host: config.app_host,
        resilience: resilience.clone(),
        outlier: config.outlier.clone(),
        mesh: mesh.clone(),
    };

    let (inbound_l, inbound) = bind(config.inbound_addr, "inbound").await?;
    let (outbound_l, outbound) = bind(config.outbound_addr, "outbound").await?;
    let (admin_l, admin) = bind(config.admin_addr, "admin").await?;
    let limits = config.limits.clone();
    let mut proxies = vec![
        tokio::spawn(server::serve(
            "inbound",
            inbound_l,
            stack::inbound(&parts),
            limits.clone(),
            metrics.connections("inbound"),
            Some(server::ServerTls::Mesh(mesh.clone())),
            shutdown_rx.clone(),
        )),
        tokio::spawn(server::serve(
            "outbound",
            outbound_l,
            stack::outbound(&parts),
            limits.clone(),
            metrics.connections("outbound"),
            None,
            shutdown_rx.clone(),
        )),
    ];
    if let Some(store) = &gateway_store {
        let router = stack::service_router(&parts);
        let stack_parts = parts.clone();
        proxies.push(tokio::spawn(gateway::serve_ports(
            gateway::PortParts {
                bind: config.inbound_addr.ip(),
                stack: std::sync::Arc::new(move |port, tables| {
                    stack::gateway(&stack_parts, &router, port, tables)
                }),
                limits: config.limits.clone(),
                metrics: metrics.clone(),
            },
            store.subscribe(),
            shutdown_rx.clone(),
        )));
    }
    let (admin_shutdown, admin_rx) = watch::channel(false);
    let admin_svc = Admin::new(
        health.clone(),
        metrics.clone(),
        policy.clone(),
        resolver,
        resilience,
        mesh.clone(),
        Identity {
            pod: config.pod_name.clone(),
            namespace: config.namespace.clone(),
            service: config.service.clone(),
        },
    );
    let admin_task = tokio::spawn(server::serve(
        "admin",
        admin_l,
        tower::util::BoxCloneSyncService::new(admin_svc),
        limits,
        metrics.connections("admin"),
        None,
        admin_rx,
    ));
    health.set_listening();
    if gateway_store.is_some() {
        health.set_no_app();
    } else {
        tokio::spawn(health::poll_app(
            health.clone(),
            client,
            config.app_host,
            shutdown_rx,
        ));
    }
    tracing::info!(%inbound, %outbound, %admin, "listening");

    Ok(Running {
        inbound,
        outbound,
        admin,
        metrics,
        policy,
        health,
        mesh,
        static_resolver,
        tracing,
        shutdown,
        admin_shutdown,
        proxies,
        admin_task,
    })
}

/// Reads the endpoints file now and follows it; names from flags stay
/// unless the file names them too (the file wins).
async fn follow_endpoints_file(
    r: &StaticResolver,
    flags: &StaticEndpoints,
    path: &std::path::Path,
    config: &Config,
    shutdown: watch::Receiver<bool>,
) {
    let apply = {
        let (r, flags, path) = (r.clone(), flags.clone(), path.to_owned());
        move |text: String| match parse_file(&text) {
            Ok(from_file) => {
                let mut all = flags.clone();
                all.extend(from_file);
                r.replace_all(&all);
                tracing::info!(path = %path.display(), services = all.len(), "static endpoints loaded");
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "endpoints file refused; keeping the last endpoints");
            }
        }
    };
    let apply_now = apply.clone();
    if let Ok(text) = tokio::fs::read_to_string(path).await {
        apply_now(text);
    }
    tokio::spawn(file_watch::poll_file(
        path.to_owned(),
        config.file_poll_interval,
        shutdown,
        apply,
    ));
}

/// Starts discovery for every declared dependency as soon as a policy names
/// it, so the first request to it finds endpoints already loaded and
/// readiness waits for them.
async fn follow_declared_dependencies(
    resolver: Resolver,
    mut policy: watch::Receiver<PolicyState>,
    namespace: String,
) {
    loop {
        let deps: Vec<ServiceName> = policy
            .borrow_and_update()
            .policy
            .iter()
            .flat_map(|p| {
                let own = if p.namespace.is_empty() {
                    &namespace
                } else {
                    &p.namespace
                };
                p.dependencies
                    .iter()
                    .map(|d| ServiceName::new(&d.name, d.namespace_or(own)))
            })
            .collect();
        for dep in &deps {
            let _ = resolver.resolve(dep);
        }
        if policy.changed().await.is_err() {
            return;
        }
    }
}
