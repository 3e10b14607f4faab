//! The sidecar when the Kubernetes API becomes unreachable (control-plane
//! tier): the last known endpoints keep serving, `/readyz` stays ready but
//! says discovery is stale, `/healthz` turns unhealthy, and when the API
//! is back discovery is fresh and follows changes again.
//!
//! The shared cluster must not be disturbed, so the API is made unreachable
//! for this sidecar alone: it talks to the apiserver through a TCP relay in
//! the test (its kubeconfig points at the relay), and the relay is stopped —
//! its connections cut, its port closed, so connecting is refused — then
//! started again on the same port. Upstreams listen on the node's bridge
//! address, because EndpointSlices refuse loopback addresses.

use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::api::{Api, PostParams};
use serde_json::json;
use trellis_sidecar::{Config, Discovery};
use trellis_tests::{
    TestNamespace, eventually,
    node_peers::{NODE_IP, admin_get, endpoint_slice, get, service, upstream},
    relay::{Relay, apiserver},
};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn an_unreachable_api_leaves_the_last_endpoints_serving_and_readyz_says_stale() {
    // The namespace and its objects are made with the real kubeconfig.
    let ns = TestNamespace::new("sidecar-stale").await;
    let (a, b, app) = (
        upstream("a").await,
        upstream("b").await,
        upstream("app").await,
    );
    let services: Api<Service> = ns.api();
    services
        .create(&PostParams::default(), &service("user"))
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = ns.api();
    slices
        .create(
            &PostParams::default(),
            &endpoint_slice("user", &[(a, true)]),
        )
        .await
        .unwrap();

    // The sidecar reaches the API only through the relay.
    let (server, target) = apiserver();
    let relay = Relay::new(target).await;
    let relayed = relay.kubeconfig(
        &server,
        &format!("trellis-sidecar-faults-{}", std::process::id()),
    );
    let original = trellis_tests::kubeconfig_path();
    // SAFETY: this binary has one test, and nothing else reads the
    // environment while it is set: the namespace's client was built above,
    // and the original is back before the sidecar's client is used.
    unsafe { std::env::set_var("KUBECONFIG", &relayed) };

    let policy_file = std::env::temp_dir().join(format!(
        "trellis-sidecar-faults-{}.policy.json",
        std::process::id()
    ));
    std::fs::write(
        &policy_file,
        json!({
            "service": "order",
            "namespace": ns.name,
            "appPort": app.port(),
            "health": { "path": "/health", "interval": "100ms" },
            "dependencies": [{ "name": "user" }],
        })
        .to_string(),
    )
    .unwrap();
    let mut config = Config::local(Some(policy_file));
    config.namespace = ns.name.clone();
    config.app_host = NODE_IP.parse().unwrap();
    config.discovery = Discovery::Kubernetes { max_services: 16 };
    config.discovery_timeout = Duration::from_secs(2);
    let sc = trellis_sidecar::start(config)
        .await
        .expect("the sidecar starts");
    // The sidecar's client has read the relayed kubeconfig; the namespace's
    // deletion on drop must use the real one.
    // SAFETY: as above.
    unsafe { std::env::set_var("KUBECONFIG", &original) };

    eventually(
        "ready with fresh discovery",
        Duration::from_secs(20),
        || async {
            (admin_get(sc.admin, "/readyz").await == (200, "ready\n".into())).then_some(())
        },
    )
    .await;
    assert_eq!(get(sc.outbound, "user").await, (200, "hello from a".into()));

    // The API goes away.
    relay.cut().await;
    let cut_at = Instant::now();
    let readyz = eventually(
        "readyz to say discovery is stale",
        Duration::from_secs(15),
        || async {
            let (status, body) = admin_get(sc.admin, "/readyz").await;
            body.contains("stale").then_some((status, body))
        },
    )
    .await;
    let noticed = cut_at.elapsed();
    assert_eq!(readyz.0, 200, "stale discovery still serves: {}", readyz.1);
    assert!(readyz.1.starts_with("ready\n"), "{}", readyz.1);
    assert!(
        readyz
            .1
            .contains(&format!("discovery of user.{} is stale", ns.name))
            && readyz.1.contains("serving the last known endpoints"),
        "{}",
        readyz.1
    );
    let (status, healthz) = admin_get(sc.admin, "/healthz").await;
    assert_eq!(status, 503, "{healthz}");
    let report: serde_json::Value = serde_json::from_str(&healthz).unwrap();
    assert_eq!(
        report["checks"]["discovery"]["status"], "unhealthy",
        "{healthz}"
    );
    eprintln!(
        "API cut: /readyz said stale after {noticed:?}: {}",
        readyz.1.trim()
    );

    // The last known endpoints keep serving, for as long as the API is away.
    for _ in 0..20 {
        assert_eq!(get(sc.outbound, "user").await, (200, "hello from a".into()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(admin_get(sc.admin, "/readyz").await.0, 200);

    // A name never seen before cannot be looked up: a clear 503 in time.
    let start = Instant::now();
    let (status, body) = get(sc.outbound, "nosuch").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("nosuch") && body.contains("discovery"),
        "{body}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );

    // The API comes back: discovery is fresh, and follows changes again.
    relay.restore().await;
    let restored_at = Instant::now();
    eventually(
        "readyz to be ready and fresh",
        Duration::from_secs(20),
        || async {
            (admin_get(sc.admin, "/readyz").await == (200, "ready\n".into())).then_some(())
        },
    )
    .await;
    eprintln!(
        "API back: discovery fresh after {:?}",
        restored_at.elapsed()
    );
    let mut moved = slices.get("user-manual").await.unwrap();
    moved.endpoints = endpoint_slice("user", &[(b, true)]).endpoints;
    moved.ports = endpoint_slice("user", &[(b, true)]).ports;
    slices
        .replace("user-manual", &PostParams::default(), &moved)
        .await
        .unwrap();
    eventually(
        "traffic to follow the slice to b",
        Duration::from_secs(10),
        || async { (get(sc.outbound, "user").await.1 == "hello from b").then_some(()) },
    )
    .await;
    sc.shutdown().await;
    let _ = std::fs::remove_file(relayed);
}
