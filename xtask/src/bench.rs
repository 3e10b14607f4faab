//! `cargo xtask bench sidecar`: the sidecar's memory and CPU, idle and under load.
//!
//! Builds `trellis-sidecar` in release, starts an upstream (HTTP/1.1
//! keep-alive, std threads, in this process) and two sidecars in static mode,
//! all on 127.0.0.1:
//!
//! ```text
//! load generator → A outbound (Host: bench) → B inbound → upstream (B's app)
//! ```
//!
//! It reads each sidecar's `VmRSS`/`VmHWM` and `utime+stime` from `/proc`
//! idle, drives load for a bounded time (with `wrk` when installed, else a
//! closed-loop generator on std threads), samples RSS throughout, and prints
//! a table. A benchmark: it prints numbers and asserts nothing about speed.
//! Every process it starts is killed when it returns, on error too.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{paths, run};

/// Which load generator drives the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadGen {
    /// `wrk` when it is on PATH, else the built-in generator.
    Auto,
    /// `wrk` (Debian package `wrk`).
    Wrk,
    /// A closed loop of blocking HTTP/1.1 keep-alive clients, one thread each.
    Builtin,
}

/// Settings of one benchmark run.
#[derive(Clone, Debug, clap::Args)]
pub struct SidecarBench {
    /// How long to drive load.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub duration: u64,
    /// Concurrent keep-alive connections from the load generator.
    #[arg(long, default_value = "32")]
    pub connections: usize,
    /// The load generator.
    #[arg(long, value_enum, default_value = "auto")]
    pub load: LoadGen,
    /// Also drive the same load straight at the upstream, for comparison.
    #[arg(long)]
    pub baseline: bool,
    /// Use the already built target/release/trellis-sidecar.
    #[arg(long)]
    pub no_build: bool,
}

/// What the upstream answers to every request.
const BODY: &str = "hello from the bench upstream\n";
/// The name sidecar A resolves to sidecar B.
const SERVICE: &str = "bench";

pub fn sidecar(opts: &SidecarBench) -> Result<()> {
    if opts.duration == 0 || opts.connections == 0 {
        bail!("--duration and --connections must be positive");
    }
    let binary = release_binary();
    if !opts.no_build {
        run::status(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(paths::workspace())
                .args(["build", "--release", "-p", "trellis-sidecar"]),
        )?;
    }
    if !binary.exists() {
        bail!("{} is not built", binary.display());
    }
    let wrk = match opts.load {
        LoadGen::Builtin => false,
        LoadGen::Wrk => true,
        LoadGen::Auto => has_wrk(),
    };
    if opts.load == LoadGen::Wrk && !has_wrk() {
        bail!("wrk is not installed (apt-get install -y wrk), or use --load builtin");
    }

    let dir = paths::workspace().join("target/bench");
    fs::create_dir_all(&dir)?;
    let upstream = start_upstream()?;
    let mut procs = Procs::default();

    // B: the upstream is its application. A: its application is the upstream
    // too (only so its health check passes); its outbound sends `bench` to B.
    let b = Sidecar::spawn(&binary, &dir, "b", upstream, None, &mut procs)?;
    let a = Sidecar::spawn(&binary, &dir, "a", upstream, Some(b.inbound), &mut procs)?;
    for sc in [&a, &b] {
        sc.wait_ready(&mut procs)?;
    }
    // One request through both, to fail early and with a reason.
    let probe = http_get(a.outbound, SERVICE, "/")?;
    if probe.0 != 200 {
        bail!(
            "a request through both sidecars got {}: {}",
            probe.0,
            probe.1
        );
    }

    let tick = clock_ticks();
    thread::sleep(Duration::from_secs(2));
    let idle = [a.sample(), b.sample()];

    let sampler = RssSampler::start(&[a.pid, b.pid]);
    let cpu_before = [a.cpu(tick), b.cpu(tick)];
    let target = Target {
        addr: a.outbound,
        host: SERVICE,
    };
    let load = if wrk {
        run_wrk(&target, opts)?
    } else {
        run_builtin(&target, opts)?
    };
    let cpu_after = [a.cpu(tick), b.cpu(tick)];
    let peaks = sampler.stop();
    let loaded = [a.sample(), b.sample()];
    thread::sleep(Duration::from_secs(2));
    let after = [a.sample(), b.sample()];

    let baseline = if opts.baseline {
        let t = Target {
            addr: upstream,
            host: SERVICE,
        };
        Some(if wrk {
            run_wrk(&t, opts)?
        } else {
            run_builtin(&t, opts)?
        })
    } else {
        None
    };

    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    println!();
    println!(
        "trellis-sidecar benchmark: release build, {} s at {} connections, load by {}",
        opts.duration, opts.connections, load.generator
    );
    println!(
        "path: load → A outbound (HTTP/1.1, Host: {SERVICE}) → B inbound → upstream (HTTP/1.1 keep-alive, {} B body)",
        BODY.len()
    );
    println!("machine: {}", machine());
    println!();
    println!("{:<34} {:>14} {:>14}", "", "sidecar A", "sidecar B");
    let row = |name: &str, v: [String; 2]| println!("{name:<34} {:>14} {:>14}", v[0], v[1]);
    row("idle RSS (VmRSS)", idle.map(|s| mib(s.rss)));
    row(
        "peak RSS under load (sampled)",
        [0, 1].map(|i| mib(peaks[i].max(loaded[i].rss))),
    );
    row("VmHWM after load", loaded.map(|s| mib(s.hwm)));
    row("RSS 2 s after load", after.map(|s| mib(s.rss)));
    row("threads under load", loaded.map(|s| s.threads.to_string()));
    let cpu = [0, 1].map(|i| cpu_after[i] - cpu_before[i]);
    row("CPU seconds under load", cpu.map(|c| format!("{c:.2} s")));
    row(
        "CPU, share of one core",
        cpu.map(|c| format!("{:.0} %", 100.0 * c / load.elapsed.as_secs_f64())),
    );
    row(
        "CPU per 1000 requests",
        cpu.map(|c| format!("{:.1} ms", 1e6 * c / load.requests.max(1) as f64)),
    );
    println!();
    load.print("through both sidecars");
    if let Some(b) = &baseline {
        b.print("straight to the upstream");
    }
    println!("\nsidecar logs: {}", dir.display());
    drop(procs);
    Ok(())
}

fn release_binary() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::workspace().join("target"))
        .join("release/trellis-sidecar")
}

fn has_wrk() -> bool {
    // `wrk --version` exits 1; being able to start it is what counts.
    Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn machine() -> String {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs available ({model}), shared with whatever else runs")
}

/// Child processes, killed when dropped (on every return path).
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let (_, c) = self.0.iter_mut().find(|(n, _)| n == name)?;
        c.try_wait().ok().flatten()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

struct Sidecar {
    name: String,
    pid: u32,
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

#[derive(Clone, Copy)]
struct Mem {
    rss: u64,
    hwm: u64,
    threads: u64,
}

impl Sidecar {
    fn spawn(
        binary: &Path,
        dir: &Path,
        name: &str,
        app: SocketAddr,
        dependency: Option<SocketAddr>,
        procs: &mut Procs,
    ) -> Result<Self> {
        let (inbound, outbound, admin) = (free_addr()?, free_addr()?, free_addr()?);
        let policy = dir.join(format!("policy-{name}.json"));
        let mut p = serde_json::json!({
            "service": format!("bench-{name}"),
            "namespace": "default",
            "appPort": app.port(),
            "health": {"path": "/health", "interval": "1s"},
        });
        if dependency.is_some() {
            p["dependencies"] = serde_json::json!([{ "name": SERVICE }]);
        }
        fs::write(&policy, p.to_string())?;
        let log = dir.join(format!("sidecar-{name}.log"));
        let out = fs::File::create(&log)?;
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .args(["--inbound-addr", &inbound.to_string()])
            .args(["--outbound-addr", &outbound.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .arg("--policy-file")
            .arg(&policy)
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // Static mode (no Kubernetes) for both: B's table names only the
        // upstream, which it never calls through its outbound.
        let endpoints = dependency.unwrap_or(app);
        cmd.args(["--static-endpoints", &format!("{SERVICE}={endpoints}")]);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", run::describe(&cmd)))?;
        let pid = child.id();
        procs.0.push((name.to_owned(), child));
        Ok(Self {
            name: name.to_owned(),
            pid,
            outbound,
            inbound,
            admin,
            log,
        })
    }

    fn wait_ready(&self, procs: &mut Procs) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = procs.exited(&self.name) {
                bail!(
                    "sidecar {} exited ({status}): {}",
                    self.name,
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if http_get(self.admin, "admin", "/readyz").is_ok_and(|(s, _)| s == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let why = http_get(self.admin, "admin", "/healthz")
                    .map(|(_, b)| b)
                    .unwrap_or_default();
                bail!("sidecar {} not ready within 20 s: {why}", self.name);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn sample(&self) -> Mem {
        proc_mem(self.pid)
    }

    /// utime + stime, in seconds.
    fn cpu(&self, tick: f64) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the command (which may hold spaces) start at field 3.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15: indices 11 and 12 here.
        (n(11) + n(12)) / tick
    }
}

fn proc_mem(pid: u32) -> Mem {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Mem {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        threads: field("Threads:"),
    }
}

fn clock_ticks() -> f64 {
    run::output(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Samples the peak VmRSS of some processes every 50 ms.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peaks: Vec<Arc<AtomicU64>>,
    thread: thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pids: &[u32]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<_> = pids.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let thread = thread::spawn({
            let (stop, peaks, pids) = (stop.clone(), peaks.clone(), pids.to_vec());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    for (pid, peak) in pids.iter().zip(&peaks) {
                        peak.fetch_max(proc_mem(*pid).rss, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Self {
            stop,
            peaks,
            thread,
        }
    }

    fn stop(self) -> [u64; 2] {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        [0, 1].map(|i| self.peaks.get(i).map_or(0, |p| p.load(Ordering::Relaxed)))
    }
}

// ---- the upstream -----------------------------------------------------------

/// An HTTP/1.1 keep-alive server on an ephemeral loopback port, a thread per
/// connection, answering 200 with [`BODY`] to everything. It lives as long as
/// this process.
fn start_upstream() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = serve_connection(stream);
            });
        }
    });
    Ok(addr)
}

fn serve_connection(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        // Request bodies (none in this benchmark) are read and dropped.
        if head.content_length > 0 {
            std::io::copy(
                &mut (&mut reader).take(head.content_length),
                &mut std::io::sink(),
            )?;
        }
        writer.write_all(response.as_bytes())?;
        if head.close {
            return Ok(());
        }
    }
}

/// A parsed message head: the first line and what framing needs.
struct Head {
    first: String,
    content_length: u64,
    chunked: bool,
    close: bool,
}

/// Reads a request or response head; `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut head = Head {
        first: line.trim_end().to_owned(),
        content_length: 0,
        chunked: false,
        close: false,
    };
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok(Some(head));
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => head.content_length = v.parse().unwrap_or(0),
                "transfer-encoding" => head.chunked = v.eq_ignore_ascii_case("chunked"),
                "connection" => head.close = v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
}

/// Reads a response body as its head frames it into `out`, returning its length.
fn read_body(r: &mut impl BufRead, head: &Head, out: &mut impl Write) -> std::io::Result<u64> {
    if !head.chunked {
        return std::io::copy(&mut r.take(head.content_length), out);
    }
    let mut total = 0;
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                    return Ok(total);
                }
            }
        }
        total += std::io::copy(&mut r.take(size), out)?;
        line.clear();
        r.read_line(&mut line)?;
    }
}

/// One GET on a new connection: status and body.
fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::new(s);
    let head = read_head(&mut r)?.context("no response")?;
    let mut body = Vec::new();
    if head.chunked || head.content_length > 0 {
        read_body(&mut r, &head, &mut body)?;
    } else {
        // Neither framing: the body ends with the connection (we sent close).
        r.read_to_end(&mut body)?;
    }
    Ok((
        status_of(&head),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

fn status_of(head: &Head) -> u16 {
    head.first
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---- load -------------------------------------------------------------------

struct Target {
    addr: SocketAddr,
    host: &'static str,
}

/// What a load run measured.
struct Load {
    generator: String,
    elapsed: Duration,
    requests: u64,
    errors: u64,
    p50: Option<Duration>,
    p99: Option<Duration>,
}

impl Load {
    fn print(&self, what: &str) {
        let ms = |d: Option<Duration>| {
            d.map_or("n/a".into(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
        };
        println!(
            "{what}: {} requests in {:.1} s = {:.0} req/s; latency p50 {} p99 {}; {} errors",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.requests as f64 / self.elapsed.as_secs_f64(),
            ms(self.p50),
            ms(self.p99),
            self.errors,
        );
    }
}

fn run_wrk(t: &Target, opts: &SidecarBench) -> Result<Load> {
    let threads = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(opts.connections);
    let start = Instant::now();
    let out = run::output(
        Command::new("wrk")
            .arg(format!("-t{threads}"))
            .arg(format!("-c{}", opts.connections))
            .arg(format!("-d{}s", opts.duration))
            .arg("--latency")
            .args(["-H", &format!("Host: {}", t.host)])
            .arg(format!("http://{}/", t.addr)),
    )?;
    let elapsed = start.elapsed();
    let words = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix).map(str::to_owned))
    };
    let requests = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read wrk's output:\n{out}"))?;
    // "5.32s" / "10.01s" in "N requests in 10.01s, ..."
    let elapsed = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split("requests in").nth(1))
        .and_then(|r| r.trim().split(',').next())
        .and_then(parse_wrk_duration)
        .unwrap_or(elapsed);
    let mut errors: u64 = words("Non-2xx or 3xx responses:")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if let Some(socket) = words("Socket errors:") {
        errors += socket
            .split(',')
            .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    let version = run::output(Command::new("wrk").arg("--version"))
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    Ok(Load {
        generator: format!("wrk {version} ({threads} threads)").replace("  ", " "),
        elapsed,
        requests,
        errors,
        p50: words("50%").and_then(|v| parse_wrk_duration(v.trim())),
        p99: words("99%").and_then(|v| parse_wrk_duration(v.trim())),
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`, `1.50m`.
fn parse_wrk_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// A closed loop per connection: send, read the whole answer, repeat.
fn run_builtin(t: &Target, opts: &SidecarBench) -> Result<Load> {
    let deadline = Instant::now() + Duration::from_secs(opts.duration);
    let start = Instant::now();
    let request = format!("GET / HTTP/1.1\r\nhost: {}\r\n\r\n", t.host);
    let workers: Vec<_> = (0..opts.connections)
        .map(|_| {
            let (addr, request) = (t.addr, request.clone());
            thread::spawn(move || {
                let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let Ok(stream) = TcpStream::connect(addr) else {
                        errors += 1;
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let Ok(mut w) = stream.try_clone() else {
                        errors += 1;
                        continue;
                    };
                    let mut r = BufReader::new(stream);
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        let ok = w.write_all(request.as_bytes()).is_ok()
                            && match read_head(&mut r) {
                                Ok(Some(head)) => {
                                    read_body(&mut r, &head, &mut std::io::sink()).is_ok()
                                        && status_of(&head) == 200
                                        && !head.close
                                }
                                _ => false,
                            };
                        if !ok {
                            errors += 1;
                            break; // a new connection
                        }
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| {
        (!lat.is_empty()).then(|| {
            let i = ((lat.len() as f64 * p) as usize).min(lat.len() - 1);
            Duration::from_micros(u64::from(lat[i]))
        })
    };
    Ok(Load {
        generator: format!("the built-in generator ({} threads)", opts.connections),
        elapsed,
        requests: lat.len() as u64,
        errors,
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_durations() {
        assert_eq!(
            parse_wrk_duration("812.00us"),
            Some(Duration::from_micros(812))
        );
        assert_eq!(
            parse_wrk_duration("1.50ms"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(parse_wrk_duration("2.00s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_wrk_duration("oops"), None);
    }

    #[test]
    fn upstream_and_client_speak_keep_alive() {
        let up = start_upstream().unwrap();
        let (status, body) = http_get(up, "x", "/").unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, BODY);
        let load = run_builtin(
            &Target {
                addr: up,
                host: "x",
            },
            &SidecarBench {
                duration: 1,
                connections: 2,
                load: LoadGen::Builtin,
                baseline: false,
                no_build: true,
            },
        )
        .unwrap();
        assert!(load.requests > 0);
        assert_eq!(load.errors, 0);
    }
}
