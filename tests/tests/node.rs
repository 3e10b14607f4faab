//! The full-node tier: real pods from locally built images, a Service, cluster DNS,
//! restricted Pod Security, and the network rule.
//!
//! Needs the image `trellis/smoke` imported (`cargo xtask images smoke`; `cargo xtask test` does it).

use std::{process::Command, time::Duration};

use k8s_openapi::api::{
    apps::v1::Deployment,
    batch::v1::Job,
    core::v1::{Pod, Service},
};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use trellis_tests::{TestNamespace, eventually};

const IMAGE: &str = "trellis/smoke:0.1.0";

/// The restricted security context every container here carries.
fn restricted() -> serde_json::Value {
    json!({
        "runAsNonRoot": true,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("a valid object");
    api.create(&PostParams::default(), &object)
        .await
        .expect("the apiserver accepts the object")
}

#[tokio::test]
#[ignore = "needs the full local node: cargo xtask test"]
async fn a_pod_reaches_another_through_a_service_by_its_dns_name() {
    let ns = TestNamespace::on_node("smoke").await;

    create(
        &ns.api::<Deployment>(),
        json!({
            "metadata": { "name": "hello" },
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": { "app": "hello" } },
                "template": {
                    "metadata": { "labels": { "app": "hello" } },
                    "spec": { "containers": [{
                        "name": "hello",
                        "image": IMAGE,
                        "args": ["serve", "8080"],
                        "ports": [{ "containerPort": 8080 }],
                        "readinessProbe": { "tcpSocket": { "port": 8080 }, "periodSeconds": 1 },
                        "securityContext": restricted(),
                    }]},
                },
            },
        }),
    )
    .await;
    create(
        &ns.api::<Service>(),
        json!({
            "metadata": { "name": "hello" },
            "spec": { "selector": { "app": "hello" }, "ports": [{ "port": 80, "targetPort": 8080 }] },
        }),
    )
    .await;

    let deployments = ns.api::<Deployment>();
    eventually(
        "the hello Deployment to be available",
        Duration::from_secs(90),
        || async {
            let d = deployments.get("hello").await.ok()?;
            (d.status?.available_replicas? == 1).then_some(())
        },
    )
    .await;

    // The client runs in a second pod and resolves the Service's full DNS name.
    let url = format!("http://hello.{}.svc.cluster.local/", ns.name);
    create(
        &ns.api::<Job>(),
        json!({
            "metadata": { "name": "client" },
            "spec": {
                "backoffLimit": 3,
                "template": { "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "client",
                        "image": IMAGE,
                        "args": ["get", url],
                        "securityContext": restricted(),
                    }],
                }},
            },
        }),
    )
    .await;
    let jobs = ns.api::<Job>();
    eventually(
        "the client Job to succeed",
        Duration::from_secs(90),
        || async {
            let status = jobs.get("client").await.ok()?.status?;
            assert!(
                status.failed.unwrap_or(0) < 3,
                "the client could not reach {url}; see its pods' logs"
            );
            (status.succeeded? == 1).then_some(())
        },
    )
    .await;

    // What the client printed is the server's answer, naming the server's pod.
    let pods = ns.api::<Pod>();
    let client = pods
        .list(&ListParams::default().labels("job-name=client"))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
        .expect("a succeeded client pod");
    let server = pods
        .list(&ListParams::default().labels("app=hello"))
        .await
        .unwrap()
        .items
        .remove(0);
    let logs = pods
        .logs(
            client.metadata.name.as_deref().unwrap(),
            &Default::default(),
        )
        .await
        .expect("the client's logs");
    assert_eq!(
        logs.trim(),
        format!("hello from {}", server.metadata.name.unwrap())
    );
}

#[tokio::test]
#[ignore = "needs the full local node: cargo xtask test"]
async fn a_pod_breaking_the_restricted_standard_is_refused() {
    let ns = TestNamespace::on_node("psa").await;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "root" },
        "spec": { "containers": [{
            "name": "root",
            "image": IMAGE,
            "securityContext": { "runAsUser": 0 },
        }]},
    }))
    .unwrap();
    let err = ns
        .api::<Pod>()
        .create(&PostParams::default(), &pod)
        .await
        .expect_err("a pod running as root must be refused");
    let message = err.to_string();
    assert!(
        message.contains("violates PodSecurity \"restricted:latest\"")
            && message.contains("runAsUser=0")
            && message.contains("allowPrivilegeEscalation != false"),
        "unexpected refusal: {message}"
    );
}

#[tokio::test]
#[ignore = "needs the full local node: cargo xtask test"]
async fn pod_and_service_ranges_are_blackholed_beyond_the_bridge() {
    let _ns = TestNamespace::on_node("net").await;
    let routes = Command::new("ip")
        .args(["route", "show", "type", "blackhole"])
        .output()
        .expect("ip route");
    let routes = String::from_utf8_lossy(&routes.stdout);
    for cidr in ["10.244.0.0/16", "10.96.0.0/16"] {
        assert!(
            routes.lines().any(|l| l.contains(cidr)),
            "no blackhole route for {cidr}: {routes}"
        );
    }
    // The bridge's own /24 is the only part of the pod range that routes anywhere.
    let bridge = Command::new("ip")
        .args(["route", "get", "10.244.0.2"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bridge.stdout).contains("dev trellis0"));
    let elsewhere = Command::new("ip")
        .args(["route", "get", "10.244.9.9"])
        .output()
        .unwrap();
    assert!(
        !elsewhere.status.success()
            || String::from_utf8_lossy(&elsewhere.stdout).contains("blackhole"),
        "10.244.9.9 must not be routable"
    );
    // Pod traffic may not be forwarded off the bridge.
    let rules = Command::new("iptables")
        .args(["-w", "-S", "TRELLIS-FORWARD"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("-A TRELLIS-FORWARD -i trellis0 -m comment"),
        "{rules}"
    );
    assert!(rules.contains("-j DROP"), "{rules}");
}

#[tokio::test]
#[ignore = "needs the full local node: cargo xtask test"]
async fn cluster_dns_answers_nothing_outside_cluster_local() {
    let ns = TestNamespace::on_node("dns").await;
    // A name outside cluster.local must fail inside the cluster: CoreDNS has no upstream.
    create(
        &ns.api::<Job>(),
        json!({
            "metadata": { "name": "outside" },
            "spec": {
                "backoffLimit": 0,
                "template": { "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "client",
                        "image": IMAGE,
                        "args": ["get", "http://outside.invalid/"],
                        "securityContext": restricted(),
                    }],
                }},
            },
        }),
    )
    .await;
    let jobs = ns.api::<Job>();
    eventually(
        "the outside lookup to fail",
        Duration::from_secs(90),
        || async {
            let status = jobs.get("outside").await.ok()?.status?;
            assert_eq!(
                status.succeeded, None,
                "a name outside cluster.local resolved"
            );
            (status.failed? >= 1).then_some(())
        },
    )
    .await;
    let pods = ns.api::<Pod>();
    let pod = pods
        .list(&ListParams::default().labels("job-name=outside"))
        .await
        .unwrap()
        .items
        .remove(0);
    let logs = pods
        .logs(pod.metadata.name.as_deref().unwrap(), &Default::default())
        .await
        .unwrap();
    assert!(logs.contains("failed"), "{logs}");
}

/// The operator end to end on the node: a MicroService whose app is the smoke
/// server becomes Ready with the real sidecar injected, under restricted Pod
/// Security, serves through its Service, and `kubectl describe` tells the story.
// Multi-threaded: kubectl runs as a blocking child process while the in-process operator works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the full local node and the images: cargo xtask test"]
async fn a_microservice_becomes_ready_with_its_sidecar_and_serves_through_its_service() {
    use trellis_operator::MicroService;
    use trellis_tests::operator::Operator;

    let ns = TestNamespace::on_node("ms").await;
    let _operator = Operator::start(&ns, "trellis/sidecar:0.1.0").await;
    let microservice: MicroService = serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": "hello" },
        "spec": { "image": IMAGE, "port": 8080, "replicas": 1, "health": { "path": "/health", "interval": "1s" } },
    }))
    .unwrap();
    ns.api::<MicroService>()
        .create(&PostParams::default(), &microservice)
        .await
        .expect("the MicroService is accepted");

    // What a user runs: kubectl wait --for=condition=Ready.
    let waited = trellis_tests::kubectl()
        .args([
            "-n",
            &ns.name,
            "wait",
            "--for=condition=Ready",
            "microservice/hello",
            "--timeout=150s",
        ])
        .output()
        .unwrap();
    if !waited.status.success() {
        let describe = trellis_tests::kubectl()
            .args(["-n", &ns.name, "describe", "microservice/hello", "pods"])
            .output()
            .unwrap();
        panic!(
            "the MicroService did not become Ready: {}\n{}",
            String::from_utf8_lossy(&waited.stderr),
            String::from_utf8_lossy(&describe.stdout)
        );
    }

    // The pod runs both containers, the sidecar as a native sidecar, admitted as restricted.
    let pods = ns.api::<Pod>();
    let pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=hello"))
        .await
        .unwrap()
        .items
        .remove(0);
    let spec = pod.spec.clone().unwrap();
    let sidecar = spec.init_containers.unwrap_or_default().remove(0);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.image.as_deref(), Some("trellis/sidecar:0.1.0"));

    // Through the Service: port 80 → the sidecar's inbound listener → the app.
    let url = format!("http://hello.{}.svc.cluster.local/", ns.name);
    create(
        &ns.api::<Job>(),
        json!({
            "metadata": { "name": "caller" },
            "spec": {
                "backoffLimit": 3,
                "template": { "spec": {
                    "restartPolicy": "Never",
                    "containers": [{ "name": "caller", "image": IMAGE, "args": ["get", url], "securityContext": restricted() }],
                }},
            },
        }),
    )
    .await;
    let jobs = ns.api::<Job>();
    eventually(
        "the caller Job to succeed",
        Duration::from_secs(90),
        || async {
            let status = jobs.get("caller").await.ok()?.status?;
            assert!(
                status.failed.unwrap_or(0) < 3,
                "the caller could not reach {url} through the sidecar"
            );
            (status.succeeded? == 1).then_some(())
        },
    )
    .await;

    // The app calls destinations outside the mesh through its sidecar (the
    // operator sets HTTP_PROXY): a name that does not resolve, and a
    // namespace the sidecar may not read, each get an answer naming the
    // host within the policy's timeout, and neither takes the pod out of
    // service. The answer is 502 when the resolver says the name does not
    // exist, 504 when it has not said so within the timeout (a DNS query
    // lost on a fresh node costs glibc's 5 s retry).
    let pod_name = pod.metadata.name.clone().unwrap();
    for host in ["nowhere.invalid", "ghost.kube-system"] {
        let url = format!("http://{host}/");
        let started = std::time::Instant::now();
        let out = trellis_tests::kubectl()
            .args(["-n", &ns.name, "exec", &pod_name, "-c", "app", "--"])
            .args(["/usr/local/bin/trellis-smoke", "get", &url])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url} answered 200");
        assert!(
            (stderr.contains("answered 502") || stderr.contains("answered 504"))
                && stderr.contains(host),
            "{url}: not a 502 or 504 naming the host: {stderr}"
        );
        println!(
            "{url} from the app: {} in {:.1?}",
            stderr.trim(),
            started.elapsed()
        );
    }
    // Several readiness periods (1 s) later the pod is still Ready.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = pods.get(&pod_name).await.unwrap();
    let ready = now
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    assert!(ready, "the pod turned unready after calls outside the mesh");

    // kubectl describe shows the status, the conditions and the events.
    let describe = trellis_tests::kubectl()
        .args(["-n", &ns.name, "describe", "microservice", "hello"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&describe.stdout);
    for expected in [
        "Phase:",
        "Ready",
        "Conditions:",
        "Events:",
        "Observed Generation:",
    ] {
        assert!(
            text.contains(expected),
            "kubectl describe lacks {expected:?}:\n{text}"
        );
    }
    let printed = trellis_tests::kubectl()
        .args(["-n", &ns.name, "get", "microservices"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains("READY") && printed.contains("1/1"),
        "{printed}"
    );
}
