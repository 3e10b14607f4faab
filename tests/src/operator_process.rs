//! The real `trellis-operator` binary as a child process, for the tests that
//! kill it, cut its API connection or run two replicas of it
//! (tests/tests/control_plane_faults.rs, tests/tests/operator_watch.rs).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{binaries::built, eventually, free_port};

/// The operator binary, built once per test binary.
pub fn operator_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("trellis-operator", "trellis-operator"))
}

/// A `trellis-operator` process watching one namespace, killed on drop.
pub struct OperatorProcess {
    child: Child,
    admin: String,
    log: PathBuf,
}

impl OperatorProcess {
    /// Starts the binary for namespace `ns` as `identity`, talking to the
    /// cluster in `kubeconfig`, with its admin server on a free loopback port
    /// and its log in a temporary file; `extra` arguments are appended.
    pub fn start(ns: &str, identity: &str, kubeconfig: &Path, extra: &[&str]) -> Self {
        let admin = format!("127.0.0.1:{}", free_port([127, 0, 0, 1]));
        let log = std::env::temp_dir().join(format!("trellis-operator-{ns}-{identity}.log"));
        let file = fs::File::create(&log).unwrap();
        let child = Command::new(operator_binary())
            .args(["--watch-namespace", ns, "--lease-namespace", ns])
            .args(["--identity", identity, "--metrics-addr", &admin])
            .args(["--log-format", "json"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting trellis-operator");
        Self { child, admin, log }
    }

    /// GET on the admin server: the status code and the body.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&self.admin))
            .await
            .ok()?
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: operator\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut text))
            .await
            .ok()?
            .ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_owned();
        Some((code, body))
    }

    /// The operator's metrics, once its admin server answers.
    pub async fn metrics(&self) -> OperatorMetrics {
        let text = eventually("the operator's /metrics", Duration::from_secs(30), || {
            self.get("/metrics")
        })
        .await
        .1;
        OperatorMetrics(text)
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL, as the kernel's OOM killer or a node failure would.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("operator log: {}", self.log.display());
    }
}

/// A scrape of the operator's /metrics.
pub struct OperatorMetrics(pub String);

impl OperatorMetrics {
    /// The sum of every series of `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Reconciles started.
    pub fn reconciles(&self) -> f64 {
        self.sum("trellis_operator_reconciles_total")
    }

    /// Reconciles that failed.
    pub fn errors(&self) -> f64 {
        self.sum("trellis_operator_reconcile_errors_total")
    }

    /// 1 while this replica leads.
    pub fn leader(&self) -> f64 {
        self.sum("trellis_operator_leader")
    }
}
