//! Retries through a real sidecar against scripted upstreams on loopback:
//! how many tries a call gets against spread-out and independent failures,
//! the retry budget's bound on an upstream that always fails, which methods
//! and bodies are replayed, Retry-After on a 429 against the deadline, and
//! retry settings changed live.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use serde_json::json;
use support::*;
use trellis_sidecar::Running;

/// Held by the tests that generate load, so that they take turns on the CPU
/// instead of sharing it.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One `method` call for `dep` through the outbound listener, with the
/// header `extra` when given and `body`.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_503_is_seen_as_success_with_three_attempts() {
    let _heavy = HEAVY.lock().await;
    let app = upstream("app").await;
    // Exactly 3 of every 10 requests the upstream receives fail, spread out
    // (the 2nd, 5th and 8th of each ten).
    let up = scripted(|n, _, _| {
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
    let up = scripted(|_, _, _| {
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
    let up = scripted(|_, _, _| Act::Status(503)).await;
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
    let up = scripted(first_try_fails()).await;
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
    let up = scripted(first_try_fails()).await;
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
    let up = scripted(|n, _, _| {
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
    let up = scripted(|_, _, _| Act::WithHeader(429, "retry-after", "5")).await;
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
async fn retry_settings_change_live() {
    let app = upstream("app").await;
    let up = scripted(|_, _, _| Act::Status(503)).await;
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
