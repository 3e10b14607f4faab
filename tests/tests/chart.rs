//! The Helm chart: lint, what `helm template` renders, the values schema, and a
//! real `helm install` on the node running the operator with exactly the chart's RBAC.

use std::{collections::BTreeSet, path::PathBuf, process::Output, time::Duration};

use serde_json::{Value, json};
use trellis_tests::{TestNamespace, eventually, helm};

fn chart() -> PathBuf {
    trellis_tests::shop::workspace().join("charts/trellis")
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

/// The first object of `kind` that is the operator's (not the identity
/// service's, whose objects are named `<release>-identity`).
fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && !is_identity(d) && !is_gateway_role(d))
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn is_identity(doc: &Value) -> bool {
    doc["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n.contains("-identity"))
}

/// Whether a rendered object is the ClusterRole the operator binds each
/// gateway to (not the operator's own).
fn is_gateway_role(doc: &Value) -> bool {
    doc["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n.ends_with("-operator-gateway"))
}

/// One grant of the operator's ClusterRole and the test that fails without it.
struct Grant {
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    /// `file::function` in tests/tests/.
    needed_by: &'static str,
    why: &'static str,
}

const fn grant(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    needed_by: &'static str,
    why: &'static str,
) -> Grant {
    Grant {
        group,
        resource,
        verbs,
        needed_by,
        why,
    }
}

const CREATE: &str = "operator::create_makes_every_child_with_the_exact_fields";
const UPDATE: &str = "operator::updates_change_the_right_children_and_only_them";
const DRIFT: &str = "operator::drift_is_put_back_promptly";
const FOREIGN: &str = "operator::a_foreign_object_with_a_child_name_is_left_alone_and_reported";
const CHART_RBAC: &str = "chart::helm_install_runs_the_operator_with_the_charts_rbac";
const CROSS_NAMESPACE: &str =
    "grants::a_dependency_in_another_namespace_is_granted_used_and_revoked";
const GATEWAY: &str = "gateway::a_gateway_serves_its_routes_and_reports_their_status";
const EDGE_POLICY: &str =
    "gateway::an_edge_policy_requires_a_token_at_the_gateway_and_reports_accepted";

/// Why the operator's ClusterRole grants each verb: the test that needs it.
/// Children: server-side apply of a new object needs `create` as well as
/// `patch`; each child is read (`get`) before the first write to find foreign
/// objects with its name; the controller lists and watches every child kind.
/// The sidecar's Role grants get/list/watch on ConfigMaps and EndpointSlices,
/// and RBAC lets the operator grant only what it holds (it has no `escalate`).
const GRANTS: &[Grant] = &[
    grant(
        "gateway.networking.k8s.io",
        "gatewayclasses",
        &["list", "watch"],
        GATEWAY,
        "the gateway controller serves the classes naming it",
    ),
    grant(
        "gateway.networking.k8s.io",
        "gateways",
        &["list", "watch"],
        GATEWAY,
        "each Gateway of those classes becomes a data plane",
    ),
    grant(
        "gateway.networking.k8s.io",
        "httproutes",
        &["list", "watch"],
        GATEWAY,
        "routes program the gateways they attach to",
    ),
    grant(
        "gateway.networking.k8s.io",
        "grpcroutes",
        &["list", "watch"],
        GATEWAY,
        "routes program the gateways they attach to",
    ),
    grant(
        "gateway.networking.k8s.io",
        "referencegrants",
        &["list", "watch"],
        GATEWAY,
        "cross-namespace backends and certificates need a grant",
    ),
    grant(
        "gateway.networking.k8s.io",
        "gatewayclasses/status",
        &["patch"],
        GATEWAY,
        "a class served is Accepted",
    ),
    grant(
        "gateway.networking.k8s.io",
        "gateways/status",
        &["patch"],
        GATEWAY,
        "addresses, conditions and listeners",
    ),
    grant(
        "gateway.networking.k8s.io",
        "httproutes/status",
        &["patch"],
        GATEWAY,
        "each parent's Accepted and ResolvedRefs",
    ),
    grant(
        "gateway.networking.k8s.io",
        "grpcroutes/status",
        &["patch"],
        GATEWAY,
        "each parent's Accepted and ResolvedRefs",
    ),
    grant(
        "",
        "namespaces",
        &["list", "watch"],
        GATEWAY,
        "allowedRoutes selects namespaces by label",
    ),
    grant(
        "",
        "secrets",
        &["create", "patch"],
        GATEWAY,
        "a gateway's configuration holds its listeners' TLS keys",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        &["list", "create", "patch", "delete"],
        GATEWAY,
        "each gateway reads EndpointSlices in its backends' namespaces; stale bindings are deleted",
    ),
    grant(
        "trellis.dev",
        "edgepolicies",
        &["list", "watch"],
        EDGE_POLICY,
        "policies attached to Gateways and routes program their rules",
    ),
    grant(
        "trellis.dev",
        "edgepolicies/status",
        &["patch"],
        EDGE_POLICY,
        "each target's Accepted and ResolvedRefs",
    ),
    grant(
        "trellis.dev",
        "microservices",
        &["list", "watch"],
        CREATE,
        "the controller watches MicroServices",
    ),
    grant(
        "trellis.dev",
        "microservices/status",
        &["patch"],
        CREATE,
        "status is server-side applied",
    ),
    grant(
        "",
        "configmaps",
        &["get"],
        FOREIGN,
        "read before writing; granted to the sidecar's Role",
    ),
    grant(
        "",
        "configmaps",
        &["list", "watch"],
        DRIFT,
        "owned children are watched; granted to the sidecar's Role",
    ),
    grant(
        "",
        "configmaps",
        &["create"],
        CREATE,
        "the app and policy ConfigMaps are created",
    ),
    grant(
        "",
        "configmaps",
        &["patch"],
        UPDATE,
        "a config change is applied",
    ),
    grant(
        "",
        "serviceaccounts",
        &["get"],
        FOREIGN,
        "read before writing",
    ),
    grant(
        "",
        "serviceaccounts",
        &["list", "watch"],
        DRIFT,
        "owned children are watched",
    ),
    grant(
        "",
        "serviceaccounts",
        &["create"],
        CREATE,
        "the sidecar's ServiceAccount is created",
    ),
    grant(
        "",
        "serviceaccounts",
        &["patch"],
        DRIFT,
        "applied on every reconcile, putting back edits",
    ),
    grant("", "services", &["get"], FOREIGN, "read before writing"),
    grant(
        "",
        "services",
        &["list", "watch"],
        DRIFT,
        "a deleted Service is seen and put back",
    ),
    grant(
        "",
        "services",
        &["create"],
        CREATE,
        "the Service is created",
    ),
    grant(
        "",
        "services",
        &["patch"],
        UPDATE,
        "applied on every reconcile",
    ),
    grant(
        "apps",
        "deployments",
        &["get"],
        FOREIGN,
        "read before writing",
    ),
    grant(
        "apps",
        "deployments",
        &["list", "watch"],
        DRIFT,
        "an edited Deployment is seen",
    ),
    grant(
        "apps",
        "deployments",
        &["create"],
        CREATE,
        "the Deployment is created",
    ),
    grant(
        "apps",
        "deployments",
        &["patch"],
        UPDATE,
        "image and replicas changes are applied",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "roles",
        &["get"],
        FOREIGN,
        "read before writing",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "roles",
        &["list", "watch"],
        DRIFT,
        "a widened Role is seen",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "roles",
        &["create"],
        CREATE,
        "the sidecar's Role is created",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "roles",
        &["patch"],
        DRIFT,
        "a widened Role is put back",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["get"],
        FOREIGN,
        "read before writing",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["list", "watch"],
        DRIFT,
        "owned children are watched",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["create"],
        CREATE,
        "the sidecar's RoleBinding is created",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["patch"],
        DRIFT,
        "applied on every reconcile",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "roles",
        &["delete"],
        CROSS_NAMESPACE,
        "a grant in a dependency's namespace goes with the dependency or its MicroService",
    ),
    grant(
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["delete"],
        CROSS_NAMESPACE,
        "a grant in a dependency's namespace goes with the dependency or its MicroService",
    ),
    grant(
        "policy",
        "poddisruptionbudgets",
        &["get"],
        UPDATE,
        "read before writing and before deleting",
    ),
    grant(
        "policy",
        "poddisruptionbudgets",
        &["list", "watch"],
        DRIFT,
        "owned children are watched",
    ),
    grant(
        "policy",
        "poddisruptionbudgets",
        &["create"],
        CREATE,
        "a PDB for more than one replica",
    ),
    grant(
        "policy",
        "poddisruptionbudgets",
        &["patch"],
        UPDATE,
        "applied on every reconcile",
    ),
    grant(
        "policy",
        "poddisruptionbudgets",
        &["delete"],
        UPDATE,
        "removed when one replica is left",
    ),
    grant(
        "autoscaling",
        "horizontalpodautoscalers",
        &["get"],
        UPDATE,
        "read before writing and before deleting",
    ),
    grant(
        "autoscaling",
        "horizontalpodautoscalers",
        &["list", "watch"],
        DRIFT,
        "owned children are watched",
    ),
    grant(
        "autoscaling",
        "horizontalpodautoscalers",
        &["create", "patch"],
        UPDATE,
        "autoscaling turned on and changed",
    ),
    grant(
        "autoscaling",
        "horizontalpodautoscalers",
        &["delete"],
        UPDATE,
        "removed when autoscaling is turned off",
    ),
    grant(
        "",
        "secrets",
        &["get", "list", "watch"],
        CHART_RBAC,
        "a listed Secret's metadata (never its data): watched to roll the pods, read when the \
         cache lacks it",
    ),
    grant(
        "discovery.k8s.io",
        "endpointslices",
        &["get", "list", "watch"],
        CHART_RBAC,
        "granted to the sidecar's Role",
    ),
    grant(
        "events.k8s.io",
        "events",
        &["create", "patch"],
        FOREIGN,
        "a Warning event, repeated as a series",
    ),
];

/// Panics unless `file::function` names a test function in tests/tests/.
fn assert_test_exists(needed_by: &str) {
    let (file, function) = needed_by
        .split_once("::")
        .unwrap_or_else(|| panic!("{needed_by}: not file::function"));
    let path = trellis_tests::shop::workspace().join(format!("tests/tests/{file}.rs"));
    let source = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{needed_by}: reading {}: {e}", path.display()));
    assert!(
        source.contains(&format!("fn {function}()")),
        "{needed_by}: no such test in {}",
        path.display()
    );
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

/// What the chart renders for each of its two services (the operator and
/// the identity service), in order.
const SERVICE_KINDS: [&str; 7] = [
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "Deployment",
];

#[test]
#[ignore = "needs the tools cache (helm): cargo xtask test"]
fn the_operator_runs_restricted_with_exactly_the_rbac_it_needs() {
    let docs = template(&[]).expect("the defaults render");
    let kinds: Vec<&str> = docs
        .iter()
        .filter(|d| !is_identity(d) && !is_gateway_role(d))
        .filter_map(|d| d["kind"].as_str())
        .collect();
    assert_eq!(kinds, SERVICE_KINDS);
    // Each gateway reads EndpointSlices, and nothing else.
    let gateway_role = docs
        .iter()
        .find(|d| is_gateway_role(d))
        .expect("the gateway ClusterRole");
    assert_eq!(
        gateway_role["rules"],
        json!([{ "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"] }])
    );

    // Every verb on every resource, exactly, each needed by a test: a new grant
    // must be added to GRANTS on purpose, with the test that fails without it.
    let rules = &find(&docs, "ClusterRole")["rules"];
    let mut granted = BTreeSet::new();
    for rule in rules.as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    let grant = (
                        group.as_str().unwrap().to_owned(),
                        resource.as_str().unwrap().to_owned(),
                        verb.as_str().unwrap().to_owned(),
                    );
                    assert!(granted.insert(grant.clone()), "granted twice: {grant:?}");
                }
            }
        }
    }
    let mut listed = BTreeSet::new();
    for grant in GRANTS {
        assert_test_exists(grant.needed_by);
        assert!(!grant.why.is_empty());
        for verb in grant.verbs {
            let g = (
                grant.group.to_owned(),
                grant.resource.to_owned(),
                (*verb).to_owned(),
            );
            assert!(listed.insert(g.clone()), "listed twice in GRANTS: {g:?}");
        }
    }
    let unjustified: Vec<_> = granted.difference(&listed).collect();
    assert!(
        unjustified.is_empty(),
        "the ClusterRole grants {unjustified:?}, which no test needs: remove the grant, or add it \
         to GRANTS with the test that fails without it"
    );
    let missing: Vec<_> = listed.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "GRANTS lists {missing:?}, which the ClusterRole does not grant"
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
        &json!([
            { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"] },
            { "apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["trellis-trust-bundle"], "verbs": ["get", "list", "watch"] },
        ])
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

/// The (group, resource, verb) triples of a rendered Role or ClusterRole.
fn grants_of(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    out.insert((
                        group.as_str().unwrap().to_owned(),
                        resource.as_str().unwrap().to_owned(),
                        verb.as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
    }
    out
}

fn triples(list: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    list.iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
        })
        .collect()
}

/// `trellis check` asks the apiserver about exactly what the chart grants
/// the operator, for a cluster-wide and for a namespaced install.
#[test]
#[ignore = "needs the tools cache (helm): cargo xtask test"]
fn trellis_check_asks_for_exactly_what_the_chart_grants() {
    use trellis_cli::check::{
        CLUSTER_WIDE_PERMISSIONS, GATEWAY_CLASS_PERMISSIONS, GATEWAY_CLUSTER_WIDE_PERMISSIONS,
        GATEWAY_PERMISSIONS, GATEWAY_WATCHED_NAMESPACE_PERMISSIONS, OPERATOR_PERMISSIONS,
    };
    let role_of = |docs: &[Value]| {
        grants_of(
            docs.iter()
                .find(|d| {
                    (d["kind"] == "Role" || d["kind"] == "ClusterRole")
                        && d["rules"].to_string().contains("microservices")
                })
                .expect("the operator's Role or ClusterRole"),
        )
    };
    let classes_role = |docs: &[Value]| {
        docs.iter()
            .find(|d| {
                d["kind"] == "ClusterRole"
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with("-gateway-classes"))
            })
            .map(grants_of)
    };

    let cluster_wide = template(&[]).unwrap();
    let mut want = triples(OPERATOR_PERMISSIONS);
    for list in [
        CLUSTER_WIDE_PERMISSIONS,
        GATEWAY_PERMISSIONS,
        GATEWAY_CLASS_PERMISSIONS,
        GATEWAY_CLUSTER_WIDE_PERMISSIONS,
    ] {
        want.extend(triples(list));
    }
    assert_eq!(role_of(&cluster_wide), want);
    assert_eq!(classes_role(&cluster_wide), None);

    let no_gateway = template(&["gateway.enabled=false"]).unwrap();
    let mut want = triples(OPERATOR_PERMISSIONS);
    want.extend(triples(CLUSTER_WIDE_PERMISSIONS));
    assert_eq!(role_of(&no_gateway), want);

    // For one namespace: the gateway's namespaced grants in the Role, and
    // outside it only the GatewayClasses and that namespace, by name.
    let namespaced = template(&["watchNamespace=apps"]).unwrap();
    let mut want = triples(OPERATOR_PERMISSIONS);
    want.extend(triples(GATEWAY_PERMISSIONS));
    assert_eq!(role_of(&namespaced), want);
    let mut want = triples(GATEWAY_CLASS_PERMISSIONS);
    want.extend(triples(GATEWAY_WATCHED_NAMESPACE_PERMISSIONS));
    assert_eq!(classes_role(&namespaced), Some(want));
    let names = namespaced
        .iter()
        .find(|d| {
            d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-gateway-classes"))
        })
        .map(|d| d["rules"][2]["resourceNames"].clone());
    assert_eq!(names, Some(json!(["apps"])));

    let namespaced = template(&["watchNamespace=apps", "gateway.enabled=false"]).unwrap();
    assert_eq!(role_of(&namespaced), triples(OPERATOR_PERMISSIONS));
    assert_eq!(classes_role(&namespaced), None);
}

/// The identity service: its own ServiceAccount, which alone may read the
/// issuer's Secret (by name) and create TokenReviews; restricted like the
/// operator; the operator told where it is. Off, none of it is rendered.
#[test]
#[ignore = "needs the tools cache (helm): cargo xtask test"]
fn the_identity_service_runs_apart_with_only_what_it_needs() {
    let docs = template(&[]).unwrap();
    let identity: Vec<&Value> = docs.iter().filter(|d| is_identity(d)).collect();
    let kinds: Vec<&str> = identity.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, SERVICE_KINDS);
    let of = |kind: &str| *identity.iter().find(|d| d["kind"] == kind).unwrap();
    assert_eq!(
        of("ClusterRole")["rules"],
        json!([{ "apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"] }])
    );
    assert_eq!(
        of("Role")["rules"][0],
        json!({ "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["trellis-identity-issuer"], "verbs": ["get"] })
    );
    // trellis check finds the operator by this label; the identity service is not it.
    assert_ne!(
        of("Deployment")["metadata"]["labels"]["app.kubernetes.io/name"],
        "trellis-operator"
    );
    let pod = &of("Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "trellis-operator-identity");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "identity");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let operator_args =
        find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        operator_args
            .contains("--identity-address=trellis-operator-identity.trellis-system.svc:8443"),
        "{operator_args}"
    );

    let off = template(&["identity.enabled=false"]).unwrap();
    assert!(off.iter().all(|d| !is_identity(d)));
    let args =
        find(&off, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(!args.contains("--identity-address"), "{args}");
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

    let scoped = template(&["watchNamespace=shop", "gateway.enabled=false"]).unwrap();
    assert!(
        scoped
            .iter()
            .all(|d| d["kind"] != "ClusterRole" || is_identity(d)),
        "a namespaced install's operator needs no ClusterRole without the gateway"
    );
    let role = scoped
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == "shop")
        .expect("a Role in the watched namespace");
    assert!(role["rules"].to_string().contains("microservices"));

    let prompt = template(&["statusReportWaitSeconds=0"]).unwrap();
    let args = find(&prompt, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        .to_string();
    assert!(
        args.contains("\"--status-report-wait-seconds=0\""),
        "the status report wait must reach the operator: {args}"
    );

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
        ("statusReportWaitSeconds=-1", "/statusReportWaitSeconds"),
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

    // A Secret it lists, as environment variables and files: the operator
    // reads its metadata with the chart's RBAC, and the pod (restricted, as
    // the chart's namespace is) starts with it mounted.
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": { "name": "hello-secret" },
        "stringData": { "GREETING": "hello" },
    }))
    .unwrap();
    apps.api::<k8s_openapi::api::core::v1::Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let ms: MicroService = serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": "hello" },
        "spec": {
            "image": "trellis/smoke:0.1.0",
            "port": 8080,
            "health": { "path": "/", "interval": "1s" },
            "secrets": [{ "name": "hello-secret", "env": true, "files": true }],
        },
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
