//! `trellis-bench sidecar|gateway|operator`, run by `cargo xtask bench`: benchmarks
//! that print and record numbers and assert nothing about speed.
//!
//! A binary of its own, built in release when a benchmark runs: the load
//! generators, upstreams and the counting proxy live in this process (a
//! debug build of them would be the bottleneck), and the operator bench
//! needs kube and the operator crate, which xtask itself does not.
//!
//! - [`sidecar`]: the two-hop mesh path on loopback (generator → outbound
//!   proxy → inbound proxy → upstream) for no proxy, HAProxy, nginx and the
//!   Trellis sidecar, over HTTP/1.1 and gRPC (h2c), and for HAProxy and
//!   Trellis again with mutual TLS between the two proxies;
//! - [`gateway`]: the edge on loopback (generator → edge proxy → three
//!   upstreams, by path) for no proxy, HAProxy, nginx and the Trellis
//!   gateway doing the same routing, with and without a JWT check;
//! - [`operator`]: 1,000 MicroServices against the real apiserver, compared
//!   with the same children written straight to the API;
//! - [`link_order`]: not a benchmark: the functions the sidecar runs, the
//!   list its build lays its code out by.
//!
//! Results go to `target/bench/*.json` and `*.md`; docs/benchmarks.md holds
//! the latest tables. Every process a benchmark starts is killed when it
//! returns, on error too.

mod floor;
mod gateway;
mod h1;
mod link_order;
mod loadgen;
mod mesh;
mod operator;
mod proxies;
mod report;
mod sidecar;
mod upstream;

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

use clap::{Parser, Subcommand};
use operator::OperatorBench;
use sidecar::SidecarBench;
use xtask::{paths, run};

#[derive(Parser)]
#[command(
    name = "cargo xtask bench",
    about = "Benchmarks: print numbers, assert nothing about speed"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// The two-hop path on loopback (load → A → B → upstream): Trellis sidecars against
    /// HAProxy, nginx and no proxy; latency at fixed rates, throughput, CPU, RSS.
    Sidecar(SidecarBench),
    /// The gateway at the edge (load → edge → three upstreams by path): Trellis
    /// against HAProxy, nginx and no proxy doing the same routing.
    Gateway(gateway::GatewayBench),
    /// 1,000 MicroServices on the cluster: convergence time against the same children
    /// written straight to the API, RSS, API requests, edit latency, idle writes.
    Operator(OperatorBench),
    /// The list `sidecar/build.rs` lays out the sidecar's code by: the
    /// functions pairs run under callgrind (`cargo xtask link-order`).
    LinkOrder(link_order::LinkOrder),
    /// The `hyper-floor` setup's proxy (started by `sidecar --only hyper-floor`).
    #[command(hide = true)]
    FloorProxy(floor::FloorProxy),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Bench::Sidecar(opts) => sidecar::sidecar(&opts),
        Bench::Gateway(opts) => gateway::gateway(&opts),
        Bench::Operator(opts) => operator::operator(&opts),
        Bench::LinkOrder(opts) => link_order::link_order(&opts),
        Bench::FloorProxy(opts) => floor::run(&opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Where results are written.
fn results_dir() -> Result<PathBuf> {
    let dir = paths::workspace().join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A release binary of the workspace, built first unless `no_build`.
fn release_binary(package: &str, bin: &str, no_build: bool) -> Result<PathBuf> {
    xtask::binaries::release(package, bin, no_build)
}

/// Installs Debian packages whose command is missing (idempotent).
fn ensure_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {} with apt-get", missing.join(" "));
    run::status(Command::new("apt-get").args(["update", "-q"]))?;
    run::status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// The machine, for the results: CPUs, model and memory.
fn machine() -> String {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// The 1-, 5- and 15-minute load averages: other work on the machine.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The commit measured, with `-dirty` when the tree has changes.
fn commit() -> String {
    let ws = paths::workspace();
    let rev =
        run::output(
            Command::new("git")
                .current_dir(&ws)
                .args(["rev-parse", "--short", "HEAD"]),
        )
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let dirty = !run::quietly(Command::new("git").current_dir(&ws).args([
        "diff", "--quiet", "HEAD", "--", "sidecar", "operator", "policy",
    ]));
    if dirty { format!("{rev}-dirty") } else { rev }
}

/// The UTC date and time, from `date` (no date crate needed for one string).
fn now_utc() -> String {
    run::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// A free loopback port (bound and released: good enough on a quiet loopback).
fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Child processes, killed when dropped (on every return path).
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, cmd: &mut Command, log: &std::path::Path) -> Result<u32> {
        let out = fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", run::describe(cmd)))?;
        let pid = child.id();
        self.0.push((name.to_owned(), child));
        Ok(pid)
    }

    /// The exit status of `name`, if it has exited.
    fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let (_, c) = self.0.iter_mut().find(|(n, _)| n == name)?;
        c.try_wait().ok().flatten()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            // SIGTERM first so nginx's master takes its workers down with it.
            // SAFETY: kill(2) on a pid we started and have not reaped.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        for (_, c) in &mut self.0 {
            for _ in 0..40 {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A process and its descendants (nginx's master and workers), read from /proc.
fn process_tree(root: u32) -> Vec<u32> {
    let mut all = vec![root];
    let Ok(dir) = fs::read_dir("/proc") else {
        return all;
    };
    let parents: Vec<(u32, u32)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat_fields(pid)?.get(1)?.parse().ok()?)))
        .collect();
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        all.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    all
}

/// The fields of /proc/<pid>/stat after the command name: index 0 is `state`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of some processes, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let tick = clock_ticks();
    pids.iter()
        .filter_map(|&pid| {
            let f = stat_fields(pid)?;
            // utime and stime are fields 14 and 15 of stat: 11 and 12 here.
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / tick
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// VmRSS of some processes together, in KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&pid| status_kib(pid, "VmRSS:")).sum()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples the peak RSS of groups of processes every 20 ms.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peaks: Vec<Arc<AtomicU64>>,
    thread: thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(groups: Vec<Vec<u32>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<_> = groups.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let thread = thread::spawn({
            let (stop, peaks) = (stop.clone(), peaks.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    for (pids, peak) in groups.iter().zip(&peaks) {
                        peak.fetch_max(rss_kib(pids), Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Self {
            stop,
            peaks,
            thread,
        }
    }

    /// The peak of each group, in KiB.
    fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }
}

/// What a phase cost the proxies under test while `load` ran.
struct Measured {
    run: loadgen::Run,
    /// utime + stime of every process of every instance, in seconds.
    cpu_s: f64,
    /// Each instance's peak RSS, in KiB.
    rss_peak_kib: Vec<u64>,
}

/// Runs `load` while sampling the CPU time and peak RSS of `instances`
/// (each a group of pids: nginx's master and workers are one instance).
fn measure(
    instances: Vec<Vec<u32>>,
    load: impl FnOnce() -> Result<loadgen::Run>,
) -> Result<Measured> {
    let pids = instances.concat();
    let sampler = RssSampler::start(instances);
    let cpu0 = cpu_seconds(&pids);
    let run = load();
    let cpu_s = cpu_seconds(&pids) - cpu0;
    let rss_peak_kib = sampler.stop();
    Ok(Measured {
        run: run?,
        cpu_s,
        rss_peak_kib,
    })
}

impl Measured {
    /// Proxy CPU seconds per 10,000 requests.
    fn cpu_per_10k(&self) -> f64 {
        per_10k(self.cpu_s, self.run.requests)
    }

    /// A fixed-rate phase's row (the sidecar bench adds to it).
    fn rate_row(&self, rate: u64) -> serde_json::Value {
        let run = &self.run;
        serde_json::json!({
            "rate": rate,
            "requests": run.requests,
            "errors": run.errors,
            "top_errors": run.top_errors,
            "p50_ms": run.ms(0.5),
            "p99_ms": run.ms(0.99),
            "p999_ms": run.ms(0.999),
            "max_ms": run.ms(1.0),
            "proxy_cpu_s": self.cpu_s,
            "proxy_cpu_s_per_10k": self.cpu_per_10k(),
            "rss_peak_kib": self.rss_peak_kib,
        })
    }

    /// The closed loop's row (wrk reports p50 and p99 only).
    fn max_row(&self) -> serde_json::Value {
        let run = &self.run;
        serde_json::json!({
            "requests_per_s": run.rate(),
            "requests": run.requests,
            "errors": run.errors,
            "top_errors": run.top_errors,
            "p50_ms": run.ms(0.5),
            "p99_ms": run.ms(0.99),
            "proxy_cpu_s": self.cpu_s,
            "proxy_cpu_s_per_10k": self.cpu_per_10k(),
            "rss_peak_kib": self.rss_peak_kib,
        })
    }
}

fn per_10k(cpu: f64, requests: u64) -> f64 {
    if requests == 0 {
        f64::NAN
    } else {
        cpu * 10_000.0 / requests as f64
    }
}

/// The first line of a command's output (stdout or stderr: `nginx -v` uses stderr).
fn version_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "not installed".into())
}

/// Milliseconds with two decimals.
fn ms(d: f64) -> String {
    format!("{d:.2}")
}

/// MiB with one decimal, from KiB.
fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
