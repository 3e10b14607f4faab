//! `trellis-operator`: the MicroService controller, with leader election,
//! health endpoints and metrics. See `trellis-operator --help`.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use trellis_operator::{
    IdentityConfig, Settings, admin,
    leader::{LeaderElector, Timing},
    metrics::Metrics,
    render::{DEFAULT_SIDECAR_IMAGE, RenderConfig},
    telemetry::{self, LogFormat},
};

/// Reconciles Trellis MicroService resources into Deployments with the Trellis
/// sidecar, Services, configuration and RBAC.
#[derive(Debug, Parser)]
#[command(name = "trellis-operator", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// The sidecar image put into every MicroService's pods.
    #[arg(long, env = "TRELLIS_SIDECAR_IMAGE", default_value = DEFAULT_SIDECAR_IMAGE)]
    sidecar_image: String,

    /// Where the admin server listens: /livez, /readyz and /metrics.
    #[arg(long, env = "TRELLIS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Elect a leader on a Lease, so that only one replica reconciles.
    #[arg(long, env = "TRELLIS_LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,

    /// The name of the leader election Lease.
    #[arg(long, env = "TRELLIS_LEASE_NAME", default_value = "trellis-operator")]
    lease_name: String,

    /// The namespace of the leader election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "trellis-system")]
    lease_namespace: String,

    /// This replica's identity in the Lease and in Events (the pod name);
    /// the host name when unset.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Watch only this namespace; all namespaces when unset.
    #[arg(long, env = "TRELLIS_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,

    /// The cluster's DNS domain, for the URLs in MicroService status.
    #[arg(long, env = "TRELLIS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,

    /// The identity service's `host:port` (`trellis-identity.trellis-system.svc:8443`):
    /// sidecars get certificates there and speak mutual TLS once the trust
    /// bundle ConfigMap `trellis-trust-bundle` exists in POD_NAMESPACE. Unset:
    /// the mesh runs without identity, in plaintext.
    #[arg(long, env = "TRELLIS_IDENTITY_ADDRESS")]
    identity_address: Option<String>,

    /// The trust domain of the mesh's SPIFFE IDs (the identity service's own).
    #[arg(
        long,
        env = "TRELLIS_TRUST_DOMAIN",
        default_value = "cluster.local",
        global = true
    )]
    trust_domain: String,

    /// Reconciles running at once.
    #[arg(long, env = "TRELLIS_CONCURRENCY", default_value_t = 4)]
    concurrency: u16,

    /// Reconcile every MicroService at least this often, in seconds, even without changes.
    #[arg(long, env = "TRELLIS_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,

    /// How long a MicroService's status waits, in seconds, for the Deployment
    /// controller's report on a Deployment just created or changed: one status
    /// write on the way to Ready. 0 writes `Progressing` at once and `Ready`
    /// when the report comes (two writes, an earlier `observedGeneration`).
    /// No status waits while a report is overdue (the controller is behind).
    #[arg(
        long,
        env = "TRELLIS_STATUS_REPORT_WAIT_SECONDS",
        default_value_t = trellis_operator::controller::REPORT_WAIT.as_secs()
    )]
    status_report_wait_seconds: u64,

    /// Send traces to this OTLP/gRPC endpoint (`http://collector.observability:4317`):
    /// the operator's reconciles, and every sidecar's spans (the sidecars get it as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`). Unset, nothing is traced.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,

    /// Serve Gateway API Gateways whose GatewayClass names this controller
    /// (needs the Gateway API CRDs; watching one namespace, that namespace's
    /// Gateways, with routes and backends there).
    #[arg(long, env = "TRELLIS_GATEWAY_CONTROLLER", default_value_t = true, action = clap::ArgAction::Set)]
    gateway_controller: bool,

    /// The `controllerName` of the GatewayClasses this operator serves.
    #[arg(long, env = "TRELLIS_GATEWAY_CONTROLLER_NAME", default_value = trellis_operator::gateway::CONTROLLER_NAME)]
    gateway_controller_name: String,

    /// The ClusterRole each gateway is bound to, to read EndpointSlices (the chart's).
    #[arg(
        long,
        env = "TRELLIS_GATEWAY_DISCOVERY_ROLE",
        default_value = "trellis-gateway"
    )]
    gateway_discovery_role: String,

    /// Which address Gateways report: `service` (the gateway Service's
    /// load-balancer ingress, else its cluster IP) or `pod` (a ready gateway
    /// pod's IP, for a node whose clients reach pods but not Services).
    #[arg(
        long,
        env = "TRELLIS_GATEWAY_ADDRESS_FROM",
        value_enum,
        default_value = "service"
    )]
    gateway_address_from: trellis_operator::gateway::AddressFrom,

    /// Log line format.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,

    /// Which log lines to write (tracing's EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info,kube=warn")]
    log_filter: String,
}

/// What else the binary runs.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The identity service: certificates for sidecars (its own Deployment,
    /// the only holder of the issuer's key).
    Identity(IdentityArgs),
}

#[derive(Debug, clap::Args)]
struct IdentityArgs {
    /// Where the identity service listens (TLS).
    #[arg(long, env = "TRELLIS_IDENTITY_ADDR", default_value = "0.0.0.0:8443")]
    addr: SocketAddr,

    /// How long a workload certificate lasts (sidecars renew at 70 %).
    #[arg(long, env = "TRELLIS_CERTIFICATE_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    certificate_lifetime: Duration,

    /// The identity service's Service name (its certificate names it).
    #[arg(
        long,
        env = "TRELLIS_IDENTITY_SERVICE",
        default_value = "trellis-identity"
    )]
    service: String,

    /// The identity service's own ServiceAccount.
    #[arg(
        long,
        env = "TRELLIS_IDENTITY_SERVICE_ACCOUNT",
        default_value = "trellis-identity"
    )]
    service_account: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = telemetry::init(
        args.log_format,
        &args.log_filter,
        args.otlp_endpoint.as_deref(),
    )?;
    if let Some(Command::Identity(id)) = &args.command {
        let client = kube::Client::try_default()
            .await
            .context("cannot configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
        let settings = trellis_operator::identity::IdentitySettings {
            addr: id.addr,
            namespace: args.lease_namespace.clone(),
            trust_domain: args.trust_domain.clone(),
            lifetime: id.certificate_lifetime,
            service: id.service.clone(),
            service_account: id.service_account.clone(),
        };
        return tokio::select! {
            r = trellis_operator::identity::run(client, settings) => r,
            () = shutdown_signal() => Ok(()),
        };
    }

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin_state = admin::AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let admin = tokio::spawn(admin::serve(args.metrics_addr, admin_state));

    let client = kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("trellis-operator-{}", std::process::id()));
    let settings = Settings {
        render: RenderConfig {
            sidecar_image: args.sidecar_image.clone(),
            cluster_domain: args.cluster_domain.clone(),
            otlp_endpoint: args.otlp_endpoint.clone(),
            mesh: None,
        },
        namespace: args.watch_namespace.clone(),
        concurrency: args.concurrency,
        instance: Some(identity.clone()),
        resync: Duration::from_secs(args.resync_seconds),
        report_wait: Duration::from_secs(args.status_report_wait_seconds),
        selector: None,
        identity: args.identity_address.clone().map(|addr| IdentityConfig {
            trust_domain: args.trust_domain.clone(),
            issuer_address: addr,
            bundle_namespace: args.lease_namespace.clone(),
        }),
    };
    // Ready once the apiserver answers; a standby is ready too.
    client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes apiserver")?;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);

    let elector = args.leader_elect.then(|| {
        LeaderElector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Timing::default(),
        )
    });
    if let Some(elector) = &elector {
        tokio::select! {
            () = elector.acquire() => {}
            () = shutdown_signal() => return Ok(()),
        }
    }
    metrics.leader.set(1);

    let gateways = args.gateway_controller.then(|| {
        tokio::spawn(trellis_operator::gateway::run(
            client.clone(),
            trellis_operator::gateway::GatewaySettings {
                controller_name: args.gateway_controller_name.clone(),
                deploy: trellis_operator::gateway::deploy::DeploySettings {
                    image: args.sidecar_image.clone(),
                    cluster_domain: args.cluster_domain.clone(),
                    otlp_endpoint: args.otlp_endpoint.clone(),
                    discovery_role: args.gateway_discovery_role.clone(),
                    controller_name: args.gateway_controller_name.clone(),
                    namespaced: args.watch_namespace.is_some(),
                },
                identity: args.identity_address.clone().map(|addr| {
                    (
                        addr,
                        args.trust_domain.clone(),
                        args.lease_namespace.clone(),
                    )
                }),
                address_from: args.gateway_address_from,
                namespace: args.watch_namespace.clone(),
            },
        ))
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = trellis_operator::run(client.clone(), settings, metrics.clone(), async {
        let _ = stop_rx.await;
    });
    tokio::pin!(controller);
    let lost = async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = &mut controller => r,
        r = admin => Err(anyhow::anyhow!("the admin server stopped: {:?}", r)),
        () = lost => {
            // Another replica may already be reconciling: stop at once.
            tracing::error!("lost the leader Lease; exiting so that Kubernetes restarts this replica as a candidate");
            std::process::exit(1);
        }
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(());
            let r = tokio::time::timeout(Duration::from_secs(20), &mut controller).await;
            r.unwrap_or(Ok(()))
        }
    };
    if let Some(task) = gateways {
        task.abort();
    }
    if let Some(elector) = &elector {
        elector.release().await;
    }
    result
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Args, Command};

    #[test]
    fn the_identity_service_takes_the_charts_arguments() {
        let args = Args::try_parse_from([
            "trellis-operator",
            "identity",
            "--addr=0.0.0.0:8443",
            "--certificate-lifetime=1m",
            "--service=trellis-identity",
            "--service-account=trellis-identity",
            "--trust-domain=example.org",
        ])
        .unwrap();
        assert_eq!(args.trust_domain, "example.org");
        let Some(Command::Identity(id)) = args.command else {
            panic!("not the identity subcommand")
        };
        assert_eq!(id.certificate_lifetime, std::time::Duration::from_secs(60));
    }
}
