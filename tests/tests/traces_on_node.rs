//! Tracing on the real node: the operator passes its OTLP endpoint to the
//! sidecars it injects, and a pod's sidecar exports spans that carry the
//! pod's identity to a collector on the node's address.
//!
//! Needs the full local node and the images (`cargo xtask test` does both).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use trellis_operator::{MicroService, render::RenderConfig};
use trellis_tests::{
    TestNamespace,
    collector::{Collector, SERVER},
    kubectl,
    operator::Operator,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the full local node and the images: cargo xtask test"]
async fn a_pods_sidecar_exports_its_spans_with_the_pods_identity() {
    // Pods reach the node on its bridge address, never beyond it.
    let collector = Collector::start([10, 244, 0, 1]);
    let ns = TestNamespace::on_node("traces").await;
    let _operator = Operator::start_with(
        &ns,
        RenderConfig {
            sidecar_image: "trellis/sidecar:0.1.0".into(),
            cluster_domain: "cluster.local".into(),
            otlp_endpoint: Some(collector.endpoint.clone()),
            mesh: None,
        },
    )
    .await;
    let microservice: MicroService = serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": "traced" },
        "spec": {
            "image": "trellis/smoke:0.1.0",
            "port": 8080,
            "health": { "path": "/health", "interval": "1s" },
            "tracing": { "sampleRatio": 1.0 },
        },
    }))
    .unwrap();
    ns.api::<MicroService>()
        .create(&PostParams::default(), &microservice)
        .await
        .expect("the MicroService is accepted");
    let waited = kubectl()
        .args([
            "-n",
            &ns.name,
            "wait",
            "--for=condition=Ready",
            "microservice/traced",
            "--timeout=150s",
        ])
        .output()
        .unwrap();
    assert!(
        waited.status.success(),
        "not Ready: {}",
        String::from_utf8_lossy(&waited.stderr)
    );

    // From the node to the pod's inbound port (the host is on the pod bridge;
    // service IPs are blackholed on the host by the network rule).
    let pod = ns
        .api::<Pod>()
        .list(&ListParams::default().labels("app.kubernetes.io/name=traced"))
        .await
        .unwrap()
        .items
        .remove(0);
    let ip = pod.status.clone().unwrap().pod_ip.unwrap();
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let parent = "eee19b7ec3c1b174";
    let rsp = reqwest::Client::new()
        .get(format!("http://{ip}:15006/"))
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the pod's sidecar answers from the node");
    assert!(rsp.status().is_success(), "{}", rsp.status());

    let spans = collector
        .wait_for(Duration::from_secs(60), |spans| {
            spans.iter().any(|s| s.trace_id == trace_id)
        })
        .await;
    let span = spans.iter().find(|s| s.trace_id == trace_id).unwrap();
    assert_eq!(span.service, "traced", "{span}");
    assert_eq!(span.kind, SERVER, "{span}");
    assert_eq!(span.parent, parent, "the caller's trace continued: {span}");
    assert_eq!(
        span.resource["k8s.pod.name"],
        pod.metadata.name.unwrap(),
        "the downward API names the pod"
    );
    assert_eq!(span.resource["k8s.namespace.name"], ns.name);
    assert_eq!(span.resource["service.version"], "0.1.0");
}
