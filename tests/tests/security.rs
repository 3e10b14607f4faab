//! Least privilege and isolation of what the operator generates, on the real
//! local node: the sidecar's ServiceAccount reads its own policy and the
//! EndpointSlices and nothing else; generated pods pass `restricted` Pod
//! Security; the sidecar's admin port changes nothing; an app that binds
//! localhost is reachable only through its sidecar.
//!
//! Needs the images `trellis/sidecar` and `trellis/smoke` (`cargo xtask images
//! sidecar smoke`; `cargo xtask test` builds them).

use std::{process::Output, time::Duration};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Pod, Secret},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, LogParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use trellis_operator::MicroService;
use trellis_tests::{TestNamespace, eventually, kubeconfig_path, kubectl, operator::Operator};

const SIDECAR_IMAGE: &str = "trellis/sidecar:0.1.0";
const APP_IMAGE: &str = "trellis/smoke:0.1.0";
const APP_PORT: u16 = 8080;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A MicroService running the smoke server, its app bound to `bind` only.
async fn create_microservice(ns: &TestNamespace, name: &str, replicas: i32, bind: &str) {
    let ms: MicroService = serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": name },
        "spec": {
            "image": APP_IMAGE,
            "port": APP_PORT,
            "replicas": replicas,
            "health": { "path": "/", "interval": "1s" },
            "config": { "BIND_ADDRESS": bind },
        },
    }))
    .unwrap();
    ns.api::<MicroService>()
        .create(&PostParams::default(), &ms)
        .await
        .expect("the MicroService is accepted");
}

/// Waits until the MicroService is Ready and returns its (one) running pod.
async fn ready_pod(ns: &TestNamespace, name: &str) -> Pod {
    let microservices = ns.api::<MicroService>();
    let what = format!("MicroService {name} to be Ready");
    let ready = eventually(&what, Duration::from_secs(150), || async {
        let ms = microservices.get(name).await.ok()?;
        ms.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    });
    ready.await;
    let pods = ns.api::<Pod>();
    let list = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={name}")))
        .await
        .unwrap();
    list.items
        .into_iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .unwrap_or_else(|| panic!("no running pod of {name}"))
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("a pod IP")
}

// ---------------------------------------------------------------------------
// The sidecar's ServiceAccount

/// `kubectl auth can-i` as the ServiceAccount: true for yes.
fn can_i(ns: &str, sa: &str, args: &[&str]) -> bool {
    let out = kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .args([
            "-n",
            ns,
            "--as",
            &format!("system:serviceaccount:{ns}:{sa}"),
        ])
        .output()
        .unwrap();
    let answer = stdout(&out);
    match answer.trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {args:?}: {other:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A client authenticated only by a token of the ServiceAccount, as the
/// sidecar's projected token authenticates it.
async fn client_as(ns: &str, sa: &str) -> Client {
    let out = kubectl()
        .args(["create", "token", sa, "-n", ns, "--duration=10m"])
        .output()
        .unwrap();
    assert!(out.status.success(), "kubectl create token failed");
    let token = stdout(&out).trim().to_owned();
    let mut kubeconfig = Kubeconfig::read_from(kubeconfig_path()).unwrap();
    for user in &mut kubeconfig.auth_infos {
        // The token replaces the admin's client certificate entirely.
        user.auth_info = Some(serde_json::from_value(json!({ "token": token })).unwrap());
    }
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// The HTTP status of a failed request, or 200.
fn code<T>(r: Result<T, kube::Error>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(kube::Error::Api(s)) => s.code,
        Err(e) => panic!("the request did not reach the apiserver: {e}"),
    }
}

/// The sidecar's ServiceAccount may read its own policy ConfigMap and the
/// EndpointSlices of its namespace, and nothing else: not Secrets, not Pods,
/// not the app's ConfigMap nor another service's policy, not other
/// namespaces, and it may write nothing. Checked with `kubectl auth can-i` and
/// with real requests carrying a token of the ServiceAccount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: cargo xtask test"]
async fn the_sidecars_service_account_reads_only_its_policy_and_endpoints() {
    let ns = TestNamespace::new("security-sa").await;
    let _operator = Operator::start(&ns, SIDECAR_IMAGE).await;
    create_microservice(&ns, "hello", 0, "127.0.0.1").await;
    create_microservice(&ns, "other", 0, "127.0.0.1").await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "db-password" },
        "stringData": { "password": "hunter2" },
    }))
    .unwrap();
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // The operator has made both services' RBAC.
    let config_maps = ns.api::<ConfigMap>();
    eventually("both policies", Duration::from_secs(30), || async {
        let a = config_maps.get_opt("hello-sidecar").await.ok()??;
        let b = config_maps.get_opt("other-sidecar").await.ok()??;
        Some((a, b))
    })
    .await;
    let rbac_ready = || can_i(&ns.name, "hello", &["get", "configmaps/hello-sidecar"]);
    eventually(
        "the sidecar's Role to be bound",
        Duration::from_secs(30),
        || {
            let ok = rbac_ready();
            async move { ok.then_some(()) }
        },
    )
    .await;

    let n = ns.name.as_str();
    let allowed: &[&[&str]] = &[
        &["get", "configmaps/hello-sidecar"],
        &["watch", "configmaps/hello-sidecar"],
        &["list", "endpointslices.discovery.k8s.io"],
        &["watch", "endpointslices.discovery.k8s.io"],
    ];
    let denied: &[&[&str]] = &[
        &["get", "secrets"],
        &["list", "secrets"],
        &["watch", "secrets"],
        &["get", "secrets/db-password"],
        &["get", "pods"],
        &["list", "pods"],
        &["create", "pods"],
        &["create", "pods", "--subresource=exec"],
        &["list", "configmaps"],
        &["get", "configmaps/hello-config"],
        &["get", "configmaps/other-sidecar"],
        &["get", "configmaps/kube-root-ca.crt"],
        &["update", "configmaps/hello-sidecar"],
        &["patch", "configmaps/hello-sidecar"],
        &["delete", "configmaps/hello-sidecar"],
        &["create", "configmaps"],
        &["create", "endpointslices.discovery.k8s.io"],
        &["list", "services"],
        &["get", "serviceaccounts/hello"],
        &["create", "serviceaccounts", "--subresource=token"],
        &["list", "microservices.trellis.dev"],
        &["list", "roles.rbac.authorization.k8s.io"],
        &["get", "secrets", "--all-namespaces"],
        &[
            "list",
            "endpointslices.discovery.k8s.io",
            "--all-namespaces",
        ],
    ];
    for args in allowed {
        assert!(can_i(n, "hello", args), "the sidecar needs: {args:?}");
    }
    for args in denied {
        assert!(!can_i(n, "hello", args), "the sidecar may: {args:?}");
    }
    for args in [["get", "secrets"], ["get", "configmaps"], ["list", "pods"]] {
        let out = kubectl()
            .args(["auth", "can-i"])
            .args(args)
            .args(["-n", "kube-system", "--as"])
            .arg(format!("system:serviceaccount:{n}:hello"))
            .output()
            .unwrap();
        assert_eq!(stdout(&out).trim(), "no", "{args:?} in kube-system");
    }

    // The same with real requests, authenticated by a token of the account.
    let sidecar = client_as(n, "hello").await;
    let cms: Api<ConfigMap> = Api::namespaced(sidecar.clone(), n);
    let policy = cms.get("hello-sidecar").await.expect("its own policy");
    assert!(policy.data.unwrap().contains_key("policy.json"));
    let own = ListParams::default().fields("metadata.name=hello-sidecar");
    assert_eq!(
        code(cms.list(&own).await),
        200,
        "the sidecar lists (watches) its policy by name"
    );
    let slices: Api<EndpointSlice> = Api::namespaced(sidecar.clone(), n);
    assert_eq!(code(slices.list(&ListParams::default()).await), 200);

    let secrets: Api<Secret> = Api::namespaced(sidecar.clone(), n);
    assert_eq!(code(secrets.get("db-password").await), 403);
    assert_eq!(code(secrets.list(&ListParams::default()).await), 403);
    let pods: Api<Pod> = Api::namespaced(sidecar.clone(), n);
    assert_eq!(code(pods.list(&ListParams::default()).await), 403);
    assert_eq!(code(cms.get("hello-config").await), 403);
    assert_eq!(code(cms.get("other-sidecar").await), 403);
    assert_eq!(code(cms.list(&ListParams::default()).await), 403);
    let other = ListParams::default().fields("metadata.name=other-sidecar");
    assert_eq!(code(cms.list(&other).await), 403);
    let patch = json!({ "data": { "policy.json": "{}" } });
    assert_eq!(
        code(
            cms.patch(
                "hello-sidecar",
                &PatchParams::default(),
                &Patch::Merge(&patch)
            )
            .await
        ),
        403,
        "the sidecar cannot rewrite its own policy"
    );
    let system: Api<Secret> = Api::namespaced(sidecar.clone(), "kube-system");
    assert_eq!(code(system.list(&ListParams::default()).await), 403);
    let everywhere: Api<ConfigMap> = Api::all(sidecar);
    assert_eq!(code(everywhere.list(&ListParams::default()).await), 403);

    // Only the sidecar gets a token: the app container mounts none.
    let d = ns.api::<Deployment>().get("hello").await.unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    let app = &pod.containers[0];
    assert!(
        app.volume_mounts
            .iter()
            .flatten()
            .all(|m| !m.mount_path.contains("serviceaccount")),
        "the app container mounts a token: {:?}",
        app.volume_mounts
    );
}

// ---------------------------------------------------------------------------
// Pod Security

/// Generated pods run in a namespace enforcing `restricted` (latest), and the
/// enforcement is real: the same pod with one field loosened is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the full local node and the images: cargo xtask test"]
async fn generated_pods_pass_restricted_pod_security() {
    let ns = TestNamespace::on_node("security-pss").await;
    let namespace = Api::<Namespace>::all(ns.client.clone())
        .get(&ns.name)
        .await
        .unwrap();
    let labels = namespace.labels();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted")
    );
    let _operator = Operator::start(&ns, SIDECAR_IMAGE).await;
    create_microservice(&ns, "hello", 1, "127.0.0.1").await;
    let pod = ready_pod(&ns, "hello").await;
    let statuses = pod.status.as_ref().unwrap();
    for c in statuses
        .container_statuses
        .iter()
        .flatten()
        .chain(statuses.init_container_statuses.iter().flatten())
    {
        assert!(c.ready, "container {} is not ready", c.name);
    }

    // Re-evaluating the namespace's pods against restricted (a server-side dry
    // run of a policy version change) warns of no violation.
    let relabel = kubectl()
        .args([
            "label",
            "namespace",
            &ns.name,
            "--overwrite",
            "--dry-run=server",
        ])
        .arg("pod-security.kubernetes.io/enforce-version=v1.34")
        .output()
        .unwrap();
    assert!(relabel.status.success());
    let warnings = String::from_utf8_lossy(&relabel.stderr);
    assert!(
        !warnings.contains("violate"),
        "existing pods violate restricted: {warnings}"
    );

    // The control: the same pod with privilege escalation allowed in the
    // sidecar is refused by this namespace.
    let mut loosened: serde_json::Value = serde_json::to_value(&pod).unwrap();
    loosened["metadata"] = json!({ "name": "loosened" });
    loosened["status"] = json!(null);
    loosened["spec"]["nodeName"] = json!(null);
    loosened["spec"]["initContainers"][0]["securityContext"]["allowPrivilegeEscalation"] =
        json!(true);
    let loosened: Pod = serde_json::from_value(loosened).unwrap();
    let refused = ns
        .api::<Pod>()
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &loosened,
        )
        .await
        .expect_err("a loosened pod is refused");
    assert!(
        refused.to_string().contains("allowPrivilegeEscalation"),
        "{refused}"
    );
}

// ---------------------------------------------------------------------------
// The sidecar's admin port and the app's port

/// A raw HTTP/1.1 request to `addr`; the status code and the body.
async fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let body = "{}";
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
    (code, body)
}

/// The admin paths the sidecar serves, read from its source (so a new path is
/// covered here without editing this test): the `"/path" =>` arms of
/// sidecar/src/admin.rs.
fn admin_paths() -> Vec<String> {
    let source = include_str!("../../sidecar/src/admin.rs");
    let paths: Vec<String> = source
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("\"/")?;
            let (path, arm) = rest.split_once('"')?;
            arm.trim_start()
                .starts_with("=>")
                .then(|| format!("/{path}"))
        })
        .collect();
    for known in ["/livez", "/readyz", "/healthz", "/metrics", "/status"] {
        assert!(paths.iter().any(|p| p == known), "{known} in {paths:?}");
    }
    paths
}

/// Every method that could change state, on every admin path (and on paths
/// other admin servers use to change state), is refused with 405, and the
/// sidecar's state is the same afterwards: same status document, still ready,
/// not restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the full local node and the images: cargo xtask test"]
async fn the_admin_port_changes_nothing() {
    let ns = TestNamespace::on_node("security-admin").await;
    let _operator = Operator::start(&ns, SIDECAR_IMAGE).await;
    create_microservice(&ns, "hello", 1, "127.0.0.1").await;
    let pod = ready_pod(&ns, "hello").await;
    let admin = format!("{}:15020", pod_ip(&pod));
    let restarts = |p: &Pod| -> i32 {
        p.status
            .iter()
            .flat_map(|s| s.init_container_statuses.iter().flatten())
            .map(|c| c.restart_count)
            .sum()
    };

    let before = http(&admin, "GET", "/status").await;
    assert_eq!(before.0, 200);
    let mut paths = admin_paths();
    // What Envoy and Linkerd admin servers change state with: not here either.
    paths.extend(
        [
            "/quitquitquit",
            "/shutdown",
            "/drain_listeners",
            "/healthcheck/fail",
            "/logging",
            "/reload",
            "/config",
            "/policy",
            "/runtime_modify",
        ]
        .map(String::from),
    );
    let mut tried = 0;
    for path in &paths {
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            let (code, body) = http(&admin, method, path).await;
            assert_eq!(code, 405, "{method} {path} answered {code}: {body}");
            tried += 1;
        }
    }
    eprintln!(
        "{tried} state-changing requests to {} admin paths: all 405",
        paths.len()
    );

    let after = http(&admin, "GET", "/status").await;
    let (mut b, mut a): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&before.1).unwrap(),
        serde_json::from_str(&after.1).unwrap(),
    );
    assert_eq!(a["ready"], true);
    // Discovery of the service's own endpoints may legitimately move on; the
    // policy and the dependencies must not.
    a["discovery"] = json!(null);
    b["discovery"] = json!(null);
    assert_eq!(a, b, "the admin requests changed the sidecar's state");
    assert_eq!(http(&admin, "GET", "/readyz").await.0, 200);
    let now = ns.api::<Pod>().get(&pod.name_any()).await.unwrap();
    assert_eq!(restarts(&now), restarts(&pod), "the sidecar restarted");
}

/// Runs `trellis-smoke get <url>` in a pod of its own; its phase and log.
async fn get_from_a_pod(ns: &TestNamespace, name: &str, url: &str) -> (String, String) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "get",
                "image": APP_IMAGE,
                "args": ["get", url],
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": 65532,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": { "drop": ["ALL"] },
                    "seccompProfile": { "type": "RuntimeDefault" },
                },
            }],
        },
    }))
    .unwrap();
    let pods = ns.api::<Pod>();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let phase = eventually(
        &format!("pod {name} to finish"),
        Duration::from_secs(90),
        || async {
            let p = pods.get(name).await.ok()?;
            let phase = p.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        },
    )
    .await;
    let log = pods.logs(name, &LogParams::default()).await.unwrap();
    (phase, log)
}

/// The app binds 127.0.0.1: another pod reaches it through the sidecar's
/// inbound port, and cannot reach the app's own port on the pod's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the full local node and the images: cargo xtask test"]
async fn an_app_bound_to_localhost_is_reachable_only_through_the_sidecar() {
    let ns = TestNamespace::on_node("security-port").await;
    let _operator = Operator::start(&ns, SIDECAR_IMAGE).await;
    create_microservice(&ns, "hello", 1, "127.0.0.1").await;
    let pod = ready_pod(&ns, "hello").await;
    let ip = pod_ip(&pod);

    let (phase, log) = get_from_a_pod(&ns, "through-sidecar", &format!("http://{ip}:15006/")).await;
    assert_eq!(phase, "Succeeded", "through the sidecar: {log}");
    assert!(log.contains("hello from"), "{log}");

    let (phase, log) =
        get_from_a_pod(&ns, "around-sidecar", &format!("http://{ip}:{APP_PORT}/")).await;
    assert_eq!(
        phase, "Failed",
        "the app's port answered from outside: {log}"
    );
    assert!(
        log.to_lowercase().contains("refused"),
        "the connection should be refused: {log}"
    );
}
