//! Health, readiness, metrics, status, policy reloads and draining.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::StatusCode;
use support::*;

#[tokio::test]
async fn readyz_follows_the_app_health_check() {
    let app = upstream("app").await;
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[],
    )
    .await;
    let admin = sc.admin;
    assert_eq!(get(admin, "/livez").await.status, StatusCode::OK);
    let ready = || async move { get(admin, "/readyz").await.status == StatusCode::OK };
    assert!(
        eventually(Duration::from_secs(3), ready).await,
        "never ready"
    );

    app.healthy.store(false, Ordering::SeqCst);
    let not_ready = || async move {
        let a = get(admin, "/readyz").await;
        a.status == StatusCode::SERVICE_UNAVAILABLE && a.text().contains("app: GET /health")
    };
    assert!(
        eventually(Duration::from_secs(3), not_ready).await,
        "stayed ready"
    );
    // Liveness does not follow the app: restarting the sidecar would not help it.
    assert_eq!(get(admin, "/livez").await.status, StatusCode::OK);

    app.healthy.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), ready).await,
        "did not recover"
    );
}

#[tokio::test]
async fn healthz_has_the_design_shape() {
    let app = upstream("app").await;
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[],
    )
    .await;
    let admin = sc.admin;
    assert!(
        eventually(Duration::from_secs(3), || async move {
            get(admin, "/healthz").await.status == StatusCode::OK
        })
        .await
    );
    let j = get(admin, "/healthz").await.json();
    assert_eq!(j["status"], "healthy");
    for check in ["listeners", "discovery", "app", "policy"] {
        let c = &j["checks"][check];
        assert_eq!(c["status"], "healthy", "{check}: {j}");
        assert!(c["duration"].is_string(), "{check}: {j}");
        assert!(c.get("error").is_none(), "{check}: {j}");
    }
    assert!(j["duration"].is_string());
    let ts = j["timestamp"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");

    app.healthy.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), || async move {
            let a = get(admin, "/healthz").await;
            let j = a.json();
            a.status == StatusCode::SERVICE_UNAVAILABLE
                && j["status"] == "unhealthy"
                && j["checks"]["app"]["status"] == "unhealthy"
                && j["checks"]["app"]["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("503")
        })
        .await
    );
}

#[tokio::test]
async fn a_bad_policy_is_refused_and_the_last_good_one_keeps_running() {
    let app = upstream("app").await;
    let other = upstream("other-app").await;
    let (sc, path) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[],
    )
    .await;
    let admin = sc.admin;
    assert_eq!(get(sc.inbound, "/").await.server(), "app");

    // Invalid: attempts out of range, and a bad port; both fields named.
    std::fs::write(
        &path,
        policy(
            "order",
            other.addr.port(),
            serde_json::json!({"resilience": {"retry": {"attempts": 0}}}),
        ),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async move {
            let j = get(admin, "/healthz").await.json();
            j["checks"]["policy"]["status"] == "unhealthy"
                && j["checks"]["policy"]["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("resilience.retry.attempts")
        })
        .await,
        "the refusal is not reported"
    );
    // Still the old policy: traffic still goes to the first app.
    assert_eq!(get(sc.inbound, "/").await.server(), "app");
    let status = get(admin, "/status").await.json();
    assert_eq!(status["policy"]["generation"], 1);
    assert_eq!(status["policy"]["current"]["appPort"], app.addr.port());
    assert!(status["policy"]["rejected"]["error"].is_string());
    let m = get(admin, "/metrics").await.text();
    assert!(
        m.contains(r#"trellis_policy_reloads_total{result="rejected"} 1"#),
        "{m}"
    );
    assert!(m.contains("trellis_policy_last_reload_ok 0"), "{m}");
    // Readiness does not drop for a refused policy: the good one still serves.
    assert_eq!(get(admin, "/readyz").await.status, StatusCode::OK);

    // Not JSON at all is refused the same way.
    std::fs::write(&path, "{").unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async move {
            get(admin, "/metrics")
                .await
                .text()
                .contains(r#"trellis_policy_reloads_total{result="rejected"} 2"#)
        })
        .await
    );

    // A good new policy applies live.
    std::fs::write(
        &path,
        policy("order", other.addr.port(), serde_json::json!({})),
    )
    .unwrap();
    let inbound = sc.inbound;
    assert!(
        eventually(Duration::from_secs(3), || async move {
            get(inbound, "/").await.server() == "other-app"
        })
        .await
    );
    let j = get(admin, "/healthz").await.json();
    assert!(j["checks"]["policy"].get("error").is_none(), "{j}");
    assert_eq!(
        get(admin, "/status").await.json()["policy"]["generation"],
        2
    );
}

#[tokio::test]
async fn policy_reload_under_load_fails_no_request() {
    let app = upstream("app").await;
    let user = upstream("user").await;
    let (sc, path) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[("user", &[user.addr])],
    )
    .await;
    let outbound = sc.outbound;
    // The load runs from before the first reload until after the last one
    // has applied, so every reload happens under it by construction.
    let done = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let done = done.clone();
        async move {
            let mut statuses = Vec::new();
            loop {
                let batch = (0..4).map(|_| get_via(outbound, "http://user/slow?ms=5"));
                statuses.extend(
                    futures::future::join_all(batch)
                        .await
                        .into_iter()
                        .map(|a| a.status),
                );
                if done.load(Ordering::SeqCst) {
                    return statuses;
                }
            }
        }
    });
    assert!(
        eventually(Duration::from_secs(10), || async { user.hits() > 0 }).await,
        "the load never started"
    );
    let status = || async { get(sc.admin, "/status").await.json() };
    for i in 0..10u64 {
        let timeout = format!("{}ms", 1000 + i);
        std::fs::write(
            &path,
            policy(
                "order",
                app.addr.port(),
                serde_json::json!({"resilience": {"timeout": timeout}}),
            ),
        )
        .unwrap();
        // Each policy is applied before the next is written: the file is
        // polled, so a write overtaken by the next one might never be seen.
        assert!(
            eventually(Duration::from_secs(10), || async {
                status().await["policy"]["generation"] == 2 + i
            })
            .await,
            "policy {} was never applied: {}",
            2 + i,
            status().await["policy"]
        );
    }
    done.store(true, Ordering::SeqCst);
    let statuses = load.await.unwrap();
    eprintln!("10 reloads under {} requests", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn metrics_count_requests_by_direction_service_and_class() {
    let app = upstream("app").await;
    let user = upstream("user").await;
    let deps = serde_json::json!({"dependencies": [{"name": "user"}, {"name": "nosuch"}]});
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), deps),
        &[("user", &[user.addr])],
    )
    .await;
    for _ in 0..5 {
        get_via(sc.outbound, "http://user/").await;
    }
    get_via(sc.outbound, "http://user/status/404").await;
    get_via(sc.outbound, "http://nosuch/").await;
    for _ in 0..2 {
        get(sc.inbound, "/").await;
    }
    let m = get(sc.admin, "/metrics").await.text();
    for line in [
        r#"trellis_requests_total{direction="outbound",service="user.default",status_class="2xx"} 5"#,
        r#"trellis_requests_total{direction="outbound",service="user.default",status_class="4xx"} 1"#,
        r#"trellis_requests_total{direction="outbound",service="nosuch.default",status_class="5xx"} 1"#,
        r#"trellis_proxy_errors_total{direction="outbound",service="nosuch.default",kind="unknown-service"} 1"#,
        r#"trellis_requests_total{direction="inbound",service="order",status_class="2xx"} 2"#,
        r#"trellis_request_duration_seconds_count{direction="outbound",service="user.default"} 6"#,
        r#"trellis_endpoints{service="user.default"} 1"#,
        "trellis_policy_generation 1",
    ] {
        assert!(m.contains(line), "missing {line}\n{m}");
    }
    assert!(m.contains("trellis_connections_active"), "{m}");
}

#[tokio::test]
async fn status_shows_policy_and_endpoints() {
    let app = upstream("app").await;
    let user = upstream("user").await;
    let (sc, _) = sidecar(
        &policy(
            "order",
            app.addr.port(),
            serde_json::json!({"dependencies": [{"name": "user"}]}),
        ),
        &[("user", &[user.addr])],
    )
    .await;
    let j = get(sc.admin, "/status").await.json();
    assert_eq!(j["policy"]["current"]["service"], "order");
    assert_eq!(j["discovery"]["user.default"]["state"], "known");
    assert_eq!(
        j["discovery"]["user.default"]["endpoints"][0],
        user.addr.to_string()
    );
    assert_eq!(get(sc.admin, "/nope").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let app = upstream("app").await;
    let user = upstream("user").await;
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[("user", &[user.addr])],
    )
    .await;
    let (outbound, admin) = (sc.outbound, sc.admin);
    // Slow enough that they are still in flight when checked below, with a
    // second of room for scheduling stalls.
    let in_flight: Vec<_> = (0..8)
        .map(|_| tokio::spawn(get_via(outbound, "http://user/slow?ms=1500")))
        .collect();
    // Shut down only once all 8 are in flight, however long they took to
    // get there.
    assert!(
        eventually(Duration::from_secs(10), || async { user.hits() == 8 }).await,
        "only {} of 8 requests reached the upstream",
        user.hits()
    );
    let drained = tokio::spawn(sc.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // While draining: not ready, and no new connections on the proxy.
    assert_eq!(
        get(admin, "/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(tokio::net::TcpStream::connect(outbound).await.is_err());
    assert!(
        !drained.is_finished(),
        "shutdown did not wait for in-flight requests"
    );
    for r in in_flight {
        let a = r.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.text(), "slow done");
    }
    tokio::time::timeout(Duration::from_secs(3), drained)
        .await
        .unwrap()
        .unwrap();
}
