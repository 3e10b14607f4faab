//! The example shop (examples/shop) on a real cluster, shared by the end-to-end
//! suite (tests/tests/shop.rs) and the demo (`cargo xtask demo`, through the
//! `trellis-shop` binary): the same deployment, the same traffic and the same
//! readings of the sidecars, so the demo shows what the suite asserts.
//!
//! - [`Target`]: where it runs, from the environment: the local node (default)
//!   or kind (`TRELLIS_E2E_KIND=1`, set by `cargo xtask e2e --kind`);
//! - [`install_chart`], [`shop_manifests`], [`apply`], [`wait_ready`]: the
//!   chart and the shop, with `helm` and `kubectl` as a user runs them;
//! - [`Reach`]: HTTP to a Service, through the apiserver's service proxy (the
//!   host cannot reach ClusterIPs: the local node blackholes the Service range
//!   on the host, kind's are inside Docker), and to a pod's sidecar admin
//!   port, straight to the pod IP on the local node (the host is on the pod
//!   bridge) or through the apiserver's pod proxy (kind);
//! - [`Edge`]: the shop's Gateway (examples/shop/gateway.yaml), through which
//!   [`Shop`] places its users, products and orders, as a client outside the
//!   cluster does (at the gateway pod's address on the local node, through
//!   a port-forward on kind), orders with a token [`crate::issuer`] signs;
//! - [`Shop`]: users, products, orders; [`Load`]: orders in the background;
//!   [`Shop::scrape`]: every pod's sidecar metrics.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, ResourceExt},
};
use serde_json::{Value, json};

use crate::{
    helm,
    issuer::Issuer,
    kubectl,
    shop_metrics::{BREAKER_STATE, POLICY_GENERATION, Scrape},
};

/// The node's address on the pod network, where `cargo xtask postgres up` listens.
pub const NODE_POSTGRES: &str = "10.244.0.1";
/// The port of every MicroService's Service (to the sidecar's inbound listener).
pub const SERVICE_PORT: u16 = 80;
/// The sidecar's admin port: /metrics, /status.
pub const ADMIN_PORT: u16 = 15020;
/// The label the operator puts on a MicroService's pods, with its name.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The shop's services, callers last.
pub const SERVICES: [&str; 3] = ["user", "product", "order"];
/// The shop's Gateway (examples/shop/gateway.yaml).
pub const GATEWAY: &str = "shop";
/// The Secret holding the public keys of the shop's token issuer
/// (examples/shop/gateway.yaml's EdgePolicy `shop-orders-login`).
pub const ISSUER_SECRET: &str = "shop-issuer-keys";
/// The label on a Gateway's pods naming it (the Gateway API's convention).
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// The workspace root. `cargo test` says where this crate's manifest is at
/// run time; that is preferred to the path compiled in, which names the
/// clone that built the binary when clones share a target directory.
pub fn workspace() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// How the host reaches pods (their sidecars' admin port). Services are
/// always reached through the apiserver's proxy (see [`Reach::service`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReachMode {
    /// Plain HTTP to pod IPs: the local node, whose host is on the pod bridge.
    Direct,
    /// Through the apiserver's `pods/proxy`: any cluster (kind).
    ApiServer,
}

/// Where the suite runs, from the environment.
#[derive(Clone, Debug)]
pub struct Target {
    /// kind rather than the local node: `TRELLIS_E2E_KIND=1`.
    pub kind: bool,
    /// `TRELLIS_E2E_REACH=direct|apiserver`; the default is direct on the
    /// local node and through the apiserver on kind.
    pub reach: ReachMode,
    /// The IPv4 address the shop's `postgres` EndpointSlice names:
    /// `TRELLIS_E2E_POSTGRES`, else the node's ([`NODE_POSTGRES`]).
    pub postgres: String,
}

impl Target {
    /// Reads `TRELLIS_E2E_KIND`, `TRELLIS_E2E_REACH` and `TRELLIS_E2E_POSTGRES`.
    pub fn from_env() -> Result<Self> {
        let kind = std::env::var("TRELLIS_E2E_KIND").is_ok_and(|v| v == "1" || v == "true");
        let reach = match std::env::var("TRELLIS_E2E_REACH").ok().as_deref() {
            None | Some("") => {
                if kind {
                    ReachMode::ApiServer
                } else {
                    ReachMode::Direct
                }
            }
            Some("direct") => ReachMode::Direct,
            Some("apiserver") => ReachMode::ApiServer,
            Some(other) => {
                bail!("TRELLIS_E2E_REACH must be `direct` or `apiserver`, not {other:?}")
            }
        };
        let postgres = match std::env::var("TRELLIS_E2E_POSTGRES") {
            Ok(addr) => {
                addr.parse::<std::net::Ipv4Addr>().with_context(|| {
                    format!("TRELLIS_E2E_POSTGRES must be an IPv4 address, not {addr:?}")
                })?;
                addr
            }
            Err(_) if kind => bail!(
                "TRELLIS_E2E_POSTGRES is not set: on kind the shop's PostgreSQL is a container (cargo xtask e2e --kind starts it and sets this)"
            ),
            Err(_) => NODE_POSTGRES.to_owned(),
        };
        Ok(Self {
            kind,
            reach,
            postgres,
        })
    }
}

/// The shop's PostgreSQL, as the role the services use: for faults a test
/// makes in one service's database.
pub struct Database(sqlx::PgPool);

impl Database {
    /// Connects to the order service's database on `target`'s PostgreSQL
    /// (any database but the one to refuse would do).
    pub async fn connect(target: &Target) -> Result<Self> {
        let url = format!("postgres://shop:shop@{}:5432/shop_order", target.postgres);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Self(pool))
    }

    /// `db` refuses new connections and its open ones are closed, so the
    /// service on it answers that its database is unavailable (503, or
    /// gRPC UNAVAILABLE) until [`Database::allow`].
    pub async fn refuse(&self, db: &str) -> Result<()> {
        let db = identifier(db)?;
        sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
            .execute(&self.0)
            .await?;
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(db)
            .execute(&self.0)
            .await?;
        Ok(())
    }

    /// `db` takes connections again.
    pub async fn allow(&self, db: &str) -> Result<()> {
        let db = identifier(db)?;
        sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
            .execute(&self.0)
            .await?;
        Ok(())
    }
}

/// `name` when it is a plain SQL identifier (it is spliced into a statement).
fn identifier(name: &str) -> Result<&str> {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !plain {
        bail!("{name:?} is not a plain database name");
    }
    Ok(name)
}

/// Runs a command, failing with its output when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with `input` on stdin; returns stdout.
pub(crate) fn run_with_input(cmd: &mut Command, input: &str) -> Result<String> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}):\n{}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm upgrade --install <release> charts/trellis` into `namespace` (so a
/// second demo run upgrades), watching only `watch` (so the operator leaves
/// every other namespace, and the operators other tests run, alone), waiting
/// until the operator is available. Gateways report a gateway pod's
/// address: this host reaches pods but not Services.
pub fn install_chart(release: &str, namespace: &str, watch: &str) -> Result<String> {
    install_chart_with(release, namespace, watch, &["gateway.addressFrom=pod"])
}

/// [`install_chart`] with more `--set key=value` values.
pub fn install_chart_with(
    release: &str,
    namespace: &str,
    watch: &str,
    values: &[&str],
) -> Result<String> {
    run(helm()
        .args(["upgrade", "--install", release])
        .arg(workspace().join("charts/trellis"))
        .args(["--namespace", namespace, "--create-namespace"])
        .args(["--set", &format!("watchNamespace={watch}")])
        .args(values.iter().flat_map(|v| ["--set", v]))
        .args(["--wait", "--timeout", "180s"]))
}

/// `helm uninstall <release>`, waiting until its objects are gone.
pub fn uninstall_chart(release: &str, namespace: &str) -> Result<String> {
    run(helm().args(["uninstall", release, "--namespace", namespace, "--wait"]))
}

/// examples/shop as a `List` for `namespace`: every manifest but the
/// Namespace, each moved to `namespace`, and the `postgres` EndpointSlice
/// pointing at `postgres` (the node's address on the local node, a container's on kind).
pub fn shop_manifests(namespace: &str, postgres: &str) -> Result<Value> {
    let dir = workspace().join("examples/shop");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut items = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut value: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("parsing {}", path.display()))?;
            if value.is_null() || value["kind"] == "Namespace" {
                continue;
            }
            value["metadata"]["namespace"] = json!(namespace);
            if value["kind"] == "EndpointSlice" {
                for endpoint in value["endpoints"].as_array_mut().into_iter().flatten() {
                    endpoint["addresses"] = json!([postgres]);
                }
            }
            items.push(value);
        }
    }
    Ok(json!({ "apiVersion": "v1", "kind": "List", "items": items }))
}

/// The shop's Gateways in `list` (from [`shop_manifests`]) of GatewayClass
/// `class`: a release with a class of its own serves them.
pub fn use_gateway_class(list: &mut Value, class: &str) {
    for item in list["items"].as_array_mut().into_iter().flatten() {
        if item["kind"] == "Gateway" {
            item["spec"]["gatewayClassName"] = json!(class);
        }
    }
}

/// `kubectl apply -f -` of a `List`; returns what kubectl printed.
pub fn apply(list: &Value) -> Result<String> {
    run_with_input(kubectl().args(["apply", "-f", "-"]), &list.to_string())
}

/// `kubectl delete -f -` of a `List`, waiting until the objects are gone.
pub fn delete(list: &Value) -> Result<String> {
    run_with_input(
        kubectl().args([
            "delete",
            "--ignore-not-found",
            "--wait",
            "--timeout=180s",
            "-f",
            "-",
        ]),
        &list.to_string(),
    )
}

/// `kubectl wait --for=condition=Ready microservice --all`.
pub fn wait_ready(namespace: &str, timeout: Duration) -> Result<String> {
    run(kubectl().args([
        "wait",
        "--for=condition=Ready",
        "microservice",
        "--all",
        "-n",
        namespace,
        &format!("--timeout={}s", timeout.as_secs()),
    ]))
}

/// `kubectl patch microservice <name> --type merge -p <patch>`.
pub fn patch_microservice(namespace: &str, name: &str, patch: &Value) -> Result<String> {
    run(kubectl().args([
        "patch",
        "microservice",
        name,
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        &patch.to_string(),
    ]))
}

/// One HTTP answer.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body as text.
    pub body: String,
    /// From sending to the whole body read.
    pub elapsed: Duration,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("a JSON body, not: {}", self.body))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Where a Gateway is reached from outside the cluster.
#[derive(Clone, Debug)]
pub struct Edge {
    /// `host:port` to send requests to: the address its status gives (a
    /// gateway pod's IP, on the local node) or, when pods are reached
    /// through the apiserver (kind, whose pods the host cannot reach), a
    /// loopback port forwarded to a gateway pod ([`crate::port_forward`]).
    pub address: String,
}

impl Edge {
    /// Gateway `name` in `namespace` once it is Programmed with an address
    /// and routes `probe` (a path answered 200 behind it), within `timeout`.
    pub async fn wait(reach: &Reach, name: &str, probe: &str, timeout: Duration) -> Result<Self> {
        let started = Instant::now();
        let forwarded = match reach.mode {
            ReachMode::Direct => None,
            ReachMode::ApiServer => Some(
                crate::port_forward::forward(
                    reach.client.clone(),
                    &reach.namespace,
                    &format!("{GATEWAY_NAME_LABEL}={name}"),
                    80,
                )
                .await?,
            ),
        };
        let mut last = String::from("no status yet");
        loop {
            if let Some(mut edge) = Self::programmed(&reach.namespace, name, &mut last) {
                if let Some(local) = forwarded {
                    edge.address = local.to_string();
                }
                let mut through = reach.clone();
                through.edge = Some(edge.clone());
                match through.api(http::Method::GET, "", probe, None).await {
                    Ok(r) if r.status == 200 => return Ok(edge),
                    Ok(r) => {
                        last = format!("GET {probe} through it answered {}: {}", r.status, r.body)
                    }
                    Err(e) => last = format!("GET {probe} through it: {e:#}"),
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "Gateway {name} in {} did not serve {probe} within {timeout:?} ({last}); see `kubectl describe gateway {name} -n {}`",
                    reach.namespace,
                    reach.namespace
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The Gateway's address when it is Programmed at its generation.
    fn programmed(namespace: &str, name: &str, last: &mut String) -> Option<Self> {
        let out = run(kubectl().args(["get", "gateway", name, "-n", namespace, "-o", "json"]));
        let gw: Value = match out.map(|o| serde_json::from_str(&o)) {
            Ok(Ok(gw)) => gw,
            Ok(Err(e)) => {
                *last = format!("unreadable: {e}");
                return None;
            }
            Err(e) => {
                *last = format!("{e:#}");
                return None;
            }
        };
        let status = &gw["status"];
        let programmed = status["conditions"].as_array().and_then(|cs| {
            cs.iter().find(|c| c["type"] == "Programmed").map(|c| {
                c["status"] == "True" && c["observedGeneration"] == gw["metadata"]["generation"]
            })
        });
        let address = status["addresses"][0]["value"].as_str();
        match (programmed, address) {
            (Some(true), Some(address)) => Some(Self {
                address: address.to_owned(),
            }),
            _ => {
                *last = format!("status {status}");
                None
            }
        }
    }
}

/// HTTP to a namespace's Services and pods, directly or through the apiserver.
#[derive(Clone)]
pub struct Reach {
    mode: ReachMode,
    client: Client,
    namespace: String,
    http: reqwest::Client,
    /// Sent with every request to a Service and through the gateway.
    headers: http::HeaderMap,
    /// The namespace's Gateway, when its API is reached through it.
    edge: Option<Edge>,
}

impl Reach {
    /// A reach into `namespace`. `client` should not retry
    /// ([`crate::client_without_retries`]): a retried 503 looks like a success.
    pub fn new(client: Client, namespace: &str, mode: ReachMode) -> Self {
        Self {
            mode,
            client,
            namespace: namespace.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .no_proxy()
                .build()
                .expect("an HTTP client"),
            headers: http::HeaderMap::new(),
            edge: None,
        }
    }

    /// The same reach, sending [`Reach::api`] requests through `edge`.
    pub fn with_edge(mut self, edge: Edge) -> Self {
        self.edge = Some(edge);
        self
    }

    /// The gateway this reach goes through, if any.
    pub fn edge(&self) -> Option<&Edge> {
        self.edge.as_ref()
    }

    /// `method path` on the shop's API: through the Gateway when the reach
    /// has one (see [`Edge::address`]), else on Service `service` (see
    /// [`Reach::service`]).
    pub async fn api(
        &self,
        method: http::Method,
        service: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply> {
        match &self.edge {
            None => self.service(method, service, path, body).await,
            Some(edge) => {
                self.direct(method, &format!("http://{}{path}", edge.address), body)
                    .await
            }
        }
    }

    /// The same reach, adding `name: value` to every request to a Service.
    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers
            .insert(name, value.parse().expect("a valid header value"));
        self
    }

    /// `method path` on Service `service` (port 80, the sidecar's inbound
    /// listener), through the apiserver's service proxy, which sends each
    /// request to one of the Service's ready endpoints. Always the apiserver:
    /// the local node's host blackholes the Service range (nothing of the
    /// cluster leaves it), and kind's host is outside the cluster network.
    pub async fn service(
        &self,
        method: http::Method,
        service: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply> {
        let uri = format!(
            "/api/v1/namespaces/{}/services/{service}:{SERVICE_PORT}/proxy{path}",
            self.namespace
        );
        self.via_apiserver(method, &uri, body).await
    }

    /// `GET path` on a pod's port (the sidecar's admin port, usually).
    pub async fn pod(&self, pod: &Pod, port: u16, path: &str) -> Result<Reply> {
        match self.mode {
            ReachMode::Direct => {
                let ip = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.clone())
                    .with_context(|| format!("pod {} has no IP", pod.name_any()))?;
                self.direct(
                    http::Method::GET,
                    &format!("http://{ip}:{port}{path}"),
                    None,
                )
                .await
            }
            ReachMode::ApiServer => {
                let uri = format!(
                    "/api/v1/namespaces/{}/pods/{}:{port}/proxy{path}",
                    self.namespace,
                    pod.name_any()
                );
                self.via_apiserver(http::Method::GET, &uri, None).await
            }
        }
    }

    async fn direct(&self, method: http::Method, url: &str, body: Option<&Value>) -> Result<Reply> {
        let started = Instant::now();
        let mut req = self
            .http
            .request(method.clone(), url)
            .headers(self.headers.clone());
        if let Some(body) = body {
            req = req.json(body);
        }
        let rsp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = rsp.status().as_u16();
        let headers = rsp.headers().clone();
        let body = rsp
            .text()
            .await
            .with_context(|| format!("{method} {url}: the body"))?;
        Ok(Reply {
            status,
            headers,
            body,
            elapsed: started.elapsed(),
        })
    }

    async fn via_apiserver(
        &self,
        method: http::Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Reply> {
        let started = Instant::now();
        let mut req = http::Request::builder().method(method.clone()).uri(uri);
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        let bytes = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(b)?
            }
            None => Vec::new(),
        };
        let req = req.body(kube::client::Body::from(bytes))?;
        let rsp = tokio::time::timeout(Duration::from_secs(15), self.client.send(req))
            .await
            .with_context(|| format!("{method} {uri}: no answer in 15 s"))?
            .with_context(|| format!("{method} {uri}"))?;
        let status = rsp.status().as_u16();
        let headers = rsp.headers().clone();
        let body = rsp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {uri}: the body"))?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            elapsed: started.elapsed(),
        })
    }
}

/// The running, not terminating pods with an IP that `selector` selects
/// in `pods`, oldest first.
pub async fn running_pods(pods: &Api<Pod>, selector: &str) -> Result<Vec<Pod>> {
    let mut running: Vec<Pod> = pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
        })
        .collect();
    running.sort_by_key(|p| p.metadata.creation_timestamp.clone());
    Ok(running)
}

/// One pod's sidecar metrics.
#[derive(Clone, Debug)]
pub struct PodMetrics {
    /// The pod's name.
    pub pod: String,
    /// The pod's uid.
    pub uid: String,
    /// What its sidecar's /metrics said.
    pub metrics: Scrape,
}

/// A scrape of every pod of each service.
pub type Scrapes = BTreeMap<String, Vec<PodMetrics>>;

/// The shop in one namespace, and the users and products it made there.
#[derive(Clone)]
pub struct Shop {
    /// A client for the cluster.
    pub client: Client,
    /// The shop's namespace.
    pub namespace: String,
    /// HTTP into the namespace.
    pub reach: Reach,
    /// Makes names unique across runs sharing one database.
    pub run_id: String,
    /// Users created by [`Shop::seed`].
    pub users: Vec<i64>,
    /// Products created by [`Shop::seed`].
    pub products: Vec<i64>,
    /// Signs each order's token, when orders need one at the gateway
    /// (examples/shop/gateway.yaml's EdgePolicy).
    pub issuer: Option<Arc<Issuer>>,
}

impl Shop {
    /// The shop in `namespace`, reached as `target` says.
    pub async fn new(client: Client, namespace: &str, target: &Target) -> Self {
        // The shop's own answers (503 from a breaker, 429 from a rate limit)
        // must reach the test as they are: no client-side retries.
        let reach_client = crate::client_without_retries().await;
        Self {
            reach: Reach::new(reach_client, namespace, target.reach),
            client,
            namespace: namespace.to_owned(),
            run_id: format!("{:08x}", rand::random::<u32>()),
            users: Vec::new(),
            products: Vec::new(),
            issuer: None,
        }
    }

    /// The same shop, each order through the gateway carrying a token
    /// `issuer` signs for the ordering user (its key set stored as Secret
    /// [`ISSUER_SECRET`] with [`Issuer::store`]).
    pub fn signed_in(mut self, issuer: Issuer) -> Self {
        self.issuer = Some(Arc::new(issuer));
        self
    }

    /// The same shop, its users, products and orders going through Gateway
    /// `name` (examples/shop/gateway.yaml) once it serves the API.
    pub async fn through_gateway(mut self, name: &str) -> Result<Self> {
        let edge = Edge::wait(
            &self.reach,
            name,
            "/api/v1/products",
            Duration::from_secs(180),
        )
        .await?;
        self.reach = self.reach.with_edge(edge);
        Ok(self)
    }

    /// The same shop, its every request carrying W3C `baggage` (which the
    /// services pass on to the calls they make, like the trace context).
    pub fn with_baggage(&self, baggage: &str) -> Self {
        let mut shop = self.clone();
        shop.reach = shop.reach.clone().with_header("baggage", baggage);
        shop
    }

    /// The dependency name the order sidecars label `service` with (`product.<ns>`).
    pub fn qualified(&self, service: &str) -> String {
        format!("{service}.{}", self.namespace)
    }

    /// Creates `users` users and `products` products (with plenty of stock)
    /// through the user and product Services (through the gateway, when
    /// the shop goes through one).
    pub async fn seed(&mut self, users: usize, products: usize) -> Result<()> {
        for i in 0..users {
            let rsp = self
                .reach
                .api(
                    http::Method::POST,
                    "user",
                    "/api/v1/users",
                    Some(&json!({
                        "name": format!("Customer {i}"),
                        "email": format!("customer{i}-{}@shop.example", self.run_id),
                        "age": 30 + i,
                    })),
                )
                .await?;
            if rsp.status != 201 {
                bail!("creating a user answered {}: {}", rsp.status, rsp.body);
            }
            self.users
                .push(rsp.json()?["id"].as_i64().context("a user id")?);
        }
        for i in 0..products {
            let rsp = self
                .reach
                .api(
                    http::Method::POST,
                    "product",
                    "/api/v1/products",
                    Some(&json!({
                        "name": format!("Trellis kit {i} ({})", self.run_id),
                        "category": "garden",
                        "price_cents": 1999 + 100 * i as i64,
                        "stock": 1_000_000,
                    })),
                )
                .await?;
            if rsp.status != 201 {
                bail!("creating a product answered {}: {}", rsp.status, rsp.body);
            }
            self.products
                .push(rsp.json()?["id"].as_i64().context("a product id")?);
        }
        Ok(())
    }

    /// Places one order of one unit through the order Service (through the
    /// gateway, signed in as `user`, when the shop goes through one).
    pub async fn order(&self, user: i64, product: i64) -> Result<Reply> {
        let token = match (&self.issuer, self.reach.edge()) {
            (Some(issuer), Some(_)) => Some(issuer.token(&user.to_string())),
            _ => None,
        };
        self.order_as(token.as_deref(), user, product).await
    }

    /// Places one order of one unit for `user`, with `token` as its bearer
    /// token when given (and none otherwise).
    pub async fn order_as(&self, token: Option<&str>, user: i64, product: i64) -> Result<Reply> {
        let reach = match token {
            Some(t) => self
                .reach
                .clone()
                .with_header("authorization", &format!("Bearer {t}")),
            None => self.reach.clone(),
        };
        reach
            .api(
                http::Method::POST,
                "order",
                "/api/v1/orders",
                Some(&json!({ "user_id": user, "items": [{ "product_id": product, "quantity": 1 }] })),
            )
            .await
    }

    /// Places `n` orders, `concurrency` at a time, cycling through the seeded
    /// users and products; every outcome, in order of completion.
    pub async fn orders(&self, n: usize, concurrency: usize) -> Vec<Outcome> {
        let started = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (shop, next) = (self.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return outcomes;
                    }
                    outcomes.push(shop.one_order(i, started).await);
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("an order task"));
        }
        all.sort_by_key(|o| o.at + o.elapsed);
        all
    }

    async fn one_order(&self, i: usize, started: Instant) -> Outcome {
        let user = self.users[i % self.users.len().max(1)];
        let product = self.products[i % self.products.len().max(1)];
        let at = started.elapsed();
        match self.order(user, product).await {
            Ok(r) => Outcome {
                at,
                elapsed: r.elapsed,
                status: r.status,
                breaker: r.body.contains("circuit breaker open"),
                body: r.body,
            },
            Err(e) => Outcome {
                at,
                elapsed: started.elapsed() - at,
                status: 0,
                breaker: false,
                body: format!("{e:#}"),
            },
        }
    }

    /// Orders in the background at about `per_second`, from `workers` tasks,
    /// until [`Load::stop`].
    pub fn load(&self, per_second: f64, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let started = Instant::now();
        let workers = workers.max(1);
        // Each worker keeps its own schedule: one order every `period`.
        let period = Duration::from_secs_f64(workers as f64 / per_second.max(0.1));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (shop, stop, outcomes) = (self.clone(), stop.clone(), outcomes.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                let mut due = Instant::now() + period.mul_f64(w as f64 / workers as f64);
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep_until(due.into()).await;
                    let outcome = shop.one_order(i, started).await;
                    outcomes.lock().unwrap().push(outcome);
                    i += workers;
                    due = (due + period).max(Instant::now());
                }
            }));
        }
        Load {
            stop,
            outcomes,
            tasks,
            started,
        }
    }

    /// The running, not terminating pods of the shop's gateway, oldest first.
    pub async fn gateway_pods(&self) -> Result<Vec<Pod>> {
        self.running_pods(&format!("{GATEWAY_NAME_LABEL}={GATEWAY}"))
            .await
    }

    /// The running, not terminating pods of a service, oldest first.
    pub async fn pods(&self, service: &str) -> Result<Vec<Pod>> {
        self.running_pods(&format!("{NAME_LABEL}={service}")).await
    }

    async fn running_pods(&self, selector: &str) -> Result<Vec<Pod>> {
        running_pods(
            &Api::namespaced(self.client.clone(), &self.namespace),
            selector,
        )
        .await
    }

    /// The uids of a service's running pods, sorted.
    pub async fn pod_uids(&self, service: &str) -> Result<Vec<String>> {
        let mut uids: Vec<String> = self
            .pods(service)
            .await?
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        uids.sort();
        Ok(uids)
    }

    /// Every running pod's sidecar metrics, for each service named.
    pub async fn scrape(&self, services: &[&str]) -> Result<Scrapes> {
        let mut all = Scrapes::new();
        for service in services {
            let mut pods = Vec::new();
            for pod in self.pods(service).await? {
                let rsp = self.reach.pod(&pod, ADMIN_PORT, "/metrics").await?;
                if rsp.status != 200 {
                    bail!(
                        "{}'s sidecar /metrics answered {}: {}",
                        pod.name_any(),
                        rsp.status,
                        rsp.body
                    );
                }
                pods.push(PodMetrics {
                    pod: pod.name_any(),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    metrics: Scrape::parse(&rsp.body),
                });
            }
            all.insert((*service).to_owned(), pods);
        }
        Ok(all)
    }

    /// The state (`closed`, `open`, `half-open`) of each order sidecar's breaker for `dependency`.
    pub async fn breaker_states(&self, dependency: &str) -> Result<Vec<String>> {
        let service = self.qualified(dependency);
        let scrapes = self.scrape(&["order"]).await?;
        Ok(scrapes["order"]
            .iter()
            .map(|p| {
                p.metrics
                    .matching(BREAKER_STATE, &[("service", &service)])
                    .find(|s| s.value == 1.0)
                    .and_then(|s| s.labels.get("state").cloned())
                    // A breaker is created on first use; before, none is reported.
                    .unwrap_or_else(|| "closed".to_owned())
            })
            .collect())
    }

    /// The policy generation of each running pod's sidecar of `service`, by pod uid.
    pub async fn policy_generations(&self, service: &str) -> Result<BTreeMap<String, f64>> {
        Ok(self.scrape(&[service]).await?[service]
            .iter()
            .map(|p| (p.uid.clone(), p.metrics.sum(POLICY_GENERATION, &[])))
            .collect())
    }
}

/// The sum, over a service's pods, of `after - before` (pods matched by uid;
/// a pod new in `after` counts from zero).
pub fn service_delta(before: &Scrapes, after: &Scrapes, service: &str) -> Scrape {
    let empty = Vec::new();
    let old = before.get(service).unwrap_or(&empty);
    let deltas: Vec<Scrape> = after
        .get(service)
        .unwrap_or(&empty)
        .iter()
        .map(|p| {
            let base = old
                .iter()
                .find(|o| o.uid == p.uid)
                .map(|o| o.metrics.clone())
                .unwrap_or_default();
            Scrape::delta(&base, &p.metrics)
        })
        .collect();
    Scrape::merge(&deltas)
}

/// What one order got.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// When it was sent, from the start of its batch or load.
    pub at: Duration,
    /// How long the answer took.
    pub elapsed: Duration,
    /// The status; 0 when no answer came (the error is in `body`).
    pub status: u16,
    /// The body names the product service's circuit breaker as open.
    pub breaker: bool,
    /// The body.
    pub body: String,
}

/// Orders running in the background.
pub struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    /// The outcomes so far.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Time since the load started (the clock of [`Outcome::at`]).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the workers (each finishes its order in flight); every outcome.
    pub async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut all = self.outcomes.lock().unwrap().clone();
        all.sort_by_key(|o| o.at);
        all
    }
}

/// Counts by status: `[(201, 40), (503, 12)]`.
pub fn by_status(outcomes: &[Outcome]) -> Vec<(u16, usize)> {
    let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
    for o in outcomes {
        *counts.entry(o.status).or_default() += 1;
    }
    counts.into_iter().collect()
}

/// The outcomes counted by status, and the body of the first answer of
/// each status other than `expected`: what a failed assertion needs to say.
pub fn unexpected(outcomes: &[Outcome], expected: u16) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let samples: Vec<String> = outcomes
        .iter()
        .filter(|o| o.status != expected && seen.insert(o.status))
        .map(|o| format!("{} at {:.1?}: {}", o.status, o.at, o.body))
        .collect();
    format!(
        "{:?}; first of each: {}",
        by_status(outcomes),
        samples.join(" | ")
    )
}

/// The `q` quantile of the outcomes' latencies.
pub fn latency_quantile(outcomes: &[&Outcome], q: f64) -> Option<Duration> {
    let mut l: Vec<Duration> = outcomes.iter().map(|o| o.elapsed).collect();
    l.sort();
    let i = ((l.len() as f64 * q).ceil() as usize).clamp(1, l.len().max(1)) - 1;
    l.get(i).copied()
}

/// Sends `n` GETs of `path` to a Service one after another; every answer.
pub async fn burst(reach: &Reach, service: &str, path: &str, n: usize) -> Result<Vec<Reply>> {
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        replies.push(
            reach
                .service(http::Method::GET, service, path, None)
                .await?,
        );
    }
    Ok(replies)
}

/// Waits until every running pod of `service` has applied a policy newer than
/// in `before` (policy generations by pod uid, from [`Shop::policy_generations`]).
pub async fn wait_policy_applied(
    shop: &Shop,
    service: &str,
    before: &BTreeMap<String, f64>,
    timeout: Duration,
) -> Result<BTreeMap<String, f64>> {
    let started = Instant::now();
    loop {
        let now = shop.policy_generations(service).await?;
        if !now.is_empty()
            && now
                .iter()
                .all(|(uid, g)| before.get(uid).is_some_and(|b| g > b))
        {
            return Ok(now);
        }
        if started.elapsed() > timeout {
            bail!(
                "{service}'s sidecars did not apply the new policy within {timeout:?}: generations were {before:?}, are {now:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What happened when every product pod was deleted under load.
#[derive(Clone, Debug)]
pub struct Outage {
    /// The pods deleted.
    pub deleted: Vec<String>,
    /// Every order placed, on the load's clock.
    pub outcomes: Vec<Outcome>,
    /// When the pods were deleted, on the load's clock.
    pub deleted_at: Duration,
    /// When an order sidecar was first seen with its product breaker open.
    pub opened_at: Option<Duration>,
    /// When every order sidecar's product breaker was next seen closed.
    pub closed_at: Option<Duration>,
    /// When orders succeeded again ([`Outage::RECOVERED_AFTER`] in a row).
    pub recovered_at: Option<Duration>,
}

impl Outage {
    /// Consecutive successes that count as recovered.
    pub const RECOVERED_AFTER: usize = 10;

    /// The orders answered while the product service was out (after the
    /// deletion, before recovery).
    pub fn during(&self) -> Vec<&Outcome> {
        let end = self.recovered_at.unwrap_or(Duration::MAX);
        self.outcomes
            .iter()
            .filter(|o| o.at >= self.deleted_at && o.at < end)
            .collect()
    }

    /// The orders refused by the open breaker.
    pub fn breaker_refusals(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.breaker).collect()
    }
}

/// Deletes every product pod while orders run at `per_second`, and watches
/// the order sidecars' breakers for product open and close again and the
/// orders succeed again, for at most `timeout`.
pub async fn product_outage(shop: &Shop, per_second: f64, timeout: Duration) -> Result<Outage> {
    let load = shop.load(per_second, 4);
    // A moment of normal traffic first, so the outage has a before.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted: Vec<String> = shop
        .pods("product")
        .await?
        .iter()
        .map(|p| p.name_any())
        .collect();
    let deleted_at = load.elapsed();
    run(kubectl().args([
        "delete",
        "pod",
        "-n",
        &shop.namespace,
        "-l",
        &format!("{NAME_LABEL}=product"),
        // Killed at once, as a crash would: a graceful deletion drains so well
        // (the sidecar finishes in-flight calls, discovery moves on) that no order fails.
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]))?;
    let (mut opened_at, mut closed_at, mut recovered_at) = (None, None, None);
    let started = Instant::now();
    while started.elapsed() < timeout {
        let states = shop.breaker_states("product").await.unwrap_or_default();
        let now = load.elapsed();
        if opened_at.is_none() && states.iter().any(|s| s == "open") {
            opened_at = Some(now);
        }
        if opened_at.is_some() && closed_at.is_none() && states.iter().all(|s| s == "closed") {
            closed_at = Some(now);
        }
        if recovered_at.is_none() {
            recovered_at = recovery(&load.outcomes(), deleted_at);
        }
        if recovered_at.is_some()
            && (closed_at.is_some()
                || opened_at.is_none() && started.elapsed() > Duration::from_secs(5))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little more traffic after recovery, so the table shows it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcomes = load.stop().await;
    Ok(Outage {
        deleted,
        recovered_at: recovery(&outcomes, deleted_at),
        outcomes,
        deleted_at,
        opened_at,
        closed_at,
    })
}

/// The start of the first run of [`Outage::RECOVERED_AFTER`] successes after
/// a failure that came after `after`.
fn recovery(outcomes: &[Outcome], after: Duration) -> Option<Duration> {
    let mut sorted: Vec<&Outcome> = outcomes.iter().filter(|o| o.at >= after).collect();
    sorted.sort_by_key(|o| o.at);
    let first_failure = sorted.iter().position(|o| o.status != 201)?;
    let mut run_start = None;
    let mut run = 0;
    for o in &sorted[first_failure..] {
        if o.status == 201 {
            run_start.get_or_insert(o.at);
            run += 1;
            if run >= Outage::RECOVERED_AFTER {
                return run_start;
            }
        } else {
            run = 0;
            run_start = None;
        }
    }
    None
}
