//! The proxies under test, two of each on loopback: A (the caller's outbound
//! proxy) forwards to B (the callee's inbound proxy), which forwards to the
//! upstream. Each is given two threads or workers, as many as the machine
//! has cores, and keeps connections to the next hop alive.
//!
//! `trellis-mtls` and `haproxy-tls` are the same pairs with mutual TLS 1.3
//! between A and B (certificates from one root, ECDSA P-256 keys on both);
//! the generator's hop and the upstream's stay plaintext.

use std::{
    fmt, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Procs, free_addr, h1, loadgen, mesh::Mesh, process_tree};
use xtask::run;

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
    /// HAProxy with mutual TLS between A and B.
    HaproxyTls,
    /// Trellis with mesh identities: A calls B over mutual TLS, and B's
    /// inbound is Strict (the default), so it serves nothing else.
    TrellisMtls,
    /// Two of the smallest proxies hyper, hyper-util and tokio make
    /// ([`crate::floor`]): what the sidecar's building blocks cost before
    /// any policy. Runs only when named (`--only hyper-floor`).
    HyperFloor,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Direct,
        Kind::Haproxy,
        Kind::Nginx,
        Kind::Trellis,
        Kind::HaproxyTls,
        Kind::TrellisMtls,
        Kind::HyperFloor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::Trellis => "trellis",
            Kind::HaproxyTls => "haproxy-tls",
            Kind::TrellisMtls => "trellis-mtls",
            Kind::HyperFloor => "hyper-floor",
        }
    }

    /// A pair of Trellis sidecars (spans to count, a binary to build).
    pub fn is_trellis(self) -> bool {
        matches!(self, Kind::Trellis | Kind::TrellisMtls)
    }

    /// Mutual TLS between A and B: needs the run's [`Mesh`].
    pub fn is_mtls(self) -> bool {
        matches!(self, Kind::HaproxyTls | Kind::TrellisMtls)
    }
}

/// How a Trellis pair traces: the sample ratio, and whether the OTLP
/// endpoint is the bench's sink (collector up) or a closed loopback port
/// (collector down).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tracing {
    pub ratio: f64,
    pub collector_down: bool,
}

impl Tracing {
    /// The realistic policy of every Trellis row: 1 %, exported to the sink.
    pub const REALISTIC: Tracing = Tracing {
        ratio: 0.01,
        collector_down: false,
    };

    /// A short label: `1% sampled, collector up`.
    pub fn label(self) -> String {
        format!(
            "{}% sampled, collector {}",
            self.ratio * 100.0,
            if self.collector_down { "down" } else { "up" }
        )
    }
}

/// A running pair (or nothing, for [`Kind::Direct`]).
pub struct Pair {
    /// Where the generator sends: A's listener, or the upstream.
    pub front: SocketAddr,
    /// The root pid of A and of B (nginx's masters).
    roots: Vec<u32>,
    /// Trellis only: A and B.
    sidecars: Vec<Sidecar>,
    /// Under `--callgrind`: A and B (Trellis sidecars or HAProxies), each
    /// with its `--callgrind-out-file` prefix (before `.<pid>`).
    profiled: Vec<(u32, PathBuf)>,
    /// Dumps of the profiled proxies so far: callgrind numbers each
    /// process's dump files from 1.
    dumps: std::cell::Cell<u32>,
    kind: Kind,
    _procs: Procs,
}

impl Pair {
    /// The pids of each instance, workers included, as of now.
    pub fn instances(&self) -> Vec<Vec<u32>> {
        self.roots.iter().map(|&r| process_tree(r)).collect()
    }

    /// Under `--callgrind`: zeroes the proxies' instruction counts, so the
    /// next dump holds only what follows (the load, not the start-up).
    pub fn callgrind_zero(&self) -> Result<()> {
        for (pid, _) in &self.profiled {
            run::output(Command::new("callgrind_control").args(["-z", &pid.to_string()]))?;
        }
        Ok(())
    }

    /// Under `--callgrind`: dumps each proxy's profile since the last
    /// zeroing or dump and returns the instructions it executed (A, B) and
    /// the files.
    pub fn callgrind_dump(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        let dump = self.dumps.get() + 1;
        self.dumps.set(dump);
        for (pid, prefix) in &self.profiled {
            run::output(Command::new("callgrind_control").args(["-d", &pid.to_string()]))?;
            // Dump n of a process goes to `<out-file>.n`.
            let file = PathBuf::from(format!("{}.{pid}.{dump}", prefix.display()));
            let deadline = Instant::now() + Duration::from_secs(30);
            let total = loop {
                let text = fs::read_to_string(&file).unwrap_or_default();
                if let Some(n) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("totals:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                {
                    break n;
                }
                if Instant::now() > deadline {
                    bail!("no callgrind totals in {}", file.display());
                }
                thread::sleep(Duration::from_millis(100));
            };
            out.push((total, file));
        }
        Ok(out)
    }

    /// `trellis-mtls`: the mutual-TLS connections B has accepted from A so
    /// far (each a handshake), from B's `/status`; `None` for other setups.
    pub fn mtls_connections(&self) -> Option<u64> {
        if self.kind != Kind::TrellisMtls {
            return None;
        }
        let b = self.sidecars.get(1)?;
        let (_, text) = h1::http_get(b.admin, "admin", "/status").ok()?;
        let status: serde_json::Value = serde_json::from_str(&text).ok()?;
        status["mesh"]["peersSeen"][Mesh::spiffe_id(CLIENT_ACCOUNT)].as_u64()
    }

    /// `trellis-mtls`: B's `/status` must show A's identity among the mesh
    /// peers that called in, i.e. the request just forwarded rode mutual
    /// TLS with A's certificate; and B must not accept plaintext (Strict).
    fn check_mutual_tls(&self) -> Result<()> {
        let [a, b] = &self.sidecars[..] else {
            bail!("expected two sidecars");
        };
        let expected = Mesh::spiffe_id(CLIENT_ACCOUNT);
        let (code, text) = h1::http_get(b.admin, "admin", "/status")?;
        let status: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("B's /status ({code}) is not JSON: {text}"))?;
        let mesh = &status["mesh"];
        if mesh["peersSeen"][&expected].as_u64().unwrap_or(0) == 0 {
            bail!(
                "B ({}) has not seen {expected} as a peer: mesh status {mesh}",
                b.name
            );
        }
        if mesh["identity"] != Mesh::spiffe_id(loadgen::SERVICE) {
            bail!(
                "B ({}) is not certified as expected: mesh status {mesh}",
                b.name
            );
        }
        let (_, a_status) = h1::http_get(a.admin, "admin", "/status")?;
        let a_status: serde_json::Value = serde_json::from_str(&a_status)?;
        if a_status["mesh"]["identity"] != expected {
            bail!(
                "A ({}) is not certified as expected: {}",
                a.name,
                a_status["mesh"]
            );
        }
        Ok(())
    }

    /// Trellis only: the spans both sidecars counted as exported, dropped
    /// and failed (`trellis_trace_spans_total`), from their `/metrics`.
    pub fn trace_spans(&self) -> [u64; 3] {
        let mut n = [0; 3];
        for sc in &self.sidecars {
            let text = h1::http_get(sc.admin, "admin", "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            for line in text.lines() {
                let Some(rest) = line.strip_prefix("trellis_trace_spans_total{outcome=\"") else {
                    continue;
                };
                let Some((outcome, value)) = rest.split_once("\"} ") else {
                    continue;
                };
                let i = match outcome {
                    "exported" => 0,
                    "dropped" => 1,
                    "failed" => 2,
                    _ => continue,
                };
                n[i] += value.trim().parse::<f64>().unwrap_or(0.0) as u64;
            }
        }
        n
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
    /// Run each sidecar under callgrind, its profiles in this directory.
    pub callgrind: Option<&'a Path>,
    /// How the Trellis pair traces.
    pub tracing: Tracing,
    /// The root and identity service of the mutual-TLS setups (started
    /// only when one of them runs).
    pub mesh: Option<&'a Mesh>,
    /// More environment for each Trellis sidecar (`KEY=VALUE`).
    pub sidecar_env: &'a [String],
}

/// Starts a pair, up to three times: a port [`free_addr`] handed out can
/// be taken before the proxy binds it (by an outgoing connection's
/// ephemeral port, such as a sidecar's call to the identity service, or by
/// whatever else runs on the machine), and that says nothing about the
/// proxy. A failure that is the proxy's fails all three.
pub fn start(kind: Kind, proto: Proto, s: &Setup) -> Result<Pair> {
    start_with_retries(kind.name(), || start_once(kind, proto, s))
}

/// `start` tried up to three times, saying why before each new try.
pub fn start_with_retries<T>(name: &str, mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match start() {
            Ok(started) => return Ok(started),
            Err(e) if attempt < 3 => {
                // The first lines say why; a sidecar's whole log follows.
                let why: String = format!("{e:#}").chars().take(400).collect();
                eprintln!("   {name} did not start ({why}); starting it again");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn start_once(kind: Kind, proto: Proto, s: &Setup) -> Result<Pair> {
    let mut procs = Procs::default();
    let tag = format!(
        "{}-{}",
        kind.name(),
        if proto == Proto::Http1 { "h1" } else { "grpc" }
    );
    let mut sidecars = Vec::new();
    let mut profiled = Vec::new();
    let (front, roots) = match kind {
        Kind::Direct => (s.upstream, vec![]),
        Kind::Haproxy | Kind::HaproxyTls => {
            let (a, b) = (free_addr()?, free_addr()?);
            let tls = match kind {
                Kind::HaproxyTls => Some(haproxy_tls(s, &tag)?),
                _ => None,
            };
            // B's listener and A's server line are the two ends of the TLS hop.
            let (b_listener, a_server) = match &tls {
                Some((b_tls, a_tls)) => (Some(b_tls), Some(a_tls)),
                None => (None, None),
            };
            let (name_a, name_b) = (format!("{tag}-a"), format!("{tag}-b"));
            let profile = |name: &str| s.callgrind.map(|d| d.join(name));
            let config_b = haproxy(proto, (b, b_listener), (s.upstream, None));
            let pb = spawn_haproxy(&mut procs, s.dir, &name_b, &config_b, profile(&name_b))?;
            let config_a = haproxy(proto, (a, None), (b, a_server));
            let pa = spawn_haproxy(&mut procs, s.dir, &name_a, &config_a, profile(&name_a))?;
            profiled.extend(
                [(pa, profile(&name_a)), (pb, profile(&name_b))]
                    .into_iter()
                    .filter_map(|(pid, prefix)| Some((pid, prefix?))),
            );
            (a, vec![pa, pb])
        }
        Kind::HyperFloor => {
            let (a, b) = (free_addr()?, free_addr()?);
            let (name_a, name_b) = (format!("{tag}-a"), format!("{tag}-b"));
            let profile = |name: &str| s.callgrind.map(|d| d.join(name));
            let pb = floor_proxy(
                &mut procs,
                s.dir,
                &name_b,
                proto,
                (b, s.upstream),
                profile(&name_b),
            )?;
            let pa = floor_proxy(&mut procs, s.dir, &name_a, proto, (a, b), profile(&name_a))?;
            profiled.extend(
                [(pa, profile(&name_a)), (pb, profile(&name_b))]
                    .into_iter()
                    .filter_map(|(pid, prefix)| Some((pid, prefix?))),
            );
            (a, vec![pa, pb])
        }
        Kind::Nginx => {
            let (a, b) = (free_addr()?, free_addr()?);
            let pb = nginx(&mut procs, s.dir, &format!("{tag}-b"), proto, b, s.upstream)?;
            let pa = nginx(&mut procs, s.dir, &format!("{tag}-a"), proto, a, b)?;
            (a, vec![pa, pb])
        }
        Kind::Trellis | Kind::TrellisMtls => {
            let mesh = match kind {
                Kind::TrellisMtls => Some(s.mesh.context("trellis-mtls needs the bench's mesh")?),
                _ => None,
            };
            let b = trellis(&mut procs, s, &format!("{tag}-b"), proto, None, mesh)?;
            let a = trellis(
                &mut procs,
                s,
                &format!("{tag}-a"),
                proto,
                Some(b.inbound),
                mesh,
            )?;
            for sc in [&a, &b] {
                sc.wait_ready(&mut procs)?;
            }
            let front = (a.outbound, vec![a.pid, b.pid]);
            profiled.extend(
                [&a, &b]
                    .into_iter()
                    .filter_map(|sc| Some((sc.pid, sc.callgrind.clone()?))),
            );
            sidecars = vec![a, b];
            front
        }
    };
    let pair = Pair {
        front,
        roots,
        sidecars,
        profiled,
        dumps: Default::default(),
        kind,
        _procs: procs,
    };
    wait_serving(proto, front).with_context(|| format!("{tag} does not forward requests"))?;
    if kind == Kind::TrellisMtls {
        pair.check_mutual_tls()
            .with_context(|| format!("{tag}: the A → B hop is not mutual TLS"))?;
    }
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

/// One side of a TLS hop between HAProxy A and B: this instance's
/// certificate and key (one PEM file) and the root it checks the peer with.
struct HaproxyTls {
    crt: PathBuf,
    ca: PathBuf,
}

/// The ServiceAccount (and DNS) name in HAProxy B's certificate, which A
/// checks it against (`verifyhost`).
const HAPROXY_B: &str = "haproxy-b";

/// Certificates for a `haproxy-tls` pair: B's (the server side) and A's
/// (the client side), both from the run's root.
fn haproxy_tls(s: &Setup, tag: &str) -> Result<(HaproxyTls, HaproxyTls)> {
    let mesh = s.mesh.context("haproxy-tls needs the bench's mesh")?;
    let dir = s.dir.join(format!("{tag}-certs"));
    fs::create_dir_all(&dir)?;
    let (b_crt, ca) = mesh.haproxy_pems(&dir, HAPROXY_B)?;
    let (a_crt, _) = mesh.haproxy_pems(&dir, "haproxy-a")?;
    Ok((
        HaproxyTls {
            crt: b_crt,
            ca: ca.clone(),
        },
        HaproxyTls { crt: a_crt, ca },
    ))
}

/// The configuration of an HAProxy instance listening on `listen.0` and
/// forwarding to `next.0`; with a [`HaproxyTls`] beside either, that hop is
/// mutual TLS 1.3: the listener requires a client certificate from the
/// root, the server line presents its own and checks the server's name.
fn haproxy(
    proto: Proto,
    (listen, tls_in): (SocketAddr, Option<&HaproxyTls>),
    (next, tls_out): (SocketAddr, Option<&HaproxyTls>),
) -> String {
    let h2 = if proto == Proto::Grpc {
        " proto h2"
    } else {
        ""
    };
    // Over TLS the protocol is chosen by ALPN instead of `proto h2`: the
    // listener offers both (like the Trellis inbound), the client asks for
    // the one it speaks (like the Trellis client: h2 for gRPC, else
    // http/1.1). No SNI on the server line (the Trellis client sends none
    // either); `verifyhost` checks B's name without it.
    let bind = match tls_in {
        None => format!("{listen}{h2}"),
        Some(t) => format!(
            "{listen} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3 alpn h2,http/1.1",
            t.crt.display(),
            t.ca.display()
        ),
    };
    let server = match tls_out {
        None => format!("{next}{h2}"),
        Some(t) => format!(
            "{next} ssl crt {} ca-file {} verify required verifyhost {HAPROXY_B} ssl-min-ver TLSv1.3 alpn {}",
            t.crt.display(),
            t.ca.display(),
            if proto == Proto::Grpc {
                "h2"
            } else {
                "http/1.1"
            }
        ),
    };
    format!(
        "{}\
         frontend fe\n\
         \tbind {bind}\n\
         \tdefault_backend be\n\
         backend be\n\
         \tserver next {server}\n",
        haproxy_preamble()
    )
}

/// The `global` and `defaults` sections of every HAProxy instance the
/// benches start: two threads (as many as the machine has cores, like
/// nginx's two workers and the sidecar's runtime), HTTP mode, keep-alive
/// to the client (HAProxy's default, http-keep-alive) and `http-reuse
/// always`, which shares idle server connections between clients.
pub fn haproxy_preamble() -> &'static str {
    "global\n\
     \tnbthread 2\n\
     \tmaxconn 4096\n\
     defaults\n\
     \tmode http\n\
     \ttimeout connect 1s\n\
     \ttimeout client 30s\n\
     \ttimeout server 30s\n\
     \thttp-reuse always\n"
}

/// Writes `config` to `<dir>/<name>.haproxy.cfg` and runs HAProxy on it in
/// the foreground (`-db`), its output in `<name>.log`; with `callgrind`
/// (an out-file prefix), under callgrind, as the Trellis sidecars are.
pub fn spawn_haproxy(
    procs: &mut Procs,
    dir: &Path,
    name: &str,
    config: &str,
    callgrind: Option<PathBuf>,
) -> Result<u32> {
    let path = dir.join(format!("{name}.haproxy.cfg"));
    fs::write(&path, config)?;
    let log = dir.join(format!("{name}.log"));
    let mut cmd = command_under(callgrind, "haproxy");
    procs.spawn(name, cmd.arg("-db").arg("-f").arg(&path), &log)
}

/// A command running `program`; with `callgrind` (an out-file prefix, the
/// profile's name before `.<pid>`), under callgrind.
fn command_under(callgrind: Option<PathBuf>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match callgrind {
        Some(prefix) => {
            let mut cmd = Command::new("valgrind");
            cmd.arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}.%p", prefix.display()))
                .arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A [`crate::floor`] proxy (this binary's `floor-proxy`) on `listen`,
/// sending to `next`; with `callgrind` (an out-file prefix), under callgrind.
fn floor_proxy(
    procs: &mut Procs,
    dir: &Path,
    name: &str,
    proto: Proto,
    (listen, next): (SocketAddr, SocketAddr),
    callgrind: Option<PathBuf>,
) -> Result<u32> {
    let mut cmd = command_under(callgrind, std::env::current_exe()?);
    cmd.args(["floor-proxy", "--listen", &listen.to_string()])
        .args(["--next", &next.to_string()]);
    if proto == Proto::Grpc {
        cmd.arg("--http2");
    }
    procs.spawn(name, &mut cmd, &dir.join(format!("{name}.log")))
}

fn nginx(
    procs: &mut Procs,
    dir: &Path,
    name: &str,
    proto: Proto,
    listen: SocketAddr,
    next: SocketAddr,
) -> Result<u32> {
    let location = match proto {
        Proto::Http1 => {
            "proxy_pass http://next;\n\
             \t\t\tproxy_http_version 1.1;\n\
             \t\t\tproxy_set_header Connection \"\";"
        }
        Proto::Grpc => "grpc_pass grpc://next;",
    };
    let h2 = if proto == Proto::Grpc { " http2" } else { "" };
    let http = format!(
        "\tupstream next {{\n\
         \t\tserver {next};\n\
         \t\tkeepalive 256;\n\
         \t\tkeepalive_requests 1000000;\n\
         \t}}\n\
         \tserver {{\n\
         \t\tlisten {listen}{h2};\n\
         \t\tlocation / {{\n\
         \t\t\t{location}\n\
         \t\t}}\n\
         \t}}\n"
    );
    spawn_nginx(procs, dir, name, &http)
}

/// The whole configuration of an nginx instance whose files live under
/// `prefix`: a master and two workers (as many as the machine has cores),
/// no access log, unlimited requests per client connection, and `http`
/// (upstreams and servers) inside the `http` block.
pub fn nginx_config(prefix: &Path, http: &str) -> String {
    format!(
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
         {http}\
         }}\n",
        prefix = prefix.display(),
    )
}

/// Writes [`nginx_config`] to `<dir>/<name>.nginx.conf` (its prefix is
/// `<dir>/<name>/`) and runs nginx on it in the foreground.
pub fn spawn_nginx(procs: &mut Procs, dir: &Path, name: &str, http: &str) -> Result<u32> {
    let prefix = dir.join(name);
    fs::create_dir_all(&prefix)?;
    let path = dir.join(format!("{name}.nginx.conf"));
    fs::write(&path, nginx_config(&prefix, http))?;
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

/// The ServiceAccount of the `trellis-mtls` caller, A (B's is `bench`, its
/// service's name).
const CLIENT_ACCOUNT: &str = "bench-client";

/// A started `trellis-sidecar`.
pub struct Sidecar {
    pub name: String,
    pub pid: u32,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    /// The `--callgrind-out-file` prefix (before `.<pid>`), under callgrind.
    pub callgrind: Option<PathBuf>,
}

/// A release sidecar in static mode with a realistic policy: retries with a
/// budget, a circuit breaker, metrics (always on), tracing (1 % sampling
/// exported to the loopback sink unless `s.tracing` says otherwise: a down
/// collector is a closed loopback port). `dependency` makes it the caller (A).
/// With a `mesh`, it has a mesh identity: its policy names the trust bundle
/// and the identity service, it gets a certificate through its certify path
/// at start, and A knows B's pods run as ServiceAccount `bench`, so A → B
/// is mutual TLS (B's inbound is Strict, the default).
fn trellis(
    procs: &mut Procs,
    s: &Setup,
    name: &str,
    proto: Proto,
    dependency: Option<SocketAddr>,
    mesh: Option<&Mesh>,
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
        "tracing": {"sampleRatio": s.tracing.ratio},
    });
    if dependency.is_some() {
        policy["dependencies"] = serde_json::json!([{ "name": loadgen::SERVICE }]);
    }
    if let Some(mesh) = mesh {
        policy["identity"] = mesh.policy_identity();
    }
    let policy_path = s.dir.join(format!("{name}.policy.json"));
    fs::write(&policy_path, policy.to_string())?;
    let log = s.dir.join(format!("{name}.log"));
    let endpoints = dependency.unwrap_or(app);
    let callgrind = s.callgrind.map(|d| d.join(name));
    let wrapper = match &callgrind {
        Some(prefix) => format!(
            "valgrind --tool=callgrind --callgrind-out-file={}.%p",
            prefix.display()
        ),
        None => s.wrapper.unwrap_or("").to_owned(),
    };
    let otlp = if s.tracing.collector_down {
        closed_port()?
    } else {
        s.otlp
    };
    let mut cmd = sidecar_command(
        s.sidecar,
        &wrapper,
        name,
        otlp,
        [inbound, outbound, admin],
        s.sidecar_env,
    );
    cmd.arg("--policy-file").arg(&policy_path).args([
        "--static-endpoints",
        &format!("{}={endpoints}", loadgen::SERVICE),
    ]);
    if mesh.is_some() {
        let account = if dependency.is_some() {
            CLIENT_ACCOUNT
        } else {
            loadgen::SERVICE
        };
        // The stand-in identity service certifies the ServiceAccount the
        // token names.
        let token = s.dir.join(format!("{name}.token"));
        fs::write(&token, account)?;
        cmd.env("TRELLIS_IDENTITY_TOKEN_FILE", &token)
            .env("TRELLIS_SERVICE_ACCOUNT", account);
        if dependency.is_some() {
            cmd.args([
                "--static-identity",
                &format!("{}={}", loadgen::SERVICE, loadgen::SERVICE),
            ]);
        }
    }
    let pid = procs.spawn(name, &mut cmd, &log)?;
    Ok(Sidecar {
        name: name.to_owned(),
        pid,
        inbound,
        outbound,
        admin,
        log,
        callgrind,
    })
}

/// `sidecar` (under `wrapper`, split on spaces, unless it is empty) with
/// a clean environment: PATH, the OTLP endpoint `otlp`, service name
/// `name` for its spans, its inbound, outbound and admin addresses, `env`
/// (`KEY=VALUE`), and warnings-only logs unless `env` sets `TRELLIS_LOG`.
pub fn sidecar_command(
    sidecar: &Path,
    wrapper: &str,
    name: &str,
    otlp: SocketAddr,
    [inbound, outbound, admin]: [SocketAddr; 3],
    env: &[String],
) -> Command {
    let mut words = wrapper.split_whitespace();
    let mut cmd = match words.next() {
        Some(w) => {
            let mut c = Command::new(w);
            c.args(words).arg(sidecar);
            c
        }
        None => Command::new(sidecar),
    };
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_SERVICE_NAME", name)
        .args(["--inbound-addr", &inbound.to_string()])
        .args(["--outbound-addr", &outbound.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .envs(env.iter().filter_map(|kv| kv.split_once('=')));
    // `--log` would override a `TRELLIS_LOG` given in `env`.
    if !env.iter().any(|kv| kv.starts_with("TRELLIS_LOG=")) {
        cmd.args(["--log", "warn"]);
    }
    cmd
}

/// A down collector: a loopback port nothing listens on (the discard port,
/// never handed out as an ephemeral port), so every export is refused at
/// once, as when the Collector's pod is gone but its Service still resolves.
fn closed_port() -> Result<SocketAddr> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 9));
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(addr),
        Err(e) => bail!("{addr} is not a closed port as the down collector needs: {e}"),
        Ok(_) => bail!("something listens on {addr}; the down collector needs it closed"),
    }
}

impl Sidecar {
    /// Waits for `/readyz` (60 s at most), failing at once with the log if
    /// the sidecar exits.
    pub fn wait_ready(&self, procs: &mut Procs) -> Result<()> {
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
