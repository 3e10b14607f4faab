//! Destinations outside the mesh through the outbound listener: forwarded by
//! DNS under `egress: Allow` (the default), refused at once naming the host
//! under `Deny`, and a name that does not resolve answered promptly with
//! the host in the error. Targets are loopback only: `localhost`, `127.0.0.1`,
//! and names under `.invalid`, which never resolve (RFC 6761).

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::{get, get_via, policy, sidecar, upstream};

#[tokio::test]
async fn a_host_outside_the_mesh_is_forwarded_by_dns() {
    let app = upstream("app").await;
    let outside = upstream("outside").await;
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[],
    )
    .await;
    let port = outside.addr.port();

    // An IP address, and `localhost`: a name that is no Service, resolved by DNS.
    for url in [
        format!("http://127.0.0.1:{port}/x"),
        format!("http://localhost:{port}/y"),
    ] {
        let a = get_via(sc.outbound, &url).await;
        assert_eq!(a.status, StatusCode::OK, "{url}: {}", a.text());
        assert_eq!(a.server(), "outside", "{url}");
    }
    assert_eq!(outside.hits(), 2);

    let m = get(sc.admin, "/metrics").await.text();
    for line in [
        r#"trellis_requests_total{direction="outbound",service="egress:127.0.0.1",status_class="2xx"} 1"#,
        r#"trellis_requests_total{direction="outbound",service="egress:localhost",status_class="2xx"} 1"#,
    ] {
        assert!(m.contains(line), "missing {line}\n{m}");
    }
}

#[tokio::test]
async fn a_host_that_does_not_resolve_gets_a_prompt_502_naming_it() {
    let app = upstream("app").await;
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[],
    )
    .await;
    // `example.invalid` reads as Service `example` in namespace `invalid`,
    // which this sidecar may not read: outside the mesh, so no discovery.
    let started = Instant::now();
    let a = get_via(sc.outbound, "http://example.invalid/").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert_eq!(a.headers["x-trellis-proxy-error"], "egress-unresolved");
    assert!(a.text().contains("\"example.invalid\""), "{}", a.text());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered within the default 2 s timeout, took {:?}",
        started.elapsed()
    );
    // Still ready: the name was never a dependency.
    assert_eq!(get(sc.admin, "/readyz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn egress_deny_refuses_at_once_naming_the_host() {
    let app = upstream("app").await;
    let outside = upstream("outside").await;
    let (sc, _) = sidecar(
        &policy(
            "order",
            app.addr.port(),
            serde_json::json!({"egress": "Deny"}),
        ),
        &[],
    )
    .await;
    let url = format!("http://127.0.0.1:{}/x", outside.addr.port());
    let a = get_via(sc.outbound, &url).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    assert_eq!(a.headers["x-trellis-proxy-error"], "egress-denied");
    assert!(a.text().contains("\"127.0.0.1\""), "{}", a.text());
    assert!(a.text().contains("spec.dependencies"), "{}", a.text());
    let a = get_via(sc.outbound, "http://example.invalid/").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    assert_eq!(outside.hits(), 0);
}

/// A declared dependency that has no Service is the mesh's problem, not
/// egress: 503 naming it, never forwarded by DNS.
#[tokio::test]
async fn a_declared_dependency_is_never_egress() {
    let app = upstream("app").await;
    let deps = serde_json::json!({"dependencies": [{"name": "localhost"}]});
    let (sc, _) = sidecar(&policy("order", app.addr.port(), deps), &[]).await;
    let a = get_via(
        sc.outbound,
        &format!("http://localhost:{}/", app.addr.port()),
    )
    .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert_eq!(a.headers["x-trellis-proxy-error"], "unknown-service");
    assert_eq!(app.hits(), 0);
}
