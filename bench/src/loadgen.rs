//! Load generators.
//!
//! Open loop (fixed rate), wrk2-style: every request has a scheduled send
//! time, and its latency is measured from that time, not from when it was
//! actually sent. A proxy that stalls therefore shows the whole queue it
//! caused, instead of silently slowing the generator down (coordinated
//! omission). Closed loop (as fast as it goes): `wrk` for HTTP/1.1, a tonic
//! loop for gRPC.
//!
//! Timing runs on plain threads with 1 µs timer slack: tokio's timer has
//! millisecond granularity, which would add up to 1 ms of fake latency to
//! requests scheduled between ticks.

use std::{
    io::{BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::h1::{read_body, read_head, status_of};
use xtask::run;

/// The `Host`/`:authority` every request of the sidecar bench carries: the
/// service name the Trellis outbound routes on (HAProxy and nginx ignore it).
pub const SERVICE: &str = "bench";

/// What the HTTP/1.1 generators send: GETs with one `Host`, spread evenly
/// over `paths` (request `i` takes path `i % paths.len()`), with `headers`
/// added to each.
#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub paths: Vec<String>,
    pub headers: Vec<(String, String)>,
}

impl Target {
    /// `GET /` with `Host: bench`: the sidecar bench's one request.
    pub fn service() -> Self {
        Self {
            host: SERVICE.into(),
            paths: vec!["/".into()],
            headers: Vec::new(),
        }
    }

    /// Each path's request, head and all.
    fn requests(&self) -> Vec<String> {
        let extra: String = self
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        self.paths
            .iter()
            .map(|p| format!("GET {p} HTTP/1.1\r\nhost: {}\r\n{extra}\r\n", self.host))
            .collect()
    }

    /// A wrk script sending the paths in turn, each request formatted once
    /// (in `init`, with the `-H` headers) so the Lua run per request is a
    /// table lookup. None for one path: wrk then sends the URL's path
    /// without running Lua per request.
    fn wrk_script(&self) -> Option<String> {
        if self.paths.len() < 2 {
            return None;
        }
        let paths: Vec<String> = self.paths.iter().map(|p| format!("{p:?}")).collect();
        Some(format!(
            "local paths = {{{}}}\n\
             local requests = {{}}\n\
             local i = 0\n\
             init = function(args)\n\
             \tfor k, p in ipairs(paths) do requests[k] = wrk.format(\"GET\", p) end\n\
             end\n\
             request = function()\n\
             \ti = (i % #requests) + 1\n\
             \treturn requests[i]\n\
             end\n",
            paths.join(", ")
        ))
    }
}

/// What one load run measured. Latencies in microseconds.
pub struct Run {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub hist: Histogram<u64>,
    /// The most frequent errors (up to three) and how often each was seen
    /// (gRPC runs).
    pub top_errors: Vec<(String, u64)>,
}

/// Errors by reason: the report names the most frequent, which usually
/// says why a run failed (the first failures' reason is often second to
/// an open breaker's).
#[derive(Clone, Default)]
struct ErrorKinds(Arc<Mutex<std::collections::BTreeMap<String, u64>>>);

impl ErrorKinds {
    fn add(&self, reason: String) {
        *self.0.lock().unwrap().entry(reason).or_default() += 1;
    }

    fn top(&self) -> Vec<(String, u64)> {
        let mut kinds: Vec<(String, u64)> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        kinds.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        kinds.truncate(3);
        kinds
    }
}

impl Run {
    /// A latency quantile in milliseconds (NaN without samples).
    pub fn ms(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            f64::NAN
        } else {
            self.hist.value_at_quantile(q) as f64 / 1000.0
        }
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_micros() as u64).clamp(1, 60_000_000));
}

/// Lets this thread's sleeps end within microseconds of their deadline.
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects this thread only.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// HTTP/1.1 GETs of `target` at `rate` per second for `duration`, spread
/// over `connections` keep-alive connections (one thread each, each sending
/// every `connections`-th scheduled request, as wrk2 does). A request
/// counts as an error unless it is answered 200 on a connection kept open.
pub fn h1_open_loop(
    addr: SocketAddr,
    target: &Target,
    rate: u64,
    duration: Duration,
    connections: usize,
) -> Result<Run> {
    if rate == 0 || connections == 0 {
        bail!("rate and connections must be positive");
    }
    let total = rate * duration.as_secs().max(1);
    let start = Instant::now() + Duration::from_millis(100);
    let requests = Arc::new(target.requests());
    let workers: Vec<_> = (0..connections as u64)
        .map(|c| {
            let requests = requests.clone();
            let n = connections as u64;
            thread::spawn(move || {
                precise_timers();
                let mut hist = histogram();
                let mut errors = 0u64;
                let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
                let mut i = c;
                while i < total {
                    let intended = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                    sleep_until(intended);
                    if conn.is_none() {
                        conn = connect(addr).ok();
                    }
                    let ok = conn.as_mut().is_some_and(|(w, r)| {
                        let request = &requests[(i % requests.len() as u64) as usize];
                        w.write_all(request.as_bytes()).is_ok()
                            && matches!(read_head(r), Ok(Some(head))
                                if read_body(r, &head, &mut std::io::sink()).is_ok()
                                    && status_of(&head) == 200
                                    && !head.close)
                    });
                    if ok {
                        record(&mut hist, intended.elapsed());
                    } else {
                        errors += 1;
                        conn = None;
                    }
                    i += n;
                }
                (hist, errors)
            })
        })
        .collect();
    collect(workers, start)
}

fn connect(addr: SocketAddr) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok((s.try_clone()?, BufReader::new(s)))
}

fn collect(workers: Vec<thread::JoinHandle<(Histogram<u64>, u64)>>, start: Instant) -> Result<Run> {
    let mut hist = histogram();
    let mut errors = 0;
    for w in workers {
        let (h, e) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        hist.add(&h).context("merging histograms")?;
        errors += e;
    }
    Ok(Run {
        requests: hist.len(),
        errors,
        elapsed: start.elapsed(),
        hist,
        top_errors: Vec::new(),
    })
}

/// A tokio runtime for the gRPC client: two workers, like everything else here.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `channels` HTTP/2 connections to `addr` with `:authority` [`SERVICE`].
async fn grpc_clients(addr: SocketAddr, channels: usize) -> Result<Vec<HealthClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..channels.max(1) {
        let connector = tower::service_fn(move |_: http::Uri| async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        });
        let channel = Endpoint::from_static("http://bench")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("gRPC connection to {addr}"))?;
        out.push(HealthClient::new(channel));
    }
    Ok(out)
}

/// One `Health/Check`; on failure, its status code and message.
async fn check(client: &mut HealthClient<Channel>) -> Result<(), String> {
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(drop)
        .map_err(|s| {
            let mut m: String = s.message().chars().take(120).collect();
            if m.is_empty() {
                m = std::error::Error::source(&s).map_or_else(String::new, |e| e.to_string());
            }
            format!("{:?}: {m}", s.code())
        })
}

/// One gRPC call through `addr`: fails with the reason.
pub fn grpc_probe(addr: SocketAddr) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = grpc_clients(addr, 1).await?.remove(0);
        c.check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(drop)
        .map_err(|s| anyhow::anyhow!("gRPC Check through {addr}: {s}"))
    })
}

/// Unary gRPC `Health/Check` calls at `rate` per second, open loop: a pacing
/// thread hands each scheduled time to the runtime, which starts the call at
/// once, multiplexed over `channels` HTTP/2 connections.
pub fn grpc_open_loop(
    addr: SocketAddr,
    rate: u64,
    duration: Duration,
    channels: usize,
) -> Result<Run> {
    let rt = runtime()?;
    let clients = rt.block_on(grpc_clients(addr, channels))?;
    let hist = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let kinds = ErrorKinds::default();
    let in_flight = Arc::new(AtomicU64::new(0));
    let total = rate * duration.as_secs().max(1);
    let start = Instant::now() + Duration::from_millis(100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let dispatcher = rt.spawn({
        let (hist, errors, in_flight) = (hist.clone(), errors.clone(), in_flight.clone());
        let kinds = kinds.clone();
        async move {
            let mut k = 0usize;
            while let Some(intended) = rx.recv().await {
                let mut client = clients[k % clients.len()].clone();
                k += 1;
                let (hist, errors, in_flight) = (hist.clone(), errors.clone(), in_flight.clone());
                let kinds = kinds.clone();
                in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    match check(&mut client).await {
                        Ok(()) => record(&mut hist.lock().unwrap(), intended.elapsed()),
                        Err(why) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            kinds.add(why);
                        }
                    }
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    });
    precise_timers();
    for i in 0..total {
        let intended = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        sleep_until(intended);
        let _ = tx.send(intended);
    }
    drop(tx);
    rt.block_on(async {
        let _ = dispatcher.await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let lost = in_flight.load(Ordering::Relaxed);
    if lost > 0 {
        *kinds
            .0
            .lock()
            .unwrap()
            .entry("no answer within 15 s of the last send".into())
            .or_default() += lost;
    }
    let hist = std::mem::replace(&mut *hist.lock().unwrap(), histogram());
    Ok(Run {
        requests: hist.len(),
        errors: errors.load(Ordering::Relaxed) + lost,
        elapsed: start.elapsed(),
        hist,
        top_errors: kinds.top(),
    })
}

/// gRPC calls as fast as they complete: `concurrency` callers in a loop over
/// `channels` connections for `duration`.
pub fn grpc_closed_loop(
    addr: SocketAddr,
    duration: Duration,
    channels: usize,
    concurrency: usize,
) -> Result<Run> {
    let rt = runtime()?;
    rt.block_on(async {
        let clients = grpc_clients(addr, channels).await?;
        let start = Instant::now();
        let deadline = start + duration;
        let kinds = ErrorKinds::default();
        let tasks: Vec<_> = (0..concurrency)
            .map(|i| {
                let mut client = clients[i % clients.len()].clone();
                let kinds = kinds.clone();
                tokio::spawn(async move {
                    let mut hist = histogram();
                    let mut errors = 0u64;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        match check(&mut client).await {
                            Ok(()) => record(&mut hist, t0.elapsed()),
                            Err(why) => {
                                errors += 1;
                                kinds.add(why);
                            }
                        }
                    }
                    (hist, errors)
                })
            })
            .collect();
        let mut hist = histogram();
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await?;
            hist.add(&h).context("merging histograms")?;
            errors += e;
        }
        Ok(Run {
            requests: hist.len(),
            errors,
            elapsed: start.elapsed(),
            hist,
            top_errors: kinds.top(),
        })
    })
}

/// `wrk` closed loop on `target`: `connections` keep-alive connections on
/// 2 threads. A target with several paths needs `script_dir` for the Lua
/// script that sends them in turn.
pub fn wrk(
    addr: SocketAddr,
    target: &Target,
    duration: Duration,
    connections: usize,
    script_dir: &std::path::Path,
) -> Result<Run> {
    let start = Instant::now();
    let mut cmd = Command::new("wrk");
    cmd.arg("-t2")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--latency")
        .args(["-H", &format!("Host: {}", target.host)]);
    for (k, v) in &target.headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    if let Some(script) = target.wrk_script() {
        let path = script_dir.join("wrk-paths.lua");
        std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        cmd.arg("-s").arg(path);
    }
    let first = target.paths.first().map_or("/", String::as_str);
    let out = run::output(cmd.arg(format!("http://{addr}{first}")))?;
    let line = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix).map(str::to_owned))
    };
    let summary = out
        .lines()
        .find(|l| l.contains("requests in"))
        .with_context(|| format!("cannot read wrk's output:\n{out}"))?;
    let requests: u64 = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read wrk's output:\n{out}"))?;
    let elapsed = summary
        .split("requests in")
        .nth(1)
        .and_then(|r| r.trim().split(',').next())
        .and_then(parse_wrk_duration)
        .unwrap_or_else(|| start.elapsed());
    let mut errors: u64 = line("Non-2xx or 3xx responses:")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if let Some(socket) = line("Socket errors:") {
        errors += socket
            .split(',')
            .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    // wrk prints percentiles, not a histogram: keep p50 and p99 as two samples
    // each weighted like the share they stand for, enough for the table.
    let mut hist = histogram();
    for (p, weight) in [("50%", 99u64), ("99%", 1)] {
        if let Some(d) = line(p).and_then(|v| parse_wrk_duration(v.trim())) {
            let _ = hist.record_n((d.as_micros() as u64).max(1), weight);
        }
    }
    Ok(Run {
        requests,
        errors,
        elapsed,
        hist,
        top_errors: Vec::new(),
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
    fn open_loop_counts_queueing_from_the_scheduled_time() {
        // A server that answers the first request only after 300 ms: with one
        // connection at 100 req/s, the requests scheduled behind it waited
        // too, and an open-loop generator must say so.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            use std::io::BufRead;
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut first = true;
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    if first {
                        thread::sleep(Duration::from_millis(300));
                        first = false;
                    }
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            }
        });
        let run = h1_open_loop(addr, &Target::service(), 100, Duration::from_secs(1), 1).unwrap();
        assert_eq!(run.errors, 0);
        assert_eq!(run.requests, 100);
        // About 30 requests were due during the stall; the 10th-slowest of
        // them still waited well over 100 ms.
        assert!(run.ms(0.9) > 100.0, "p90 {} ms", run.ms(0.9));
        assert!(run.ms(0.5) < 100.0, "p50 {} ms", run.ms(0.5));
    }
}
