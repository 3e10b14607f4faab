//! The Helm chart: lint, what `helm template` renders, the values schema, and a
//! real `helm install` on the node running the operator with exactly the chart's RBAC.

use std::{path::PathBuf, process::Output, time::Duration};

use serde_json::{Value, json};
use trellis_tests::{TestNamespace, eventually, helm};

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/trellis")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm template` with `--set` pairs, as a list of JSON documents.
fn template(sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = helm();
    cmd.args(["template", "trellis"]).arg(chart()).args([
        "--namespace",
        "trellis-system",
        "--kube-version",
        "1.34.4",
    ]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.output().expect("running helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| {
            let value = serde_json::to_value(serde_yaml::Value::deserialize(doc).ok()?).ok()?;
            (!value.is_null()).then_some(value)
        })
        .collect())
}

use serde::Deserialize;

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
#[ignore = "needs the tools cache (helm): cargo xtask test"]
fn the_chart_lints_clean() {
    let out = ok(
        helm()
            .arg("lint")
            .arg(chart())
            .arg("--strict")
            .output()
            .unwrap(),
        "helm lint --strict",
    );
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
#[ignore = "needs the tools cache (helm): cargo xtask test"]
fn the_operator_runs_restricted_with_exactly_the_rbac_it_needs() {
    let docs = template(&[]).expect("the defaults render");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment"
        ]
    );

    // Every verb on every resource, exactly: a new grant must be added here on purpose.
    let rules = &find(&docs, "ClusterRole")["rules"];
    let granted = |group: &str, resource: &str| -> Vec<String> {
        rules
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["apiGroups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|g| g == group)
                    && r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x == resource)
            })
            .flat_map(|r| {
                r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
            })
            .collect()
    };
    let read_write = ["get", "list", "watch", "create", "patch"];
    let expected: &[(&str, &str, &[&str])] = &[
        ("trellis.dev", "microservices", &["get", "list", "watch"]),
        ("trellis.dev", "microservices/status", &["get", "patch"]),
        ("", "configmaps", &read_write),
        ("", "serviceaccounts", &read_write),
        ("", "services", &read_write),
        ("apps", "deployments", &read_write),
        ("rbac.authorization.k8s.io", "roles", &read_write),
        ("rbac.authorization.k8s.io", "rolebindings", &read_write),
        (
            "policy",
            "poddisruptionbudgets",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        (
            "autoscaling",
            "horizontalpodautoscalers",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        (
            "discovery.k8s.io",
            "endpointslices",
            &["get", "list", "watch"],
        ),
        ("events.k8s.io", "events", &["create", "patch"]),
    ];
    let mut total = 0;
    for (group, resource, verbs) in expected {
        assert_eq!(granted(group, resource), *verbs, "{group}/{resource}");
        total += verbs.len();
    }
    let all: usize = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["verbs"].as_array().unwrap().len() * r["resources"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        all, total,
        "the ClusterRole grants something not listed here"
    );
    for rule in rules.as_array().unwrap() {
        for field in ["verbs", "resources", "apiGroups"] {
            assert!(
                !rule[field].as_array().unwrap().iter().any(|v| v == "*"),
                "no wildcards: {rule}"
            );
        }
    }
    let lease = &find(&docs, "Role")["rules"];
    assert_eq!(
        lease,
        &json!([{ "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"] }])
    );

    let pod = &find(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--sidecar-image=trellis/sidecar:0.1.0"),
        "{args:?}"
    );
    assert!(
        !args.contains(&"--leader-elect"),
        "one replica needs no election: {args:?}"
    );
}

#[test]
#[ignore = "needs the tools cache (helm): cargo xtask test"]
fn values_choose_leader_election_scope_and_monitoring() {
    let two = template(&["replicas=2"]).unwrap();
    let args =
        find(&two, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("\"--leader-elect\""),
        "two replicas must elect a leader: {args}"
    );

    let scoped = template(&["watchNamespace=shop"]).unwrap();
    assert!(
        scoped.iter().all(|d| d["kind"] != "ClusterRole"),
        "a namespaced install needs no ClusterRole"
    );
    let role = scoped
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == "shop")
        .expect("a Role in the watched namespace");
    assert!(role["rules"].to_string().contains("microservices"));

    let monitored = template(&["metrics.serviceMonitor.enabled=true"]).unwrap();
    assert_eq!(
        find(&monitored, "ServiceMonitor")["spec"]["endpoints"][0]["path"],
        "/metrics"
    );
}

#[test]
#[ignore = "needs the tools cache (helm): cargo xtask test"]
fn bad_values_are_refused_naming_the_value() {
    for (set, named) in [
        ("replicas=0", "/replicas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("watchNamespace=Not_A_Namespace", "/watchNamespace"),
        ("metrics.port=80", "/metrics/port"),
        ("logFormat=xml", "/logFormat"),
        ("unknownKey=1", "unknownKey"),
    ] {
        let err = template(&[set]).expect_err(set);
        assert!(
            err.contains(named),
            "{set}: the error should name {named}: {err}"
        );
    }
}

/// `helm install` on the node: the operator runs from its image with the chart's RBAC
/// only, and reconciles a MicroService to Ready; `helm uninstall` removes it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the full local node and the images: cargo xtask test"]
async fn helm_install_runs_the_operator_with_the_charts_rbac() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::PostParams;
    use trellis_operator::MicroService;

    let system = TestNamespace::on_node("trellis-system").await;
    let apps = TestNamespace::on_node("apps").await;
    let release = format!("t{}", &system.name[system.name.len() - 6..]);
    ok(
        helm()
            .args(["install", &release])
            .arg(chart())
            .args([
                "--namespace",
                &system.name,
                "--set",
                &format!("watchNamespace={}", apps.name),
            ])
            .args(["--wait", "--timeout", "120s"])
            .output()
            .unwrap(),
        "helm install",
    );
    let deployments = system.api::<Deployment>();
    let operator = format!("{release}-operator");
    eventually(
        "the operator to be available",
        Duration::from_secs(60),
        || async {
            let d = deployments.get(&operator).await.ok()?;
            (d.status?.available_replicas? == 1).then_some(())
        },
    )
    .await;

    let ms: MicroService = serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": "hello" },
        "spec": { "image": "trellis/smoke:0.1.0", "port": 8080, "health": { "path": "/", "interval": "1s" } },
    }))
    .unwrap();
    apps.api::<MicroService>()
        .create(&PostParams::default(), &ms)
        .await
        .unwrap();
    let microservices = apps.api::<MicroService>();
    eventually(
        "the MicroService to be Ready under the chart's operator",
        Duration::from_secs(120),
        || async {
            let ms = microservices.get("hello").await.ok()?;
            ms.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;

    ok(
        helm()
            .args(["uninstall", &release, "--namespace", &system.name, "--wait"])
            .output()
            .unwrap(),
        "helm uninstall",
    );
    eventually(
        "the operator to be gone",
        Duration::from_secs(60),
        || async {
            deployments
                .get_opt(&operator)
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
}
