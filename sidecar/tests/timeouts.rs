//! Outbound timeouts through a real sidecar: a 504 says whether the
//! per-try or the overall timeout fired, and a reloaded policy changes the
//! timeouts live.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_504_says_which_timeout_fired() {
    let app = upstream("app").await;
    let up = scripted(|_, _, _| Act::Delay(1000)).await;
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
