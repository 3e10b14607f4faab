//! Outlier ejection through a real sidecar: an endpoint that times out, and
//! one that fails fast (and so looks cheap to the balancer), are ejected
//! and the calls move to the others.

mod support;

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use support::*;
use trellis_sidecar::OutlierSettings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_is_ejected_and_traffic_moves() {
    let app = upstream("app").await;
    let slow = scripted(|_, _, _| Act::Delay(2000)).await;
    let fast1 = scripted(|_, _, _| Act::Status(200)).await;
    let fast2 = scripted(|_, _, _| Act::Status(200)).await;
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
    let bad = scripted(|_, _, _| Act::Status(500)).await;
    let good1 = scripted(|_, _, _| Act::Delay(2)).await;
    let good2 = scripted(|_, _, _| Act::Delay(2)).await;
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
