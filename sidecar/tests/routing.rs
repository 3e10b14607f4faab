//! Outbound routing, discovery and balancing, through a real sidecar to
//! real upstreams on loopback.

mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use http::{Request, StatusCode};
use support::*;

#[tokio::test]
async fn proxy_form_and_host_routing_reach_the_named_service() {
    let user = upstream("user").await;
    let product = upstream("product").await;
    let app = upstream("app").await;
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[("user", &[user.addr]), ("product.other", &[product.addr])],
    )
    .await;

    // HTTP proxy form, as HTTP_PROXY makes clients send.
    let a = get_via(sc.outbound, "http://user/api/v1/users/1?x=1").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let j = a.json();
    assert_eq!(j["server"], "user");
    assert_eq!(j["path"], "/api/v1/users/1");
    // The upstream gets origin form and the original Host.
    assert_eq!(j["uri"], "/api/v1/users/1?x=1");
    assert_eq!(j["headers"]["host"][0], "user");

    // Every DNS form of a name, by Host.
    for host in [
        "product.other",
        "product.other.svc",
        "product.other.svc.cluster.local:8080",
    ] {
        let req = Request::get("/catalog")
            .header("host", host)
            .body(full(""))
            .unwrap();
        let a = h1(sc.outbound, req).await;
        assert_eq!(a.status, StatusCode::OK, "{host}: {}", a.text());
        assert_eq!(a.json()["server"], "product", "{host}");
    }
    // The bare name resolves in the pod's own namespace, not in `other`.
    let a = get_via(sc.outbound, "http://product/").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(a.text().contains("product.default"), "{}", a.text());
    assert_eq!(user.hits(), 1);
    assert_eq!(product.hits(), 3);
}

#[tokio::test]
async fn unknown_names_and_empty_services_get_a_fast_503_naming_them() {
    let app = upstream("app").await;
    // A declared dependency that does not exist (an undeclared one is a
    // destination outside the mesh: tests/egress.rs).
    let deps = serde_json::json!({"dependencies": [{"name": "nosuch"}]});
    let (sc, _) = sidecar(&policy("order", app.addr.port(), deps), &[("empty", &[])]).await;
    let start = Instant::now();
    let a = get_via(sc.outbound, "http://nosuch/x").await;
    let took = start.elapsed();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        a.text().contains("unknown service \"nosuch.default\""),
        "{}",
        a.text()
    );
    assert_eq!(a.headers["x-trellis-proxy-error"], "unknown-service");
    assert!(took < Duration::from_millis(200), "took {took:?}");

    let a = get_via(sc.outbound, "http://empty/x").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        a.text()
            .contains("\"empty.default\" has no ready endpoints"),
        "{}",
        a.text()
    );

    // No name at all, and a name that cannot be a Service.
    let a = h1(sc.outbound, Request::get("/x").body(full("")).unwrap()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    let a = get_via(sc.outbound, "http://a.b.c.d/").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
}

#[tokio::test]
async fn an_endpoint_that_refuses_connections_gives_502_naming_the_service() {
    let app = upstream("app").await;
    // Bind and drop: nothing listens there any more.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[("user", &[dead])],
    )
    .await;
    let a = get_via(sc.outbound, "http://user/").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert!(a.text().contains("user.default"), "{}", a.text());
}

async fn spread(outbound: SocketAddr, n: usize, concurrency: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n / concurrency {
        let batch = (0..concurrency).map(|_| get_via(outbound, "http://user/"));
        for a in futures::future::join_all(batch).await {
            assert_eq!(a.status, StatusCode::OK, "{}", a.text());
            *counts.entry(a.server()).or_default() += 1;
        }
    }
    counts
}

#[tokio::test]
async fn load_spreads_across_three_endpoints() {
    let app = upstream("app").await;
    let ups = [
        upstream("u1").await,
        upstream("u2").await,
        upstream("u3").await,
    ];
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[("user", &addrs)],
    )
    .await;
    let counts = spread(sc.outbound, 300, 10).await;
    for u in &ups {
        let n = counts.get(u.name).copied().unwrap_or(0);
        assert!(n >= 50, "{} got {n} of 300: {counts:?}", u.name);
    }
}

#[tokio::test]
async fn load_moves_away_from_a_slow_endpoint() {
    let app = upstream("app").await;
    let ups = [
        upstream("fast1").await,
        upstream("fast2").await,
        upstream("slow").await,
    ];
    // Well above the 30 ms a new endpoint is assumed to take, so peak-EWMA
    // tells it apart within the test's few hundred requests.
    ups[2].delay_ms.store(150, Ordering::SeqCst);
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[("user", &addrs)],
    )
    .await;
    let counts = spread(sc.outbound, 300, 6).await;
    let slow = counts.get("slow").copied().unwrap_or(0);
    eprintln!("spread with one slow endpoint: {counts:?}");
    // An even split would give it 100.
    assert!(slow < 45, "the slow endpoint got {slow} of 300: {counts:?}");
}

#[tokio::test]
async fn endpoint_changes_apply_live() {
    let app = upstream("app").await;
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let deps = serde_json::json!({"dependencies": [{"name": "user"}]});
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), deps),
        &[("user", &[a.addr])],
    )
    .await;
    assert_eq!(get_via(sc.outbound, "http://user/").await.server(), "a");

    let resolver = sc.static_endpoints().unwrap();
    resolver.set("user", [b.addr, c.addr]);
    // The change reaches the balancer with the next request.
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..60 {
        *seen
            .entry(get_via(sc.outbound, "http://user/").await.server())
            .or_default() += 1;
    }
    assert_eq!(seen.get("a"), None, "{seen:?}");
    assert!(seen["b"] > 10 && seen["c"] > 10, "{seen:?}");

    resolver.set("user", []);
    let r = get_via(sc.outbound, "http://user/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    resolver.remove("user");
    let r = get_via(sc.outbound, "http://user/").await;
    assert!(r.text().contains("unknown service"), "{}", r.text());

    resolver.set("user", [a.addr]);
    assert_eq!(get_via(sc.outbound, "http://user/").await.server(), "a");
    // The endpoints gauge follows.
    let m = get(sc.admin, "/metrics").await.text();
    assert!(
        m.contains(r#"trellis_endpoints{service="user.default"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn an_endpoints_file_is_followed() {
    let app = upstream("app").await;
    let (a, b) = (upstream("a").await, upstream("b").await);
    let file = temp_path("endpoints.json");
    std::fs::write(&file, format!(r#"{{"user": ["{}"]}}"#, a.addr)).unwrap();
    let ppath = temp_path("policy.json");
    std::fs::write(
        &ppath,
        policy("order", app.addr.port(), serde_json::json!({})),
    )
    .unwrap();
    let mut cfg = trellis_sidecar::Config::local(Some(ppath));
    cfg.discovery = trellis_sidecar::Discovery::Static {
        endpoints: Default::default(),
        file: Some(file.clone()),
    };
    let sc = trellis_sidecar::start(cfg).await.unwrap();
    assert_eq!(get_via(sc.outbound, "http://user/").await.server(), "a");
    std::fs::write(&file, format!(r#"{{"user": ["{}"]}}"#, b.addr)).unwrap();
    let outbound = sc.outbound;
    assert!(
        eventually(Duration::from_secs(3), || async move {
            get_via(outbound, "http://user/").await.server() == "b"
        })
        .await
    );
    // A broken file is refused; the last endpoints stay.
    std::fs::write(&file, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_via(sc.outbound, "http://user/").await.server(), "b");
}
