//! The sidecar against a real kube-apiserver (control-plane tier): EndpointSlice
//! discovery followed live, and the policy taken from its ConfigMap, a bad edit
//! refused while the last good policy keeps running.
//!
//! The apiserver refuses loopback addresses in EndpointSlices, so the upstreams
//! listen on the node's own bridge address (a local address: nothing leaves the host).

use std::time::Duration;

use k8s_openapi::api::{
    core::v1::{ConfigMap, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use trellis_sidecar::{Config, Discovery};
use trellis_tests::{
    TestNamespace, eventually,
    node_peers::{endpoint_slice, get, service, upstream},
};

async fn sidecar(ns: &TestNamespace, policy_configmap: Option<&str>) -> trellis_sidecar::Running {
    // The sidecar finds the API as a real one does outside a pod: through KUBECONFIG.
    static EXPORT: std::sync::Once = std::sync::Once::new();
    EXPORT.call_once(|| {
        if std::env::var_os("KUBECONFIG").is_none() {
            // SAFETY: set once, before any sidecar reads it; every test sets the same value.
            unsafe { std::env::set_var("KUBECONFIG", trellis_tests::kubeconfig_path()) };
        }
    });
    let mut config = Config::local(None);
    config.namespace = ns.name.clone();
    config.discovery = Discovery::Kubernetes { max_services: 16 };
    config.policy_configmap = policy_configmap.map(str::to_owned);
    config.discovery_timeout = Duration::from_secs(5);
    trellis_sidecar::start(config)
        .await
        .expect("the sidecar starts")
}

#[tokio::test]
#[ignore = "needs a cluster: cargo xtask test"]
async fn follows_endpointslices_live_and_uses_only_ready_endpoints() {
    let ns = TestNamespace::new("sidecar-discovery").await;
    let (a, b) = (upstream("a").await, upstream("b").await);
    // Both upstreams share a port in one slice only if they share it; give each its own slice
    // generation instead: first a (ready) and b (not ready), then b alone.
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

    let running = sidecar(&ns, None).await;
    let (status, body) = get(running.outbound, "user").await;
    assert_eq!((status, body.as_str()), (200, "hello from a"));

    // Move the service to b: the sidecar follows without a restart.
    slices
        .replace("user-manual", &PostParams::default(), &{
            let mut s = endpoint_slice("user", &[(b, true)]);
            s.metadata.resource_version = slices
                .get("user-manual")
                .await
                .unwrap()
                .metadata
                .resource_version;
            s
        })
        .await
        .unwrap();
    eventually("traffic to move to b", Duration::from_secs(10), || async {
        (get(running.outbound, "user").await.1 == "hello from b").then_some(())
    })
    .await;

    // An endpoint that is not ready gets no traffic: with none ready, a 503 naming the service.
    let patch = json!({ "endpoints": [{ "addresses": [b.ip().to_string()], "conditions": { "ready": false } }] });
    slices
        .patch(
            "user-manual",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let (status, body) = eventually(
        "the not-ready endpoint to be dropped",
        Duration::from_secs(10),
        || async {
            let (status, body) = get(running.outbound, "user").await;
            (status == 503).then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, 503);
    assert!(
        body.contains("user"),
        "the 503 must name the service: {body}"
    );

    // A name with no Service that is no dependency either is outside the
    // mesh: forwarded by DNS, where it does not resolve — a clear 502 naming it.
    let (status, body) = get(running.outbound, "nosuch").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("\"nosuch\""), "{body}");
    running.shutdown().await;
}

fn policy_json(service: &str, namespace: &str, attempts: u32) -> String {
    json!({
        "service": service,
        "namespace": namespace,
        "appPort": 8080,
        "resilience": { "retry": { "attempts": attempts } },
    })
    .to_string()
}

#[tokio::test]
#[ignore = "needs a cluster: cargo xtask test"]
async fn takes_its_policy_from_the_configmap_and_keeps_the_last_good_one() {
    let ns = TestNamespace::new("sidecar-policy").await;
    let configmaps: Api<ConfigMap> = ns.api();
    let name = "order-sidecar";
    configmaps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": name },
                "data": { "policy.json": policy_json("order", &ns.name, 2) },
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let running = sidecar(&ns, Some(name)).await;
    let attempts =
        |state: trellis_sidecar::PolicyState| state.policy.map(|p| p.resilience.retry.attempts);
    eventually("the first policy", Duration::from_secs(10), || async {
        (attempts(running.policy.current()) == Some(2)).then_some(())
    })
    .await;

    // A good edit applies live.
    let edit = |text: String| json!({ "data": { "policy.json": text } });
    configmaps
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&edit(policy_json("order", &ns.name, 4))),
        )
        .await
        .unwrap();
    eventually("the edited policy", Duration::from_secs(10), || async {
        (attempts(running.policy.current()) == Some(4)).then_some(())
    })
    .await;

    // A bad edit is refused, naming the field, and the last good policy stays in force.
    configmaps
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&edit(policy_json("order", &ns.name, 0))),
        )
        .await
        .unwrap();
    let rejection = eventually(
        "the bad policy to be refused",
        Duration::from_secs(10),
        || async { running.policy.current().rejected },
    )
    .await;
    assert!(
        rejection.error.contains("resilience.retry.attempts"),
        "{}",
        rejection.error
    );
    assert_eq!(attempts(running.policy.current()), Some(4));
    running.shutdown().await;
}
