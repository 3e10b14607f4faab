//! Retries, budgets, breakers, timeouts, outlier ejection and inbound
//! limits, through a real sidecar against fault-injecting upstreams on
//! loopback.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::json;
use support::*;
use tokio::net::TcpListener;
use trellis_sidecar::{Config, Discovery, Running, resilience::outlier::OutlierSettings};

/// What a fault-injecting upstream does with its n-th request (from 0).
enum Act {
    Status(u16),
    WithHeader(u16, &'static str, &'static str),
    /// Accept the request and never answer.
    Hang,
    /// Answer 200 after this long.
    Delay(u64),
}

#[derive(Clone)]
struct Fault {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Fault {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

type Handler = Arc<dyn Fn(usize, &http::request::Parts, &Bytes) -> Act + Send + Sync>;

/// An upstream that does what `f` says with each request; its answer's
/// body is `n=<request number> len=<body length>`.
async fn fault(
    f: impl Fn(usize, &http::request::Parts, &Bytes) -> Act + Send + Sync + 'static,
) -> Fault {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Fault {
        addr: listener.local_addr().unwrap(),
        hits: Arc::default(),
    };
    let handler: Handler = Arc::new(f);
    let hits = up.hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (handler, hits) = (handler.clone(), hits.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (handler, hits) = (handler.clone(), hits.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let n = hits.fetch_add(1, Ordering::SeqCst);
                        let (status, header) = match handler(n, &parts, &body) {
                            Act::Status(s) => (s, None),
                            Act::WithHeader(s, k, v) => (s, Some((k, v))),
                            Act::Hang => {
                                futures::future::pending::<()>().await;
                                unreachable!()
                            }
                            Act::Delay(ms) => {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                (200, None)
                            }
                        };
                        let mut rsp = Response::new(full(format!("n={n} len={}", body.len())));
                        *rsp.status_mut() = StatusCode::from_u16(status).unwrap();
                        if let Some((k, v)) = header {
                            rsp.headers_mut().insert(k, v.parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(rsp)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    up
}

/// A sidecar for service `order` whose dependency `dep` is at `dep`, with
/// `resilience` as the policy's defaults and `extra` merged into the policy.
async fn sidecar_for(
    app: &Upstream,
    dep: &[SocketAddr],
    resilience: serde_json::Value,
    extra: serde_json::Value,
    outlier: OutlierSettings,
) -> (Running, std::path::PathBuf) {
    let mut p = json!({"resilience": resilience});
    if let (Some(p), serde_json::Value::Object(extra)) = (p.as_object_mut(), extra) {
        p.extend(extra);
    }
    let text = policy("order", app.addr.port(), p);
    let path = temp_path("policy.json");
    std::fs::write(&path, &text).unwrap();
    let mut cfg = Config::local(Some(path.clone()));
    cfg.discovery = Discovery::Static {
        endpoints: [("dep".to_owned(), dep.to_vec())].into_iter().collect(),
        file: None,
    };
    cfg.outlier = outlier;
    (trellis_sidecar::start(cfg).await.unwrap(), path)
}

/// Held by the tests that generate load and the one that measures latency,
/// so a latency bound is not measured while another test hammers the CPU.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One kept-alive HTTP/1.1 connection to the outbound listener.
async fn connection(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

fn no_ejection() -> OutlierSettings {
    OutlierSettings {
        consecutive_failures: 0,
        ..OutlierSettings::default()
    }
}

/// A breaker that never trips, so a test is about something else.
fn no_breaker() -> serde_json::Value {
    json!({"consecutiveFailures": 10000, "failureRatio": 1.0, "minRequests": 100000})
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(sc: &Running) -> String {
    get(sc.admin, "/metrics").await.text()
}

async fn send(
    sc: &Running,
    method: &str,
    extra: Option<(&str, &str)>,
    body: &'static str,
) -> Answer {
    let mut b = Request::builder()
        .method(method)
        .uri("http://dep/x")
        .header("host", "dep");
    if let Some((k, v)) = extra {
        b = b.header(k, v);
    }
    h1(sc.outbound, b.body(full(body)).unwrap()).await
}

/// Sends `total` GETs with `concurrency` callers; returns the answers' statuses.
async fn load(sc: &Running, total: usize, concurrency: usize) -> Vec<StatusCode> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, outbound) = (next.clone(), sc.outbound);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total {
                got.push(get_via(outbound, "http://dep/x").await.status);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn ok_share(statuses: &[StatusCode]) -> f64 {
    statuses.iter().filter(|s| **s == StatusCode::OK).count() as f64 / statuses.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_503_is_seen_as_success_with_three_attempts() {
    let _heavy = HEAVY.lock().await;
    let app = upstream("app").await;
    // Exactly 3 of every 10 requests the upstream receives fail, spread out
    // (the 2nd, 5th and 8th of each ten).
    let up = fault(|n, _, _| {
        if [1, 4, 7].contains(&(n % 10)) {
            Act::Status(503)
        } else {
            Act::Status(200)
        }
    })
    .await;
    let res = json!({
        "retry": {
            "attempts": 3,
            "backoff": {"base": "1ms", "max": "5ms"},
            "budget": {"ratio": 1.0, "minPerSecond": 10000},
        },
        "circuitBreaker": no_breaker(),
    });
    let (sc, _) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;
    let statuses = load(&sc, 2000, 1).await;
    let share = ok_share(&statuses);
    let hits = up.hits();
    eprintln!(
        "30% 503, sequential: success {:.4}, upstream hits {hits}",
        share
    );
    assert!(share >= 0.999, "success {share}");
    // Each failure cost one more try: ~2000 / 0.7.
    assert!((2700..=3000).contains(&hits), "{hits}");
    let m = metrics(&sc).await;
    let retries = metric(
        &m,
        "trellis_retries_total{service=\"dep.default\",reason=\"5xx\"}",
    );
    assert_eq!(retries as usize, hits - 2000, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_thirty_percent_503_with_three_attempts_fails_only_when_all_three_do() {
    let _heavy = HEAVY.lock().await;
    // Independent failures: a call fails only if all 3 tries do, 0.3³ = 2.7%,
    // so the caller sees about 97.3% (99.9% would take 6 attempts).
    let app = upstream("app").await;
    let up = fault(|_, _, _| {
        if rand::random::<f64>() < 0.3 {
            Act::Status(503)
        } else {
            Act::Status(200)
        }
    })
    .await;
    let res = json!({
        "retry": {
            "attempts": 3,
            "backoff": {"base": "1ms", "max": "5ms"},
            "budget": {"ratio": 1.0, "minPerSecond": 10000},
        },
        "circuitBreaker": no_breaker(),
    });
    let (sc, _) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;
    let statuses = load(&sc, 2000, 8).await;
    let share = ok_share(&statuses);
    let failed = statuses.iter().filter(|s| **s != StatusCode::OK).count();
    eprintln!(
        "random 30% 503, concurrency 8: success {share:.4} ({failed} of 2000 failed), upstream hits {}",
        up.hits()
    );
    // Each try draws its own outcome, so the failed calls are exactly
    // Binomial(2000, 0.027): mean 54, sd 7.2. The bounds are its 2.4e-10
    // and 2.7e-10 tails (P(X <= 15), P(X >= 105)): success between 0.948
    // and 0.992, where one attempt would give 0.70 and none failing 1.0.
    assert!(failed <= 104, "success {share}");
    assert!(
        failed >= 16,
        "independent failures cannot be hidden this well: {share}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_gets_no_more_than_the_budget_allows() {
    let _heavy = HEAVY.lock().await;
    let app = upstream("app").await;
    let up = fault(|_, _, _| Act::Status(503)).await;
    let res = json!({
        "retry": {
            "attempts": 3,
            "backoff": {"base": "1ms", "max": "2ms"},
            "budget": {"ratio": 0.2, "minPerSecond": 10},
        },
        "circuitBreaker": no_breaker(),
    });
    let (sc, _) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;
    let start = Instant::now();
    let originals = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (originals, outbound) = (originals.clone(), sc.outbound);
        tasks.push(tokio::spawn(async move {
            // At least 2 s, and at least 250 calls however slow the machine.
            while start.elapsed() < Duration::from_secs(2) || originals.load(Ordering::SeqCst) < 250
            {
                let a = get_via(outbound, "http://dep/x").await;
                assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
                originals.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let (n, hits) = (originals.load(Ordering::SeqCst), up.hits());
    // (1 + ratio) × originals + floor × seconds, plus the floor's first
    // second (the bucket starts full) and a little slack.
    let bound = 1.2 * n as f64 + 10.0 * secs + 10.0 + 5.0;
    eprintln!(
        "100% 503 for {secs:.2}s: {n} calls, {hits} upstream requests, bound {bound:.0}, unbudgeted {}",
        3 * n
    );
    // The bound must sit well below what no budget would allow (3 tries a
    // call); with at least 250 calls it does unless they took over 35 s.
    assert!(
        bound < 2.7 * n as f64,
        "too few calls in {secs:.1}s to say anything: {n}"
    );
    assert!((hits as f64) <= bound, "{hits} > {bound}");
    assert!(hits > n, "retries should still happen within the budget");
    let m = metrics(&sc).await;
    assert!(
        metric(
            &m,
            "trellis_retry_budget_exhausted_total{service=\"dep.default\"}"
        ) > 0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_opens_the_breaker_then_it_fails_fast_and_recovers() {
    let _heavy = HEAVY.lock().await;
    let app = upstream("app").await;
    let alive = Arc::new(AtomicBool::new(false));
    let up = {
        let alive = alive.clone();
        fault(move |_, _, _| {
            if alive.load(Ordering::SeqCst) {
                Act::Status(200)
            } else {
                Act::Hang
            }
        })
        .await
    };
    let open_for = Duration::from_secs(1);
    let res = json!({
        "timeout": "200ms",
        "retry": {"attempts": 1},
        "circuitBreaker": {
            "consecutiveFailures": 3,
            "openFor": "1s",
            "halfOpenRequests": 1,
            "interval": "1m",
        },
    });
    let (sc, _) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;

    // 3 timeouts in a row do not trip at consecutiveFailures: 3; the 4th does.
    let mut fourth_sent = Instant::now();
    for i in 0..4 {
        let start = Instant::now();
        fourth_sent = start;
        let a = get_via(sc.outbound, "http://dep/x").await;
        assert_eq!(
            a.status,
            StatusCode::GATEWAY_TIMEOUT,
            "try {i}: {}",
            a.text()
        );
        assert!(start.elapsed() >= Duration::from_millis(190));
        if i < 3 {
            let s = get(sc.admin, "/status").await.json();
            assert_eq!(
                s["dependencies"]["dep.default"]["circuitBreaker"]["state"],
                "closed",
                "after {}",
                i + 1
            );
        }
    }
    let opened = Instant::now();
    let status = get(sc.admin, "/status").await.json();
    assert_eq!(
        status["dependencies"]["dep.default"]["circuitBreaker"]["state"], "open",
        "{status}"
    );

    let mut conn = connection(sc.outbound).await;
    let mut took = Vec::new();
    // Only in the first half of openFor, so that no call can meet the
    // half-open probe however slowly the machine runs them.
    while took.len() < 200 && opened.elapsed() < open_for / 2 {
        let req = Request::get("http://dep/x")
            .header("host", "dep")
            .body(full(""))
            .unwrap();
        let start = Instant::now();
        conn.ready().await.unwrap();
        let rsp = conn.send_request(req).await.unwrap();
        took.push(start.elapsed());
        let (parts, body) = rsp.into_parts();
        let a = Answer {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
            trailers: None,
        };
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
        assert_eq!(a.headers["x-trellis-breaker"], "dep.default");
        assert_eq!(a.headers["x-trellis-proxy-error"], "circuit-open");
        assert!(a.text().contains("dep.default"), "{}", a.text());
    }
    took.sort();
    let p99 = took[(took.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "breaker open: {} calls, p50 {:?}, p99 {p99:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    // Failing fast means not waiting on the upstream: a call that did would
    // take the whole 200 ms timeout. Half of it tells the two apart and
    // leaves room for scheduling stalls on a busy machine (the open
    // breaker answers in well under a millisecond when the CPU is free).
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    assert_eq!(up.hits(), 4, "an open breaker sends nothing upstream");

    // The upstream comes back; the first call after openFor is the probe.
    alive.store(true, Ordering::SeqCst);
    let back = Instant::now();
    let recovered = loop {
        let a = get_via(sc.outbound, "http://dep/x").await;
        if a.status == StatusCode::OK {
            break Instant::now();
        }
        assert!(back.elapsed() < Duration::from_secs(5), "never recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "recovered {:?} after the upstream returned, {:?} after the breaker opened",
        recovered - back,
        recovered - opened
    );
    // The breaker opened when the 4th call timed out, no earlier than 190 ms
    // (as asserted above) after it was sent, and no later than `opened`.
    assert!(
        recovered - (fourth_sent + Duration::from_millis(190)) >= open_for,
        "closed before openFor"
    );
    // The probe goes with the first call after openFor, and the loop calls
    // every 10 ms: 500 ms of slack is for scheduling stalls, and still
    // tells this from a breaker that waits a second openFor.
    assert!(recovered - opened <= open_for + Duration::from_millis(500));
    let status = get(sc.admin, "/status").await.json();
    assert_eq!(
        status["dependencies"]["dep.default"]["circuitBreaker"]["state"], "closed",
        "{status}"
    );
    let m = metrics(&sc).await;
    for (from, to) in [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
    ] {
        let key = format!(
            "trellis_circuit_breaker_transitions_total{{service=\"dep.default\",from=\"{from}\",to=\"{to}\"}}"
        );
        assert_eq!(metric(&m, &key), 1.0, "{key}\n{m}");
    }
    assert!(
        m.contains("trellis_circuit_breaker_state{service=\"dep.default\",state=\"closed\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_is_ejected_and_traffic_moves() {
    let app = upstream("app").await;
    let slow = fault(|_, _, _| Act::Delay(2000)).await;
    let fast1 = fault(|_, _, _| Act::Status(200)).await;
    let fast2 = fault(|_, _, _| Act::Status(200)).await;
    let res = json!({
        "timeout": "2s",
        "perTryTimeout": "100ms",
        "retry": {"attempts": 3, "retryOn": ["timeout", "5xx"], "backoff": {"base": "1ms", "max": "2ms"},
                  "budget": {"ratio": 1.0, "minPerSecond": 1000}},
        "circuitBreaker": no_breaker(),
    });
    let outlier = OutlierSettings {
        consecutive_failures: 2,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(60),
    };
    let (sc, _) = sidecar_for(
        &app,
        &[slow.addr, fast1.addr, fast2.addr],
        res,
        json!({}),
        outlier,
    )
    .await;
    let statuses = load(&sc, 200, 4).await;
    assert_eq!(
        ok_share(&statuses),
        1.0,
        "every call ends on a fast endpoint"
    );
    eprintln!(
        "slow endpoint: {} of {} tries; fast: {} and {}",
        slow.hits(),
        slow.hits() + fast1.hits() + fast2.hits(),
        fast1.hits(),
        fast2.hits()
    );
    let status = get(sc.admin, "/status").await.json();
    let eps = status["dependencies"]["dep.default"]["endpoints"]
        .as_array()
        .unwrap()
        .clone();
    let slow_ep = eps
        .iter()
        .find(|e| e["endpoint"] == slow.addr.to_string())
        .unwrap();
    assert_eq!(slow_ep["ejected"], true, "{status}");
    assert!(
        eps.iter().filter(|e| e["ejected"] == true).count() == 1,
        "{status}"
    );
    let m = metrics(&sc).await;
    assert_eq!(
        metric(
            &m,
            "trellis_outlier_ejections_total{service=\"dep.default\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "trellis_outlier_ejected_endpoints{service=\"dep.default\"}"
        ),
        1.0,
        "{m}"
    );
    // Ejected after 2 timeouts; a few more tries may have been picked before.
    assert!(slow.hits() <= 6, "{}", slow.hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_failing_endpoint_is_ejected_though_it_looks_cheap_to_the_balancer() {
    let app = upstream("app").await;
    let bad = fault(|_, _, _| Act::Status(500)).await;
    let good1 = fault(|_, _, _| Act::Delay(2)).await;
    let good2 = fault(|_, _, _| Act::Delay(2)).await;
    let res = json!({"retry": {"attempts": 1}, "circuitBreaker": no_breaker()});
    let outlier = OutlierSettings {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(60),
    };
    let (sc, _) = sidecar_for(
        &app,
        &[bad.addr, good1.addr, good2.addr],
        res,
        json!({}),
        outlier,
    )
    .await;
    let statuses = load(&sc, 300, 4).await;
    let failed = statuses.iter().filter(|s| **s != StatusCode::OK).count();
    eprintln!(
        "fast-failing endpoint: {failed} of 300 calls failed; it got {} tries",
        bad.hits()
    );
    // Without ejection p2c would send it a third or more (its 500s are fast).
    assert!(failed <= 3 + 4, "{failed}");
    assert_eq!(failed, bad.hits());
}

/// Fails the first request with each body (so the first try of each call)
/// and answers any later one.
fn first_try_fails() -> impl Fn(usize, &http::request::Parts, &Bytes) -> Act + Send + Sync + 'static
{
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    move |_, _, body| {
        if seen.lock().unwrap().insert(body.clone()) {
            Act::Status(503)
        } else {
            Act::Status(200)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_retried_only_when_marked_retryable() {
    let app = upstream("app").await;
    let up = fault(first_try_fails()).await;
    let res = json!({"retry": {"attempts": 3, "backoff": {"base": "1ms", "max": "2ms"}},
                     "circuitBreaker": no_breaker()});
    let (sc, _) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;

    let a = send(&sc, "POST", None, "order #1").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.hits(), 1, "a POST is not retried");

    let a = send(
        &sc,
        "POST",
        Some(("x-trellis-retryable", "true")),
        "order #2",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(up.hits(), 3);
    assert_eq!(a.text(), "n=2 len=8", "the body was replayed whole");

    let a = send(&sc, "PUT", None, "idempotent").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.hits(), 5, "PUT is idempotent");
    assert_eq!(a.text(), "n=4 len=10");

    let a = send(&sc, "DELETE", None, "").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.hits(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_max_replay_bytes_is_sent_once() {
    let app = upstream("app").await;
    let up = fault(first_try_fails()).await;
    let res = json!({"retry": {"attempts": 3, "maxReplayBytes": 4, "backoff": {"base": "1ms", "max": "2ms"}},
                     "circuitBreaker": no_breaker()});
    let (sc, _) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;
    let a = send(&sc, "PUT", None, "12345").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.hits(), 1);
    let a = send(&sc, "PUT", None, "1234").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_429_is_honoured() {
    let app = upstream("app").await;
    let up = fault(|n, _, _| {
        if n == 0 {
            Act::WithHeader(429, "retry-after", "1")
        } else {
            Act::Status(200)
        }
    })
    .await;
    let res = json!({"timeout": "3s", "retry": {"attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}},
                     "circuitBreaker": no_breaker()});
    let (sc, _) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;
    let start = Instant::now();
    let a = get_via(sc.outbound, "http://dep/x").await;
    let took = start.elapsed();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(up.hits(), 2);
    assert!(
        took >= Duration::from_secs(1),
        "retried after {took:?}, before Retry-After"
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_deadline_returns_the_429_at_once() {
    let app = upstream("app").await;
    let up = fault(|_, _, _| Act::WithHeader(429, "retry-after", "5")).await;
    let res = json!({"timeout": "1s", "circuitBreaker": no_breaker()});
    let (sc, _) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;
    let start = Instant::now();
    let a = get_via(sc.outbound, "http://dep/x").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["retry-after"], "5");
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_504_says_which_timeout_fired() {
    let app = upstream("app").await;
    let up = fault(|_, _, _| Act::Delay(1000)).await;
    let res = json!({"timeout": "800ms", "perTryTimeout": "100ms", "retry": {"attempts": 1},
                     "circuitBreaker": no_breaker()});
    let (sc, path) = sidecar_for(&app, &[up.addr], res, json!({}), no_ejection()).await;
    let start = Instant::now();
    let a = get_via(sc.outbound, "http://dep/x").await;
    let took = start.elapsed();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.headers["x-trellis-proxy-error"], "per-try-timeout");
    assert!(a.text().contains("per-try timeout"), "{}", a.text());
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(600),
        "{took:?}"
    );

    // A live reload: no per-try timeout, a shorter overall one.
    let generation = sc.policy.current().generation;
    let text = policy(
        "order",
        app.addr.port(),
        json!({"resilience": {"timeout": "150ms", "retry": {"attempts": 1}, "circuitBreaker": no_breaker()}}),
    );
    std::fs::write(&path, text).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            sc.policy.current().generation > generation
        })
        .await
    );
    let start = Instant::now();
    let a = get_via(sc.outbound, "http://dep/x").await;
    let took = start.elapsed();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.headers["x-trellis-proxy-error"], "timeout");
    assert!(a.text().contains("overall timeout"), "{}", a.text());
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(600),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_settings_change_live() {
    let app = upstream("app").await;
    let up = fault(|_, _, _| Act::Status(503)).await;
    let res = |attempts: u32| {
        json!({"retry": {"attempts": attempts, "backoff": {"base": "1ms", "max": "2ms"},
                          "budget": {"ratio": 1.0, "minPerSecond": 1000}},
               "circuitBreaker": no_breaker()})
    };
    let (sc, path) = sidecar_for(&app, &[up.addr], res(1), json!({}), no_ejection()).await;
    for _ in 0..5 {
        get_via(sc.outbound, "http://dep/x").await;
    }
    assert_eq!(up.hits(), 5);
    let generation = sc.policy.current().generation;
    std::fs::write(
        &path,
        policy("order", app.addr.port(), json!({"resilience": res(3)})),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            sc.policy.current().generation > generation
        })
        .await
    );
    for _ in 0..5 {
        get_via(sc.outbound, "http://dep/x").await;
    }
    assert_eq!(up.hits(), 5 + 15);
}

async fn inbound_get(sc: &Running, path: &str) -> Answer {
    let req = Request::get(path)
        .header("host", "order")
        .body(full(""))
        .unwrap();
    h1(sc.inbound, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_rate_limit_holds_its_rate_under_twice_the_load() {
    let _heavy = HEAVY.lock().await;
    let app = upstream("app").await;
    let (rate, burst) = (50.0, 5.0);
    let inbound = json!({"inbound": {"rateLimit": {"perSecond": 50, "burst": 5}}});
    let (sc, _) = sidecar_for(&app, &[], json!({}), inbound, no_ejection()).await;
    let sc = Arc::new(sc);
    // 100 requests a second for 2 s, each on its own task and connection.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        tick.tick().await;
        let sc = sc.clone();
        tasks.push(tokio::spawn(async move {
            let a = inbound_get(&sc, "/x").await;
            (a, Instant::now())
        }));
    }
    let last_sent = Instant::now();
    let offered_for = (last_sent - start).as_secs_f64();
    let (mut ok, mut limited) = (0.0, 0.0);
    let (mut first_answer, mut last_answer) = (None::<Instant>, start);
    for t in tasks {
        let (a, at) = t.await.unwrap();
        first_answer = Some(first_answer.map_or(at, |f| f.min(at)));
        last_answer = last_answer.max(at);
        match a.status {
            StatusCode::OK => ok += 1.0,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1.0;
                assert_eq!(a.headers["x-trellis-proxy-error"], "rate-limited");
                assert_eq!(a.headers["retry-after"], "1");
            }
            s => panic!("unexpected {s}: {}", a.text()),
        }
    }
    let measured = (ok - burst) / offered_for;
    eprintln!(
        "rate limit {rate}/s, burst {burst}: offered {:.0}/s for {offered_for:.2}s, let through {ok} ({measured:.1}/s beyond the burst), refused {limited}",
        200.0 / offered_for
    );
    // The bucket took its first token after `start` and its last before
    // `last_answer`; starting full, it cannot have given more than the
    // burst plus the rate over that span. This holds exactly, however the
    // requests were scheduled.
    let outer = (last_answer - start).as_secs_f64();
    assert!(
        ok <= burst + rate * outer + 1.0,
        "{ok} let through in {outer:.2}s: more than {rate}/s after a burst of {burst}"
    );
    // Below: its first token went before the first answer and its last after
    // the last request was sent, and with twice the rate offered it only
    // wastes refill when no request comes for the 100 ms a full bucket
    // lasts. Requests go every 10 ms, so falling 10% short (10 tokens, 200 ms
    // of refill) would take the process stalled for over 300 ms.
    let inner = (last_sent - first_answer.unwrap()).as_secs_f64();
    assert!(
        ok >= 0.9 * rate * inner,
        "{ok} let through in {inner:.2}s: the limit held back more than {rate}/s"
    );
    let m = metrics(&sc).await;
    assert_eq!(
        metric(&m, "trellis_inbound_rate_limited_total{service=\"order\"}"),
        limited,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_concurrency_limit_sheds_with_503_at_once() {
    let app = upstream("app").await;
    let inbound = json!({"inbound": {"maxConcurrent": 2}});
    let (sc, _) = sidecar_for(&app, &[], json!({}), inbound, no_ejection()).await;
    let sc = Arc::new(sc);
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let sc = sc.clone();
            tokio::spawn(async move { inbound_get(&sc, "/slow?ms=600").await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(2), || async { app.hits() == 2 }).await,
        "the two slow calls reached the app"
    );
    for _ in 0..4 {
        let start = Instant::now();
        let a = inbound_get(&sc, "/x").await;
        let took = start.elapsed();
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
        assert_eq!(a.headers["x-trellis-proxy-error"], "overloaded");
        assert!(a.text().contains("concurrency limit (2)"), "{}", a.text());
        assert!(
            took < Duration::from_millis(300),
            "shed, not queued: {took:?}"
        );
    }
    for t in busy {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        inbound_get(&sc, "/x").await.status,
        StatusCode::OK,
        "permits come back"
    );
    let m = metrics(&sc).await;
    assert_eq!(
        metric(&m, "trellis_inbound_shed_total{service=\"order\"}"),
        4.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_timeout_answers_504() {
    let app = upstream("app").await;
    let inbound = json!({"inbound": {"timeout": "100ms"}});
    let (sc, _) = sidecar_for(&app, &[], json!({}), inbound, no_ejection()).await;
    let start = Instant::now();
    let a = inbound_get(&sc, "/slow?ms=2000").await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", a.text());
    assert!(start.elapsed() < Duration::from_millis(1000));
    assert_eq!(inbound_get(&sc, "/x").await.status, StatusCode::OK);
}

/// Every endpoint of a dependency gone (its pods deleted): the first calls
/// get "no ready endpoints" at once, the breaker counts them and opens, then
/// answers itself; when endpoints return, the probe after `openFor` closes it.
#[tokio::test]
async fn a_dependency_with_no_endpoints_trips_its_breaker_then_recovers() {
    let app = upstream("app").await;
    let dep = upstream("dep").await;
    let file = temp_path("endpoints.json");
    let serving = format!(r#"{{"dep": ["{}"]}}"#, dep.addr);
    std::fs::write(&file, &serving).unwrap();
    let ppath = temp_path("policy.json");
    let res = json!({
        "timeout": "2s",
        "circuitBreaker": {
            "consecutiveFailures": 3,
            "openFor": "1s",
            "halfOpenRequests": 1,
            "interval": "1m",
        },
    });
    std::fs::write(
        &ppath,
        policy("order", app.addr.port(), json!({"resilience": res})),
    )
    .unwrap();
    let mut cfg = Config::local(Some(ppath));
    cfg.discovery = Discovery::Static {
        endpoints: Default::default(),
        file: Some(file.clone()),
    };
    let sc = trellis_sidecar::start(cfg).await.unwrap();
    assert_eq!(
        get_via(sc.outbound, "http://dep/").await.status,
        StatusCode::OK
    );

    std::fs::write(&file, r#"{"dep": []}"#).unwrap();
    let outbound = sc.outbound;
    assert!(
        eventually(Duration::from_secs(3), || async move {
            get_via(outbound, "http://dep/")
                .await
                .headers
                .get("x-trellis-proxy-error")
                .is_some_and(|v| v == "no-endpoints")
        })
        .await,
        "the emptied endpoint set was never seen"
    );
    let hits_before = dep.hits();
    // The first refusal above counted once; more trip the breaker
    // (consecutiveFailures: 3 trips on the 4th), each answered at once.
    let mut kinds = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let a = get_via(sc.outbound, "http://dep/").await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
        assert!(start.elapsed() < Duration::from_millis(500));
        kinds.push(
            a.headers["x-trellis-proxy-error"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        kinds,
        [
            "no-endpoints",
            "no-endpoints",
            "no-endpoints",
            "circuit-open",
            "circuit-open"
        ],
        "no endpoints counts as the dependency failing"
    );
    let open = get_via(sc.outbound, "http://dep/").await;
    assert_eq!(open.headers["x-trellis-breaker"], "dep.default");

    std::fs::write(&file, &serving).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async move {
            get_via(outbound, "http://dep/").await.status == StatusCode::OK
        })
        .await,
        "the breaker never closed after the endpoints returned"
    );
    let status = get(sc.admin, "/status").await.json();
    assert_eq!(
        status["dependencies"]["dep.default"]["circuitBreaker"]["state"], "closed",
        "{status}"
    );
    assert_eq!(
        dep.hits(),
        hits_before + 1,
        "only the half-open probe reached the dependency after its endpoints went"
    );
}
