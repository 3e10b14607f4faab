//! Configuration: the command line and environment, and what they become.
//!
//! Every flag has an environment variable, because the operator configures
//! the sidecar container through `env`; `trellis-sidecar --help` lists both.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, ValueEnum};

use crate::{
    balance::BalanceConfig,
    client::ClientConfig,
    discovery::r#static::{StaticEndpoints, parse_flag, parse_identity_flag},
    resilience::outlier::OutlierSettings,
    server::ServerLimits,
    trace::ExportSettings,
};

/// A duration flag that must be more than zero (a zero timeout would
/// close every connection at once).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than zero, such as 10s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// Where endpoints come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryKind {
    /// EndpointSlices through the Kubernetes API (in a pod).
    Kubernetes,
    /// `--static-endpoints` and `--endpoints-file` (no Kubernetes at all).
    Static,
}

/// The Trellis sidecar: a proxy beside each service, giving it discovery,
/// load balancing, health and metrics.
///
/// In a pod the operator sets the environment; to run without Kubernetes,
/// give a policy file and static endpoints:
///
///   trellis-sidecar --policy-file policy.json --static-endpoints user=127.0.0.1:9001,127.0.0.1:9002
#[derive(Clone, Debug, Parser)]
#[command(name = "trellis-sidecar", version, about, long_about)]
pub struct Args {
    /// Inbound listener: traffic to this service, forwarded to the application.
    #[arg(long, env = "TRELLIS_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,

    /// Outbound listener: the application's way to its dependencies (HTTP proxy
    /// form or Host routing). Keep it on loopback.
    #[arg(long, env = "TRELLIS_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,

    /// Admin listener: /livez /readyz /healthz /metrics /status.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,

    /// The address the application listens on; its port comes from the policy.
    #[arg(long, env = "TRELLIS_APP_HOST", default_value = "127.0.0.1")]
    pub app_host: IpAddr,

    /// The pod's namespace: bare dependency names resolve here, and the policy
    /// ConfigMap is read from here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// The pod's name, shown on /status.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// The pod's ServiceAccount: its mesh identity (the service's name when unset).
    #[arg(long, env = "TRELLIS_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// The projected ServiceAccount token (audience `trellis-identity`)
    /// the sidecar proves its identity with to the identity service.
    #[arg(
        long,
        env = "TRELLIS_IDENTITY_TOKEN_FILE",
        default_value = "/var/run/secrets/trellis/identity/token"
    )]
    pub identity_token_file: PathBuf,

    /// The service this sidecar serves, shown on /status.
    #[arg(long, env = "TRELLIS_SERVICE")]
    pub service: Option<String>,

    /// The cluster's DNS domain, for names like user.shop.svc.cluster.local.
    #[arg(long, env = "TRELLIS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// ConfigMap holding the policy under key policy.json, watched in POD_NAMESPACE.
    #[arg(long, env = "TRELLIS_POLICY_CONFIGMAP")]
    pub policy_configmap: Option<String>,

    /// File holding the policy (JSON), polled for changes. With a ConfigMap
    /// too, the file is the initial policy and the ConfigMap then rules.
    #[arg(long, env = "TRELLIS_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// Gateway mode: serve the Gateway API configuration the operator keeps
    /// in this Secret (key gateway.json) in POD_NAMESPACE, instead of a
    /// policy.
    #[arg(long, env = "TRELLIS_GATEWAY_SECRET", conflicts_with = "gateway_file")]
    pub gateway_secret: Option<String>,

    /// Gateway mode from a file holding the gateway configuration (JSON),
    /// polled for changes: for running without Kubernetes.
    #[arg(long, env = "TRELLIS_GATEWAY_FILE")]
    pub gateway_file: Option<PathBuf>,

    /// Where endpoints come from; by default static when static endpoints are
    /// given, else Kubernetes.
    #[arg(long, env = "TRELLIS_DISCOVERY", value_enum)]
    pub discovery: Option<DiscoveryKind>,

    /// Static endpoints of a service: name=ip:port[,ip:port...]; repeat per
    /// service. `name` may be `name.namespace`.
    #[arg(long = "static-endpoints", env = "TRELLIS_STATIC_ENDPOINTS", value_parser = parse_flag, value_delimiter = ';')]
    pub static_endpoints: Vec<(String, Vec<std::net::SocketAddr>)>,

    /// With static discovery: a service's pods are meshed workloads running
    /// as this ServiceAccount, name=serviceaccount; repeat per service.
    /// Calls to it then go over mutual TLS and its pods must prove that
    /// identity (in Kubernetes the label `trellis.dev/service-account` on
    /// its Service says so). `name` may be `name.namespace`.
    #[arg(long = "static-identity", env = "TRELLIS_STATIC_IDENTITIES", value_parser = parse_identity_flag, value_delimiter = ';')]
    pub static_identities: Vec<(String, String)>,

    /// JSON file of static endpoints, {"name": ["ip:port", ...]}, polled for changes.
    #[arg(long, env = "TRELLIS_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,

    /// How often watched files are read.
    #[arg(long, env = "TRELLIS_FILE_POLL_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub file_poll_interval: Duration,

    /// How long a request for a service seen for the first time waits for
    /// discovery before failing with 503.
    #[arg(long, env = "TRELLIS_DISCOVERY_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub discovery_timeout: Duration,

    /// Most services followed through the Kubernetes API at once.
    #[arg(long, env = "TRELLIS_MAX_SERVICES", default_value_t = 256)]
    pub max_services: usize,

    /// Most client connections per listener.
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Time a new client connection has to send the bytes that tell its
    /// protocol; one that sends nothing is closed.
    #[arg(long, env = "TRELLIS_FIRST_BYTES_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub first_bytes_timeout: Duration,

    /// Time an HTTP/1.1 client has from the first byte of a request head to its end.
    #[arg(long, env = "TRELLIS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Largest request head, in bytes.
    #[arg(long, env = "TRELLIS_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,

    /// A client connection with no request in flight for this long is closed (HTTP/1.1 and HTTP/2).
    #[arg(long, env = "TRELLIS_CLIENT_IDLE_TIMEOUT", default_value = "5m", value_parser = positive_duration)]
    pub client_idle_timeout: Duration,

    /// Time to connect to an upstream.
    #[arg(long, env = "TRELLIS_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// How long an idle upstream connection is kept in the pool.
    #[arg(long, env = "TRELLIS_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "TRELLIS_DRAIN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,

    /// Log filter (tracing's EnvFilter syntax), such as info or trellis_sidecar=debug.
    /// Failures in a row (5xx, connect failure, timeout) that eject an endpoint from its balancer; 0 turns ejection off.
    #[arg(
        long,
        env = "TRELLIS_OUTLIER_CONSECUTIVE_FAILURES",
        default_value_t = 5
    )]
    pub outlier_consecutive_failures: u32,

    /// How long an endpoint's first ejection lasts; the n-th lasts n times as long.
    #[arg(long, env = "TRELLIS_OUTLIER_BASE_EJECTION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub outlier_base_ejection: Duration,

    /// The longest ejection.
    #[arg(long, env = "TRELLIS_OUTLIER_MAX_EJECTION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub outlier_max_ejection: Duration,

    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,

    /// Threads that run the proxy; 0, the default, is one per CPU the
    /// process may use. One runs every connection on one thread, with no
    /// hand-offs between threads: 10-20 % less CPU per request on the
    /// benchmark's two cores, but at most one core, and there the pair no
    /// longer kept up with 8,000 requests/s (docs/benchmarks.md).
    #[arg(long, env = "TRELLIS_PROXY_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Export spans over OTLP/gRPC to this endpoint (`http://collector:4317`);
    /// unset, no spans are made and trace headers pass through untouched.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// `service.version` on the spans.
    #[arg(long, env = "TRELLIS_SERVICE_VERSION")]
    pub service_version: Option<String>,

    /// Longest a finished span waits before its batch is exported.
    #[arg(long, env = "TRELLIS_TRACE_EXPORT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub trace_export_interval: Duration,

    /// Finished spans held for export; beyond it they are dropped and counted.
    #[arg(long, env = "TRELLIS_TRACE_QUEUE", default_value_t = 2048)]
    pub trace_queue: usize,
}

/// How discovery is set up.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// EndpointSlices through the Kubernetes API.
    Kubernetes {
        /// Most services followed.
        max_services: usize,
    },
    /// Fixed endpoints, changeable through the endpoints file or the
    /// running sidecar's [`StaticResolver`](crate::discovery::r#static::StaticResolver).
    Static {
        /// The initial endpoints.
        endpoints: StaticEndpoints,
        /// A file polled for changes.
        file: Option<PathBuf>,
    },
}

/// Everything the sidecar runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Inbound listener address.
    pub inbound_addr: SocketAddr,
    /// Outbound listener address.
    pub outbound_addr: SocketAddr,
    /// Admin listener address.
    pub admin_addr: SocketAddr,
    /// Where the application listens.
    pub app_host: IpAddr,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod_name: Option<String>,
    /// The pod's ServiceAccount (the service's name when unset).
    pub service_account: Option<String>,
    /// The projected token for the identity service.
    pub identity_token_file: PathBuf,
    /// The service served.
    pub service: Option<String>,
    /// The cluster DNS domain.
    pub cluster_domain: String,
    /// Policy ConfigMap name.
    pub policy_configmap: Option<String>,
    /// Policy file.
    pub policy_file: Option<PathBuf>,
    /// Gateway mode, and where its configuration comes from.
    pub gateway: Option<GatewaySource>,
    /// Discovery.
    pub discovery: Discovery,
    /// With static discovery: the ServiceAccount each meshed service's pods
    /// run as, by service name (`name` or `name.namespace`).
    pub static_identities: BTreeMap<String, String>,
    /// File poll interval.
    pub file_poll_interval: Duration,
    /// Wait for discovery's first answer.
    pub discovery_timeout: Duration,
    /// Listener limits.
    pub limits: ServerLimits,
    /// Upstream client settings.
    pub client: ClientConfig,
    /// Balancer tuning.
    pub balance: BalanceConfig,
    /// Outlier ejection of endpoints.
    pub outlier: OutlierSettings,
    /// OTLP/gRPC endpoint for spans; `None` turns tracing off.
    pub otlp_endpoint: Option<String>,
    /// `service.version` on the spans.
    pub service_version: Option<String>,
    /// Span export queue and timing.
    pub trace_export: ExportSettings,
}

impl Config {
    /// A configuration for running without Kubernetes on loopback ephemeral
    /// ports: what tests and local development start from.
    pub fn local(policy_file: Option<PathBuf>) -> Self {
        let lo = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        Self {
            inbound_addr: lo(0),
            outbound_addr: lo(0),
            admin_addr: lo(0),
            app_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            namespace: "default".into(),
            pod_name: None,
            service_account: None,
            identity_token_file: PathBuf::from("/var/run/secrets/trellis/identity/token"),
            service: None,
            cluster_domain: "cluster.local".into(),
            policy_configmap: None,
            policy_file,
            gateway: None,
            discovery: Discovery::Static {
                endpoints: StaticEndpoints::new(),
                file: None,
            },
            static_identities: BTreeMap::new(),
            file_poll_interval: Duration::from_millis(100),
            discovery_timeout: Duration::from_secs(1),
            limits: ServerLimits {
                drain_grace: Duration::from_secs(5),
                ..ServerLimits::default()
            },
            client: ClientConfig::default(),
            balance: BalanceConfig::default(),
            outlier: OutlierSettings::default(),
            otlp_endpoint: None,
            service_version: None,
            trace_export: ExportSettings {
                interval: Duration::from_millis(200),
                ..ExportSettings::default()
            },
        }
    }

    /// Whether anything needs the Kubernetes API.
    pub fn needs_kubernetes(&self) -> bool {
        matches!(self.discovery, Discovery::Kubernetes { .. })
            || self.policy_configmap.is_some()
            || matches!(self.gateway, Some(GatewaySource::Secret(_)))
    }
}

/// Where a gateway's configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewaySource {
    /// A Secret in the pod's namespace, watched through the API.
    Secret(String),
    /// A file, polled.
    File(PathBuf),
}

impl From<Args> for Config {
    fn from(a: Args) -> Self {
        let kind = a.discovery.unwrap_or(
            if a.static_endpoints.is_empty() && a.endpoints_file.is_none() {
                DiscoveryKind::Kubernetes
            } else {
                DiscoveryKind::Static
            },
        );
        let discovery = match kind {
            DiscoveryKind::Kubernetes => Discovery::Kubernetes {
                max_services: a.max_services,
            },
            DiscoveryKind::Static => Discovery::Static {
                endpoints: a.static_endpoints.into_iter().collect(),
                file: a.endpoints_file,
            },
        };
        Self {
            inbound_addr: a.inbound_addr,
            outbound_addr: a.outbound_addr,
            admin_addr: a.admin_addr,
            app_host: a.app_host,
            namespace: a.namespace,
            pod_name: a.pod_name,
            service_account: a.service_account,
            identity_token_file: a.identity_token_file,
            service: a.service,
            cluster_domain: a.cluster_domain,
            policy_configmap: a.policy_configmap,
            policy_file: a.policy_file,
            gateway: match (a.gateway_secret, a.gateway_file) {
                (Some(name), _) => Some(GatewaySource::Secret(name)),
                (None, Some(path)) => Some(GatewaySource::File(path)),
                (None, None) => None,
            },
            discovery,
            static_identities: a.static_identities.into_iter().collect(),
            file_poll_interval: a.file_poll_interval,
            discovery_timeout: a.discovery_timeout,
            limits: ServerLimits {
                max_connections: a.max_connections,
                first_bytes_timeout: a.first_bytes_timeout,
                header_read_timeout: a.header_read_timeout,
                idle_timeout: a.client_idle_timeout,
                max_header_bytes: a.max_header_bytes,
                drain_grace: a.drain_grace,
                ..ServerLimits::default()
            },
            client: ClientConfig {
                connect_timeout: a.connect_timeout,
                idle_timeout: a.idle_timeout,
                ..ClientConfig::default()
            },
            balance: BalanceConfig::default(),
            outlier: OutlierSettings {
                consecutive_failures: a.outlier_consecutive_failures,
                base_ejection: a.outlier_base_ejection,
                max_ejection: a.outlier_max_ejection,
            },
            otlp_endpoint: a.otlp_endpoint.filter(|e| !e.is_empty()),
            service_version: a.service_version,
            trace_export: ExportSettings {
                queue: a.trace_queue,
                interval: a.trace_export_interval,
                ..ExportSettings::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_endpoints_choose_static_discovery() {
        let a = Args::try_parse_from([
            "trellis-sidecar",
            "--static-endpoints",
            "user=127.0.0.1:9001,127.0.0.1:9002",
            "--static-endpoints",
            "order=127.0.0.1:9003",
        ])
        .unwrap();
        let c = Config::from(a);
        let Discovery::Static { endpoints, .. } = &c.discovery else {
            panic!("expected static discovery")
        };
        assert_eq!(endpoints["user"].len(), 2);
        assert_eq!(endpoints["order"].len(), 1);
        assert_eq!(c.inbound_addr.port(), 15006);
        assert_eq!(c.outbound_addr, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(c.admin_addr.port(), 15020);
        assert!(!c.needs_kubernetes());
    }

    #[test]
    fn static_identities_are_flags_or_one_variable() {
        let a = Args::try_parse_from([
            "trellis-sidecar",
            "--static-endpoints",
            "user=127.0.0.1:9001",
            "--static-identity",
            "user=user-sa",
            "--static-identity",
            "product.shop=product",
        ])
        .unwrap();
        let c = Config::from(a);
        assert_eq!(c.static_identities["user"], "user-sa");
        assert_eq!(c.static_identities["product.shop"], "product");
        // The environment variable holds several, `;`-delimited like
        // TRELLIS_STATIC_ENDPOINTS (clap splits both the same way).
        let a = Args::try_parse_from(["trellis-sidecar", "--static-identity", "user=u;order=o"])
            .unwrap();
        assert_eq!(
            a.static_identities,
            [("user".into(), "u".into()), ("order".into(), "o".into())]
        );
        let bad = Args::try_parse_from(["trellis-sidecar", "--static-identity", "user"])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("expected name=serviceaccount"), "{bad}");
        assert!(Config::local(None).static_identities.is_empty());
    }

    #[test]
    fn no_static_endpoints_means_kubernetes() {
        let a = Args::try_parse_from(["trellis-sidecar", "--policy-configmap", "order-sidecar"])
            .unwrap();
        assert!(Config::from(a).needs_kubernetes());
    }

    #[test]
    fn connection_timeouts_are_flags() {
        let a = Args::try_parse_from([
            "trellis-sidecar",
            "--first-bytes-timeout",
            "2s",
            "--client-idle-timeout",
            "90s",
        ])
        .unwrap();
        let c = Config::from(a);
        assert_eq!(c.limits.first_bytes_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(90));
        let d = Config::from(Args::try_parse_from(["trellis-sidecar"]).unwrap());
        assert_eq!(d.limits.first_bytes_timeout, Duration::from_secs(10));
        assert_eq!(d.limits.idle_timeout, Duration::from_secs(300));
        let zero = Args::try_parse_from(["trellis-sidecar", "--first-bytes-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(zero.contains("must be more than zero"), "{zero}");
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
