//! Outbound routing, discovery and balancing, through a real sidecar to
//! real upstreams on loopback.

mod support;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Request, Response, StatusCode};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use support::*;
use tokio::{net::TcpListener, sync::watch};

#[tokio::test]
async fn proxy_form_and_host_routing_reach_the_named_service() {
    let user = upstream("user").await;
    let product = upstream("product").await;
    let app = upstream("app").await;
    let (sc, _) = sidecar(
        // `other` is readable because a dependency names it; an undeclared
        // namespace would be outside the mesh (tests/egress.rs).
        &policy(
            "order",
            app.addr.port(),
            serde_json::json!({"dependencies": [{"name": "product", "namespace": "other"}]}),
        ),
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
    // The bare name resolves in the pod's own namespace, not in `other`:
    // there it is no Service and no dependency, so it is outside the mesh
    // (a DNS name that does not resolve here) and never reaches `other`.
    let a = get_via(sc.outbound, "http://product/").await;
    assert_ne!(a.status, StatusCode::OK, "{}", a.text());
    assert!(a.text().contains("\"product\""), "{}", a.text());
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
    // Fast means not waiting on discovery: a lookup that did would take the
    // whole 1 s discovery timeout. Half of it tells the two apart with room
    // for scheduling stalls on a busy machine.
    assert!(took < Duration::from_millis(500), "took {took:?}");

    let a = get_via(sc.outbound, "http://empty/x").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        a.text()
            .contains("\"empty.default\" has no ready endpoints"),
        "{}",
        a.text()
    );

    // No name at all, and a name that cannot be a host (a DNS name that is
    // no Service, such as a.b.c.d, is outside the mesh: tests/egress.rs).
    let a = h1(sc.outbound, Request::get("/x").body(full("")).unwrap()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    let bad = Request::get("/x")
        .header("host", "-a.b-")
        .body(full(""))
        .unwrap();
    let a = h1(sc.outbound, bad).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
}

#[tokio::test]
async fn an_endpoint_that_refuses_connections_gives_502_naming_the_service() {
    let app = upstream("app").await;
    let dead = dead_addr();
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

/// Upstreams sharing one gate: each holds every request it gets until
/// `total` requests have reached them together, then all answer with their
/// name in `x-upstream`.
///
/// While they hold, no response completes, so the balancer routes all
/// `total` requests on the same peak-EWMA estimates: the endpoints' default
/// latency, decayed alike. Its choices then depend only on the requests in
/// flight per endpoint and p2c's random pairs, not on how fast loopback
/// happened to answer, which is what makes a spread assertion hold by
/// construction.
struct Gated {
    names: Vec<&'static str>,
    addrs: Vec<SocketAddr>,
    hits: Arc<AtomicUsize>,
}

async fn gated(names: &[&'static str], total: usize) -> Gated {
    let (arrived, _) = watch::channel(0usize);
    let arrived = Arc::new(arrived);
    let hits = Arc::new(AtomicUsize::new(0));
    let mut addrs = Vec::new();
    for &name in names {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let (arrived, hits) = (arrived.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (arrived, hits) = (arrived.clone(), hits.clone());
                let svc = hyper::service::service_fn(move |_req| {
                    let (arrived, hits) = (arrived.clone(), hits.clone());
                    async move {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let mut open = arrived.subscribe();
                        arrived.send_modify(|n| *n += 1);
                        let _ = open.wait_for(|n| *n >= total).await;
                        let mut rsp = Response::new(full(name));
                        rsp.headers_mut()
                            .insert("x-upstream", name.parse().unwrap());
                        Ok::<_, Infallible>(rsp)
                    }
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    Gated {
        names: names.to_vec(),
        addrs,
        hits,
    }
}

/// Sends `n` GETs for `user` at once, each on its own connection, and
/// counts the answers by upstream. Fails rather than hangs if the gate of
/// [`gated`] upstreams never opens.
async fn burst(outbound: SocketAddr, n: usize, gate: &Gated) -> HashMap<String, usize> {
    let calls = (0..n).map(|_| tokio::spawn(get_via(outbound, "http://user/")));
    let all = futures::future::join_all(calls);
    let answers = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the gate never opened: {} of {n} requests reached {:?}",
                gate.hits.load(Ordering::SeqCst),
                gate.names
            )
        });
    let mut counts = HashMap::new();
    for a in answers {
        let a = a.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        *counts.entry(a.server()).or_default() += 1;
    }
    counts
}

/// A policy whose overall timeout outlasts any wait at a gate, so every
/// request is routed exactly once (no timeout, no retry).
fn patient_policy(app_port: u16) -> String {
    policy(
        "order",
        app_port,
        // `user` declared: a removed dependency is "unknown service", not egress.
        serde_json::json!({"resilience": {"timeout": "60s"}, "dependencies": [{"name": "user"}]}),
    )
}

#[tokio::test]
async fn load_spreads_across_three_endpoints() {
    let app = upstream("app").await;
    let ups = gated(&["u1", "u2", "u3"], 300).await;
    let (sc, _) = sidecar(&patient_policy(app.addr.port()), &[("user", &ups.addrs)]).await;
    // All 300 are routed before any answers (see `gated`), on equal
    // estimates: each pick sends to the endpoint with fewer requests in
    // flight of a random pair. Under that rule the shares stay within a few
    // of 100 each; an endpoint ends below 50 with probability 1.2e-66
    // (computed exactly over the 300 picks, pairs uniform, ties to the first
    // drawn), and still below 1e-30 if the estimates differed by 50%.
    let counts = burst(sc.outbound, 300, &ups).await;
    eprintln!("spread over three endpoints: {counts:?}");
    for name in &ups.names {
        let n = counts.get(*name).copied().unwrap_or(0);
        assert!(n >= 50, "{name} got {n} of 300: {counts:?}");
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
    // One request at a time, so none is in flight when the next is routed
    // and p2c compares the two picked endpoints' estimates alone. Once the
    // slow endpoint has answered, its estimate is 150 ms, decaying 10% a
    // second, and it is picked again only when paired with a fast endpoint
    // whose estimate is higher still: one of whose answers took longer than
    // that. An even split would give it 100; reaching 45 would take some 40
    // such answers from endpoints that answer at once.
    let counts = spread(sc.outbound, 300, 1).await;
    let slow = counts.get("slow").copied().unwrap_or(0);
    eprintln!("spread with one slow endpoint: {counts:?}");
    assert!(slow < 45, "the slow endpoint got {slow} of 300: {counts:?}");
}

#[tokio::test]
async fn endpoint_changes_apply_live() {
    let app = upstream("app").await;
    let a = upstream("a").await;
    let bc = gated(&["b", "c"], 60).await;
    let (sc, _) = sidecar(&patient_policy(app.addr.port()), &[("user", &[a.addr])]).await;
    assert_eq!(get_via(sc.outbound, "http://user/").await.server(), "a");

    let resolver = sc.static_endpoints().unwrap();
    resolver.set("user", bc.addrs.clone());
    // The change reaches the balancer with the next request: the removed
    // endpoint gets none of the next 60, and both new ones share them. The
    // 60 are routed before any answers (see `gated`), so p2c compares the
    // two new endpoints' equal default estimates times their requests in
    // flight and alternates: 30 each. One getting 10 or fewer would take
    // one estimate 4.5 times the other; both start at the default and decay
    // alike over 10 s, so that would take 15 s between their insertions by
    // one update.
    let seen = burst(sc.outbound, 60, &bc).await;
    assert_eq!(seen.get("a"), None, "{seen:?}");
    assert_eq!(a.hits(), 1, "{seen:?}");
    assert!(
        seen.get("b").is_some_and(|n| *n > 10) && seen.get("c").is_some_and(|n| *n > 10),
        "{seen:?}"
    );

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
    let (sc, _) = sidecar_with_config(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[],
        |cfg| {
            cfg.discovery = trellis_sidecar::Discovery::Static {
                endpoints: Default::default(),
                file: Some(file.clone()),
            }
        },
    )
    .await;
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
