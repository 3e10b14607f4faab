//! The inbound listener's limits through a real sidecar in front of a test
//! application: the rate limit (429 with Retry-After), the concurrency
//! limit (503 at once, not queued) and the inbound timeout (504).

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use http::{Request, StatusCode};
use serde_json::json;
use support::*;
use trellis_sidecar::Running;

/// A GET of `path` for `order` through the sidecar's inbound listener.
async fn inbound_get(sc: &Running, path: &str) -> Answer {
    let req = Request::get(path)
        .header("host", "order")
        .body(full(""))
        .unwrap();
    h1(sc.inbound, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_rate_limit_holds_its_rate_under_twice_the_load() {
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
