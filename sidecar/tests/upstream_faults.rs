//! Upstream faults through a real sidecar on loopback: an upstream that is
//! dead, that closes mid-request, that hangs, that resets mid-body, that
//! answers garbage. Each caller gets a timely, clear error — a status and a
//! body naming the service and what happened, within the configured
//! timeout — and the sidecar's memory and file descriptors stay flat over
//! thousands of such requests (measured on the real binary as a child
//! process, from `/proc/<pid>/status`).
//!
//! The faulty upstreams are raw TCP servers, not HTTP ones, because what
//! they do (go silent, reset, speak nonsense) is exactly what an HTTP server
//! library would not let them do.

mod support;

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use trellis_sidecar::Running;

/// What a faulty upstream does with every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Reads the request head, then closes without answering: the process
    /// died mid-request.
    CloseAfterHead,
    /// Reads the request and never answers, keeping the connection open.
    Hang,
    /// Sends part of a response head, then resets the connection.
    ResetMidHead,
    /// Sends a head promising 10 000 bytes and 100 of them, then resets.
    ResetMidBody,
    /// Sends a chunked head and one chunk, then resets.
    ResetMidChunks,
    /// Answers with bytes that are not HTTP at all.
    Garbage,
    /// Answers with a status line, then a header that never ends.
    EndlessHead,
    /// Trickles a valid head one byte every 50 ms, never finishing in time.
    Trickle,
}

/// A faulty upstream: counts connections, and how many are still open.
#[derive(Clone)]
struct Faulty {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Faulty {
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Reads until the end of a request head (or the peer goes away).
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// Resets the connection (RST rather than FIN), as a crashed peer's kernel would.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn misbehave(fault: Fault, mut stream: TcpStream) {
    if !read_head(&mut stream).await {
        return;
    }
    match fault {
        Fault::CloseAfterHead => {}
        Fault::Hang => {
            // Hold the connection until the caller gives up on it.
            let mut buf = [0u8; 1024];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        Fault::ResetMidHead => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/pl")
                .await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            reset(stream);
        }
        Fault::ResetMidBody => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10000\r\n\r\n")
                .await;
            let _ = stream.write_all(&[b'x'; 100]).await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            reset(stream);
        }
        Fault::ResetMidChunks => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            reset(stream);
        }
        Fault::Garbage => {
            let _ = stream
                .write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02\xff garbage\r\n\r\n")
                .await;
            let _ = stream.shutdown().await;
        }
        Fault::EndlessHead => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nx-endless: ").await;
            let chunk = [b'A'; 16 * 1024];
            // Stops when the caller closes the connection.
            while stream.write_all(&chunk).await.is_ok() {}
        }
        Fault::Trickle => {
            for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\nok" {
                if stream.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Starts an upstream on loopback that does `fault` with every connection.
async fn faulty(fault: Fault) -> Faulty {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Faulty {
        addr: listener.local_addr().unwrap(),
        accepted: Arc::default(),
        open: Arc::default(),
    };
    let state = up.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            state.accepted.fetch_add(1, Ordering::SeqCst);
            state.open.fetch_add(1, Ordering::SeqCst);
            let open = state.open.clone();
            tokio::spawn(async move {
                misbehave(fault, stream).await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    up
}

/// The overall timeout every test policy sets.
const TIMEOUT: Duration = Duration::from_millis(500);

/// The policy of service `order` whose app listens on `app_port`: two
/// attempts with a short backoff, `timeout` overall, the breaker off.
fn faults_policy(app_port: u16, timeout: &str, inbound_timeout: &str) -> String {
    policy(
        "order",
        app_port,
        json!({
            "resilience": {
                "timeout": timeout,
                "retry": {"attempts": 2, "backoff": {"base": "1ms", "max": "5ms"}},
                "circuitBreaker": no_breaker(),
            },
            "inbound": {"timeout": inbound_timeout},
        }),
    )
}

/// A sidecar for `order` (its app on `app_port`) with the 500 ms timeouts of
/// [`faults_policy`], each dependency at one address.
async fn sidecar_with(app_port: u16, deps: &[(&str, SocketAddr)]) -> Running {
    let endpoints: Vec<(&str, &[SocketAddr])> = deps
        .iter()
        .map(|(n, a)| (*n, std::slice::from_ref(a)))
        .collect();
    // Ejection would turn later requests into "no endpoints" answers; the
    // point here is what each fault itself produces.
    let (sc, _) = sidecar_with_config(
        &faults_policy(app_port, "500ms", "500ms"),
        &endpoints,
        |cfg| cfg.outlier = no_ejection(),
    )
    .await;
    sc
}

/// What a caller got, and how long it took.
struct Outcome {
    status: Option<StatusCode>,
    kind: String,
    body: String,
    body_error: Option<String>,
    elapsed: Duration,
}

/// One GET in proxy form (or origin form with Host, for inbound) on a new
/// connection; never waits more than 10 s, so a hang fails the test
/// instead of stalling it.
async fn call(addr: SocketAddr, host: &str) -> Outcome {
    let start = Instant::now();
    let exchange = async {
        let mut send = h1_connect(addr).await;
        let req = Request::get(format!("http://{host}/fault"))
            .header("host", host)
            .body(full(""))
            .unwrap();
        match send.send_request(req).await {
            Err(e) => Outcome {
                status: None,
                kind: String::new(),
                body: String::new(),
                body_error: Some(format!("no response: {e}")),
                elapsed: start.elapsed(),
            },
            Ok(rsp) => {
                let status = rsp.status();
                let kind = rsp
                    .headers()
                    .get("x-trellis-proxy-error")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let (body, body_error) = match rsp.into_body().collect().await {
                    Ok(b) => (String::from_utf8_lossy(&b.to_bytes()).into_owned(), None),
                    Err(e) => (String::new(), Some(e.to_string())),
                };
                Outcome {
                    status: Some(status),
                    kind,
                    body,
                    body_error,
                    elapsed: start.elapsed(),
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer from {addr} for {host} within 10 s"))
}

/// Asserts a proxy error: `status`, kind, a body naming `service` and
/// containing `what`, well within the timeout.
fn assert_clear_error(o: &Outcome, status: StatusCode, kind: &str, service: &str, what: &str) {
    assert_eq!(
        o.status,
        Some(status),
        "{service}: body {:?}, error {:?}",
        o.body,
        o.body_error
    );
    assert_eq!(o.kind, kind, "{service}: {}", o.body);
    assert!(
        o.body.contains(service) && o.body.contains(what),
        "{service}: the body must name the service and say {what:?}: {}",
        o.body
    );
    assert!(
        o.elapsed < TIMEOUT,
        "{service}: a fast failure took {:?}",
        o.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_fault_is_a_timely_clear_error() {
    let app = upstream("app").await;
    let (close, hang, mid_head, garbage, endless, trickle) = (
        faulty(Fault::CloseAfterHead).await,
        faulty(Fault::Hang).await,
        faulty(Fault::ResetMidHead).await,
        faulty(Fault::Garbage).await,
        faulty(Fault::EndlessHead).await,
        faulty(Fault::Trickle).await,
    );
    let sc = sidecar_with(
        app.addr.port(),
        &[
            ("dead", dead_addr()),
            ("closer", close.addr),
            ("hang", hang.addr),
            ("midhead", mid_head.addr),
            ("garbage", garbage.addr),
            ("endless", endless.addr),
            ("trickle", trickle.addr),
        ],
    )
    .await;
    let out = sc.outbound;

    let o = call(out, "dead").await;
    assert_clear_error(
        &o,
        StatusCode::BAD_GATEWAY,
        "upstream-failed",
        "dead",
        "connect",
    );
    eprintln!("dead upstream: 502 in {:?}: {}", o.elapsed, o.body.trim());

    let o = call(out, "closer").await;
    assert_clear_error(
        &o,
        StatusCode::BAD_GATEWAY,
        "upstream-failed",
        "closer",
        "closed",
    );
    eprintln!(
        "closed mid-request: 502 in {:?}: {}",
        o.elapsed,
        o.body.trim()
    );

    let o = call(out, "midhead").await;
    assert_clear_error(
        &o,
        StatusCode::BAD_GATEWAY,
        "upstream-failed",
        "midhead",
        "failed",
    );
    eprintln!("reset mid-head: 502 in {:?}: {}", o.elapsed, o.body.trim());

    let o = call(out, "garbage").await;
    assert_clear_error(
        &o,
        StatusCode::BAD_GATEWAY,
        "upstream-failed",
        "garbage",
        "invalid HTTP",
    );
    eprintln!("garbage: 502 in {:?}: {}", o.elapsed, o.body.trim());

    let o = call(out, "endless").await;
    assert_clear_error(
        &o,
        StatusCode::BAD_GATEWAY,
        "upstream-failed",
        "endless",
        "too large",
    );
    eprintln!("endless head: 502 in {:?}: {}", o.elapsed, o.body.trim());

    // The silent ones: the overall timeout answers, on time, and the
    // sidecar lets go of the upstream connection.
    for (name, up) in [("hang", &hang), ("trickle", &trickle)] {
        let o = call(out, name).await;
        assert_eq!(o.status, Some(StatusCode::GATEWAY_TIMEOUT), "{}", o.body);
        assert_eq!(o.kind, "timeout");
        assert!(
            o.body.contains(name) && o.body.contains("overall timeout"),
            "{}",
            o.body
        );
        assert!(
            o.elapsed >= TIMEOUT && o.elapsed < TIMEOUT + Duration::from_secs(1),
            "{name}: 504 after {:?} with a {TIMEOUT:?} timeout",
            o.elapsed
        );
        eprintln!("{name}: 504 in {:?}: {}", o.elapsed, o.body.trim());
        assert!(
            eventually(Duration::from_secs(3), || async { up.open() == 0 }).await,
            "{name}: the sidecar kept {} upstream connection(s) open after giving up",
            up.open()
        );
    }
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_body_cuts_the_callers_body_instead_of_completing_it() {
    let app = upstream("app").await;
    let (body_reset, chunk_reset) = (
        faulty(Fault::ResetMidBody).await,
        faulty(Fault::ResetMidChunks).await,
    );
    let sc = sidecar_with(
        app.addr.port(),
        &[
            ("bodyreset", body_reset.addr),
            ("chunkreset", chunk_reset.addr),
        ],
    )
    .await;
    // The head (200) has gone to the caller before the reset, so the only
    // honest signal left is an incomplete body: the caller must see its
    // read fail promptly, never a short body that looks whole.
    for name in ["bodyreset", "chunkreset"] {
        let o = call(sc.outbound, name).await;
        assert_eq!(o.status, Some(StatusCode::OK), "{name}");
        let err = o
            .body_error
            .unwrap_or_else(|| panic!("{name}: a cut body read as complete: {:?}", o.body));
        assert!(
            o.elapsed < TIMEOUT,
            "{name}: the cut took {:?} to reach the caller",
            o.elapsed
        );
        eprintln!("{name}: body cut after {:?}: {err}", o.elapsed);
    }
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_faults_of_the_application_are_clear_errors() {
    // The application itself misbehaves: a caller of this service through
    // its inbound listener gets the same clear answers.
    for (fault, status, kind, what) in [
        (
            Fault::CloseAfterHead,
            StatusCode::BAD_GATEWAY,
            "upstream-failed",
            "closed",
        ),
        (
            Fault::Garbage,
            StatusCode::BAD_GATEWAY,
            "upstream-failed",
            "invalid HTTP",
        ),
        (Fault::Hang, StatusCode::GATEWAY_TIMEOUT, "timeout", "500ms"),
    ] {
        let app = faulty(fault).await;
        let sc = sidecar_with(app.addr.port(), &[]).await;
        let o = call(sc.inbound, "order").await;
        assert_eq!(o.status, Some(status), "{fault:?}: {}", o.body);
        assert_eq!(o.kind, kind, "{fault:?}");
        assert!(
            o.body.contains("order") && o.body.contains(what),
            "{fault:?}: {}",
            o.body
        );
        let bound = if fault == Fault::Hang {
            TIMEOUT + Duration::from_secs(1)
        } else {
            TIMEOUT
        };
        assert!(o.elapsed < bound, "{fault:?}: took {:?}", o.elapsed);
        eprintln!("inbound, app {fault:?}: {status} in {:?}", o.elapsed);
        sc.shutdown().await;
    }

    // A dead application: 502 naming the service, at once.
    let sc = sidecar_with(dead_addr().port(), &[]).await;
    let o = call(sc.inbound, "order").await;
    assert_eq!(o.status, Some(StatusCode::BAD_GATEWAY), "{}", o.body);
    assert!(
        o.body.contains("order") && o.body.contains("connect"),
        "{}",
        o.body
    );
    assert!(o.elapsed < TIMEOUT, "took {:?}", o.elapsed);
    sc.shutdown().await;
}

// --- Memory and file descriptors of the real binary under faults ---

fn proc_status(pid: u32, field: &str) -> u64 {
    proc_status_kib(pid, field).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Sends `total` GETs spread round-robin over `services`, from
/// `concurrency` callers that each keep one connection (reconnecting when
/// the sidecar had to close it, after a cut body). Returns how many
/// answers were errors the proxy wrote (502/504) and how many bodies were cut.
async fn fault_load(
    outbound: SocketAddr,
    services: &'static [&'static str],
    total: usize,
    concurrency: usize,
) -> (usize, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let (mut proxy_errors, mut cut) = (0, 0);
            let mut conn = None;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return (proxy_errors, cut);
                }
                let service = services[i % services.len()];
                if conn.is_none() {
                    conn = Some(h1_connect(outbound).await);
                }
                let send = conn.as_mut().unwrap();
                let req = Request::get(format!("http://{service}/load"))
                    .header("host", service)
                    .body(full(""))
                    .unwrap();
                let ok = async {
                    send.ready().await.ok()?;
                    let rsp = send.send_request(req).await.ok()?;
                    let status = rsp.status();
                    let body = rsp.into_body().collect().await;
                    Some((status, body.is_ok()))
                };
                match tokio::time::timeout(Duration::from_secs(10), ok).await {
                    Ok(Some((status, true))) => {
                        assert!(
                            status == StatusCode::BAD_GATEWAY
                                || status == StatusCode::GATEWAY_TIMEOUT,
                            "{service}: {status}"
                        );
                        proxy_errors += 1;
                    }
                    Ok(Some((_, false))) | Ok(None) => {
                        cut += 1;
                        conn = None;
                    }
                    Err(_) => panic!("{service}: no answer within 10 s"),
                }
            }
        }));
    }
    let mut totals = (0, 0);
    for w in workers {
        let (e, c) = w.await.unwrap();
        totals.0 += e;
        totals.1 += c;
    }
    totals
}

/// The sidecar's memory stays flat over thousands of faulty requests: RSS
/// and open file descriptors of the binary after a warm-up, then after
/// 10 000 more requests to every kind of fault. The bound is generous (the
/// allocator keeps what it once used; a leak of even a few hundred bytes
/// per request would cross it); the figures are printed for
/// docs/reliability.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_file_descriptors_stay_flat_under_faults() {
    let app = upstream("app").await;
    let ups = [
        ("closer", faulty(Fault::CloseAfterHead).await.addr),
        ("hang", faulty(Fault::Hang).await.addr),
        ("midhead", faulty(Fault::ResetMidHead).await.addr),
        ("bodyreset", faulty(Fault::ResetMidBody).await.addr),
        ("chunkreset", faulty(Fault::ResetMidChunks).await.addr),
        ("garbage", faulty(Fault::Garbage).await.addr),
        ("endless", faulty(Fault::EndlessHead).await.addr),
        ("dead", dead_addr()),
    ];
    const SERVICES: &[&str] = &[
        "closer",
        "hang",
        "midhead",
        "bodyreset",
        "chunkreset",
        "garbage",
        "endless",
        "dead",
    ];
    let endpoints: Vec<String> = ups.iter().map(|(n, a)| format!("{n}={a}")).collect();
    let sc = sidecar_process(
        &faults_policy(app.addr.port(), "100ms", "100ms"),
        &endpoints.join(";"),
        &["--outlier-consecutive-failures", "0", "--log", "error"],
        Stdio::null(),
    )
    .await;
    let pid = sc.child.id();

    let concurrency = 32;
    // Warm-up: pools, buffers and the allocator's arenas reach their working size.
    let (warm_errors, warm_cut) = fault_load(sc.outbound, SERVICES, 2_000, concurrency).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, fds_before) = (proc_status(pid, "VmRSS:"), open_fds(pid));

    let n = 10_000;
    let start = Instant::now();
    let (errors, cut) = fault_load(sc.outbound, SERVICES, n, concurrency).await;
    let took = start.elapsed();
    // Let the last hung upstream connections be dropped and idle ones expire.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_after, fds_after) = (proc_status(pid, "VmRSS:"), open_fds(pid));
    let hwm = proc_status(pid, "VmHWM:");
    eprintln!(
        "faulty requests: warm-up 2000 ({warm_errors} proxy errors, {warm_cut} cut bodies); \
         then {n} in {took:.2?} ({errors} proxy errors, {cut} cut bodies) at concurrency {concurrency}; \
         RSS {:.1} MiB -> {:.1} MiB ({:+} KiB, peak {:.1} MiB); open fds {fds_before} -> {fds_after}",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        rss_after as i64 - rss_before as i64,
        hwm as f64 / 1024.0,
    );
    assert_eq!(errors + cut, n, "every request got an answer or a cut body");
    // 10 000 requests: 8 MiB of growth would be ~800 bytes kept per request.
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {n} faulty requests"
    );
    // The callers' connections and pooled upstream ones come and go; a
    // leaked connection per fault would be thousands.
    assert!(
        fds_after <= fds_before + 2 * concurrency,
        "open file descriptors grew from {fds_before} to {fds_after}"
    );
}
