//! The proxies under test, two of each on loopback: A (the caller's outbound
//! proxy) forwards to B (the callee's inbound proxy), which forwards to the
//! upstream. Each is given two threads or workers, as many as the machine
//! has cores, and keeps connections to the next hop alive.

use std::{
    fmt, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Procs, free_addr, h1, loadgen, process_tree};

/// The application protocol of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 with keep-alive on every hop.
    Http1,
    /// gRPC: HTTP/2 with prior knowledge (h2c) on every hop.
    Grpc,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::Grpc => "gRPC (h2c)",
        })
    }
}

/// Who forwards the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No proxy: the generator talks to the upstream.
    Direct,
    Haproxy,
    Nginx,
    Trellis,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Direct, Kind::Haproxy, Kind::Nginx, Kind::Trellis];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::Trellis => "trellis",
        }
    }
}

/// A running pair (or nothing, for [`Kind::Direct`]).
pub struct Pair {
    /// Where the generator sends: A's listener, or the upstream.
    pub front: SocketAddr,
    /// The root pid of A and of B (nginx's masters).
    roots: Vec<u32>,
    _procs: Procs,
}

impl Pair {
    /// The pids of each instance, workers included, as of now.
    pub fn instances(&self) -> Vec<Vec<u32>> {
        self.roots.iter().map(|&r| process_tree(r)).collect()
    }

    /// Every pid of both instances.
    pub fn all_pids(&self) -> Vec<u32> {
        self.instances().concat()
    }
}

/// What starting a pair needs.
pub struct Setup<'a> {
    pub dir: &'a Path,
    pub sidecar: &'a Path,
    pub upstream: SocketAddr,
    /// An HTTP upstream that answers `/health`: the Trellis A sidecar's own app.
    pub http_app: SocketAddr,
    pub otlp: SocketAddr,
    /// A command to run each sidecar under (a profiler), split on spaces.
    pub wrapper: Option<&'a str>,
}

pub fn start(kind: Kind, proto: Proto, s: &Setup) -> Result<Pair> {
    let mut procs = Procs::default();
    let tag = format!(
        "{}-{}",
        kind.name(),
        if proto == Proto::Http1 { "h1" } else { "grpc" }
    );
    let (front, roots) = match kind {
        Kind::Direct => (s.upstream, vec![]),
        Kind::Haproxy => {
            let (a, b) = (free_addr()?, free_addr()?);
            let pb = haproxy(&mut procs, s.dir, &format!("{tag}-b"), proto, b, s.upstream)?;
            let pa = haproxy(&mut procs, s.dir, &format!("{tag}-a"), proto, a, b)?;
            (a, vec![pa, pb])
        }
        Kind::Nginx => {
            let (a, b) = (free_addr()?, free_addr()?);
            let pb = nginx(&mut procs, s.dir, &format!("{tag}-b"), proto, b, s.upstream)?;
            let pa = nginx(&mut procs, s.dir, &format!("{tag}-a"), proto, a, b)?;
            (a, vec![pa, pb])
        }
        Kind::Trellis => {
            let b = trellis(&mut procs, s, &format!("{tag}-b"), proto, None)?;
            let a = trellis(&mut procs, s, &format!("{tag}-a"), proto, Some(b.inbound))?;
            for sc in [&a, &b] {
                sc.wait_ready(&mut procs)?;
            }
            (a.outbound, vec![a.pid, b.pid])
        }
    };
    let pair = Pair {
        front,
        roots,
        _procs: procs,
    };
    wait_serving(proto, front).with_context(|| format!("{tag} does not forward requests"))?;
    Ok(pair)
}

/// Retries one request through the pair until it succeeds (20 s at most).
fn wait_serving(proto: Proto, front: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = match proto {
            Proto::Http1 => h1::http_get(front, loadgen::SERVICE, "/").and_then(|(s, b)| {
                if s == 200 {
                    Ok(())
                } else {
                    bail!("status {s}: {b}")
                }
            }),
            Proto::Grpc => loadgen::grpc_probe(front),
        };
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn haproxy(
    procs: &mut Procs,
    dir: &Path,
    name: &str,
    proto: Proto,
    listen: SocketAddr,
    next: SocketAddr,
) -> Result<u32> {
    let h2 = if proto == Proto::Grpc {
        " proto h2"
    } else {
        ""
    };
    // Keep-alive to the client is HAProxy's default (http-keep-alive);
    // `http-reuse always` shares idle server connections between clients.
    let config = format!(
        "global\n\
         \tnbthread 2\n\
         \tmaxconn 4096\n\
         defaults\n\
         \tmode http\n\
         \ttimeout connect 1s\n\
         \ttimeout client 30s\n\
         \ttimeout server 30s\n\
         \thttp-reuse always\n\
         frontend fe\n\
         \tbind {listen}{h2}\n\
         \tdefault_backend be\n\
         backend be\n\
         \tserver next {next}{h2}\n"
    );
    let path = dir.join(format!("{name}.haproxy.cfg"));
    fs::write(&path, config)?;
    let log = dir.join(format!("{name}.log"));
    procs.spawn(
        name,
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
        &log,
    )
}

fn nginx(
    procs: &mut Procs,
    dir: &Path,
    name: &str,
    proto: Proto,
    listen: SocketAddr,
    next: SocketAddr,
) -> Result<u32> {
    let prefix = dir.join(name);
    fs::create_dir_all(&prefix)?;
    let location = match proto {
        Proto::Http1 => {
            "proxy_pass http://next;\n\
             \t\t\tproxy_http_version 1.1;\n\
             \t\t\tproxy_set_header Connection \"\";"
        }
        Proto::Grpc => "grpc_pass grpc://next;",
    };
    let h2 = if proto == Proto::Grpc { " http2" } else { "" };
    let config = format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 2;\n\
         pid {prefix}/nginx.pid;\n\
         error_log {prefix}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \taccess_log off;\n\
         \tclient_body_temp_path {prefix};\n\
         \tproxy_temp_path {prefix};\n\
         \tkeepalive_requests 1000000;\n\
         \tupstream next {{\n\
         \t\tserver {next};\n\
         \t\tkeepalive 256;\n\
         \t\tkeepalive_requests 1000000;\n\
         \t}}\n\
         \tserver {{\n\
         \t\tlisten {listen}{h2};\n\
         \t\tlocation / {{\n\
         \t\t\t{location}\n\
         \t\t}}\n\
         \t}}\n\
         }}\n",
        prefix = prefix.display(),
    );
    let path = dir.join(format!("{name}.nginx.conf"));
    fs::write(&path, config)?;
    let log = dir.join(format!("{name}.log"));
    procs.spawn(
        name,
        Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .arg("-c")
            .arg(&path),
        &log,
    )
}

struct Sidecar {
    name: String,
    pid: u32,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

/// A release sidecar in static mode with a realistic policy: retries with a
/// budget, a circuit breaker, metrics (always on), tracing at 1 % sampling
/// exported to the loopback sink. `dependency` makes it the caller (A).
fn trellis(
    procs: &mut Procs,
    s: &Setup,
    name: &str,
    proto: Proto,
    dependency: Option<SocketAddr>,
) -> Result<Sidecar> {
    let (inbound, outbound, admin) = (free_addr()?, free_addr()?, free_addr()?);
    let resilience = serde_json::json!({
        "timeout": "2s",
        "perTryTimeout": "1s",
        "retry": {
            "attempts": 3,
            "retryOn": ["connect-failure", "5xx"],
            "backoff": {"base": "25ms", "max": "250ms"},
            "budget": {"ratio": 0.2, "minPerSecond": 10}
        },
        "circuitBreaker": {"consecutiveFailures": 5, "failureRatio": 0.5, "minRequests": 20}
    });
    // B serves the upstream; A's own application is the HTTP upstream (only so
    // its health check passes) and its one dependency is B.
    let (app, protocol) = match (dependency, proto) {
        (Some(_), _) => (s.http_app, "HTTP"),
        (None, Proto::Http1) => (s.upstream, "HTTP"),
        (None, Proto::Grpc) => (s.upstream, "GRPC"),
    };
    let mut policy = serde_json::json!({
        "service": if dependency.is_some() { "bench-client" } else { loadgen::SERVICE },
        "namespace": "default",
        "appPort": app.port(),
        "protocol": protocol,
        "health": {"path": "/health", "interval": "1s"},
        "resilience": resilience,
        "inbound": {"maxConcurrent": 4096, "timeout": "10s"},
        "tracing": {"sampleRatio": 0.01},
    });
    if dependency.is_some() {
        policy["dependencies"] = serde_json::json!([{ "name": loadgen::SERVICE }]);
    }
    let policy_path = s.dir.join(format!("{name}.policy.json"));
    fs::write(&policy_path, policy.to_string())?;
    let log = s.dir.join(format!("{name}.log"));
    let endpoints = dependency.unwrap_or(app);
    let mut words = s.wrapper.unwrap_or("").split_whitespace();
    let mut cmd = match words.next() {
        Some(w) => {
            let mut c = Command::new(w);
            c.args(words).arg(s.sidecar);
            c
        }
        None => Command::new(s.sidecar),
    };
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", s.otlp))
        .env("OTEL_SERVICE_NAME", name)
        .args(["--inbound-addr", &inbound.to_string()])
        .args(["--outbound-addr", &outbound.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .arg("--policy-file")
        .arg(&policy_path)
        .args(["--log", "warn"])
        .args([
            "--static-endpoints",
            &format!("{}={endpoints}", loadgen::SERVICE),
        ]);
    let pid = procs.spawn(name, &mut cmd, &log)?;
    Ok(Sidecar {
        name: name.to_owned(),
        pid,
        inbound,
        outbound,
        admin,
        log,
    })
}

impl Sidecar {
    fn wait_ready(&self, procs: &mut Procs) -> Result<()> {
        // Generous: under a profiler the sidecar starts many times slower.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = procs.exited(&self.name) {
                bail!(
                    "sidecar {} exited ({status}): {}",
                    self.name,
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if h1::http_get(self.admin, "admin", "/readyz").is_ok_and(|(s, _)| s == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let why = h1::http_get(self.admin, "admin", "/healthz")
                    .map(|(_, b)| b)
                    .unwrap_or_default();
                bail!("sidecar {} not ready within 60 s: {why}", self.name);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}
