//! The circuit breaker through a real sidecar: a dependency whose upstream
//! hangs opens it after `consecutiveFailures` timeouts, calls then fail fast
//! without reaching the upstream, and the half-open probe after `openFor`
//! closes it; a dependency left with no endpoints trips it the same way.
//!
//! The fail-fast latency is measured with no load-generating test beside
//! it: those are in other files, and cargo runs one test binary at a time.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use support::*;
use trellis_sidecar::Discovery;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_opens_the_breaker_then_it_fails_fast_and_recovers() {
    let app = upstream("app").await;
    let alive = Arc::new(AtomicBool::new(false));
    let up = {
        let alive = alive.clone();
        scripted(move |_, _, _| {
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

    let mut conn = h1_connect(sc.outbound).await;
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
    let res = json!({
        "timeout": "2s",
        "circuitBreaker": {
            "consecutiveFailures": 3,
            "openFor": "1s",
            "halfOpenRequests": 1,
            "interval": "1m",
        },
    });
    let (sc, _) = sidecar_with_config(
        &policy("order", app.addr.port(), json!({"resilience": res})),
        &[],
        |cfg| {
            cfg.discovery = Discovery::Static {
                endpoints: Default::default(),
                file: Some(file.clone()),
            }
        },
    )
    .await;
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
