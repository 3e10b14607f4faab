//! Test support: a cluster, a client and a fresh namespace for each integration test.
//!
//! ```no_run
//! # async fn example() {
//! let ns = trellis_tests::TestNamespace::new("operator").await;
//! // ns.client is a kube::Client for the local cluster; ns.name a namespace of its own,
//! // labelled to enforce the restricted Pod Security Standard. It is deleted on drop.
//! # }
//! ```
//!
//! The cluster is the one `cargo xtask cluster up` starts (its admin kubeconfig is
//! found through `KUBECONFIG` or at the cluster's default path). When none runs,
//! the first test starts one (`--control-plane-only` for [`TestNamespace::new`],
//! the whole node for [`TestNamespace::on_node`]), so a single test can be run
//! with plain `cargo test -- --ignored`.

pub mod binaries;
pub mod callers;
pub mod collector;
pub mod convergence;
pub mod issuer;
pub mod node_peers;
pub mod operator;
pub mod operator_process;
pub mod port_forward;
pub mod relay;
pub mod shop;
pub mod shop_metrics;
pub mod wire;

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// The label every test namespace carries, so leftovers are easy to find.
pub const TEST_LABEL: &str = "trellis.dev/test";

/// The admin kubeconfig of the local cluster.
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("TRELLIS_CLUSTER_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/var/lib/trellis/cluster".into())
                .join("admin.kubeconfig")
        })
}

/// Which modes this test binary has made sure of (control plane, node): each
/// `cargo xtask cluster up` runs at most once per binary, not once per test.
static ENSURED: Mutex<[bool; 2]> = Mutex::new([false; 2]);

/// Makes sure a cluster runs: `cargo xtask cluster up [--control-plane-only]`
/// (idempotent, so it is cheap when one runs already).
pub fn ensure_cluster(node: bool) {
    let mut ensured = ENSURED.lock().unwrap_or_else(|e| e.into_inner());
    // On kind (`cargo xtask e2e --kind`) the cluster is the user's, in KUBECONFIG.
    if ensured[usize::from(node)] || std::env::var_os("TRELLIS_E2E_KIND").is_some() {
        return;
    }
    let workspace = crate::shop::workspace();
    let mut cmd = crate::cargo();
    cmd.current_dir(&workspace).args(["xtask", "cluster", "up"]);
    if !node {
        cmd.arg("--control-plane-only");
    }
    let status = cmd.status().expect("running cargo xtask cluster up");
    assert!(
        status.success(),
        "could not start the local cluster (see the output above)"
    );
    ensured[usize::from(node)] = true;
    if node {
        ensured[0] = true;
    }
}

/// A binary from the tools cache (`cargo xtask tools` builds it): the newest
/// complete `<tool>-<version>-<key>/<binary>`.
pub fn cached_tool(tool: &str, binary: &str) -> PathBuf {
    let cache = std::env::var_os("TRELLIS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/trellis")
        });
    std::fs::read_dir(cache.join("bin"))
        .expect("the tools cache (cargo xtask tools builds it)")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{tool}-")))
                && p.join(".complete").exists()
        })
        .max()
        .unwrap_or_else(|| panic!("no built {tool} in the tools cache: run cargo xtask tools"))
        .join(binary)
}

/// A tool from the cache when `cargo xtask tools` built it, else the one on `PATH`
/// (a kind user's own kubectl and helm: `cargo xtask e2e --kind`).
fn cached_or_path(tool: &str, binary: &str) -> PathBuf {
    if std::env::var_os("TRELLIS_E2E_KIND").is_some() {
        return binary.into();
    }
    cached_tool(tool, binary)
}

/// `kubectl` from the tools cache, pointed at the local cluster (for what users see:
/// `kubectl describe`, `kubectl wait`).
pub fn kubectl() -> Command {
    let mut cmd = Command::new(cached_or_path("kubernetes", "kubectl"));
    cmd.arg("--kubeconfig").arg(kubeconfig_path());
    cmd
}

/// `helm` from the tools cache, pointed at the local cluster.
pub fn helm() -> Command {
    let mut cmd = Command::new(cached_or_path("helm", "helm"));
    cmd.arg("--kubeconfig").arg(kubeconfig_path());
    cmd
}

/// A kube client for the local cluster. Like every kube client by default,
/// it retries the API's 429, 503 and 504 answers with backoff.
pub async fn client() -> Client {
    Client::try_from(config().await).expect("a kube client")
}

/// A kube client that never retries: for requests whose answer the test is
/// about, such as an app's 503 or 429 through the apiserver's service proxy,
/// which kube's default retry policy would otherwise hide by retrying until
/// it succeeds (or for over a minute).
pub async fn client_without_retries() -> Client {
    let mut config = config().await;
    config.default_retry = false;
    Client::try_from(config).expect("a kube client")
}

async fn config() -> Config {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}; is the cluster up?", path.display()));
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig")
}

/// A namespace of the test's own, deleted (with everything in it) when dropped.
pub struct TestNamespace {
    /// A client for the local cluster.
    pub client: Client,
    /// The namespace's name: the prefix and a random suffix.
    pub name: String,
}

impl TestNamespace {
    /// A fresh namespace on a cluster with at least the control plane.
    pub async fn new(prefix: &str) -> Self {
        Self::create(prefix, false).await
    }

    /// A fresh namespace on the full node (pods run).
    pub async fn on_node(prefix: &str) -> Self {
        Self::create(prefix, true).await
    }

    async fn create(prefix: &str, node: bool) -> Self {
        let _ = tokio::task::spawn_blocking(move || ensure_cluster(node)).await;
        let client = client().await;
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": {
                    TEST_LABEL: "true",
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            }
        }))
        .expect("a namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        // Pods are refused until the controller-manager has made the namespace's
        // `default` ServiceAccount; wait for it, as kubectl users implicitly do.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        eventually(
            &format!("the default ServiceAccount in {name}"),
            Duration::from_secs(30),
            || async { accounts.get_opt("default").await.ok().flatten() },
        )
        .await;
        Self { client, name }
    }

    /// An `Api` for a namespaced kind in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("TRELLIS_KEEP_NAMESPACES").is_some() {
            eprintln!(
                "keeping namespace {} (TRELLIS_KEEP_NAMESPACES is set)",
                self.name
            );
            return;
        }
        let name = self.name.clone();
        // Drop cannot await, and may run inside a runtime: delete from a thread of its own.
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let api = Api::<Namespace>::all(client().await);
                api.delete(&name, &DeleteParams::background()).await.ok()
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(_))) {
            eprintln!("could not delete test namespace {}", self.name);
        }
    }
}

/// A free port on `host`: bound by the OS, then released.
pub fn free_port(host: [u8; 4]) -> u16 {
    TcpListener::bind(SocketAddr::from((host, 0)))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `check` until it returns `Some`, or panics after `timeout` saying what it waited for.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `cargo`, without the variables cargo set for this test binary
/// (`CARGO_PKG_NAME=trellis-tests`, `CARGO_MANIFEST_DIR`, ...). Build
/// scripts such as ring's rerun when those change, so a nested cargo that
/// kept them would rebuild ring, rustls and kube for every test target, and
/// the next outer cargo would rebuild them back (xtask's `run::cargo` does
/// the same on its side).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    let per_package = |name: &str| {
        name == "OUT_DIR"
            || name == "CARGO_PRIMARY_PACKAGE"
            || name == "CARGO_TARGET_TMPDIR"
            || [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_CFG_",
            ]
            .iter()
            .any(|p| name.starts_with(p))
    };
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(per_package) {
            cmd.env_remove(name);
        }
    }
    cmd
}
