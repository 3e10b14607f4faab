//! `trellis check`: is the mesh healthy? Each check is one line, ✓ or ✗,
//! and a failed one says what to do. The exit status is 0 only when every
//! check passed, so CI can gate on it (like `linkerd check`).

use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        coordination::v1::Lease,
        core::v1::{ConfigMap, Pod, Service},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use trellis_operator::{
    MicroService,
    render::{SIDECAR_CONTAINER, config_map_name, sidecar_name},
};
use trellis_policy::{POLICY_KEY, SidecarPolicy};

use crate::sidecars;

/// `trellis check`'s options.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Check the MicroServices of this namespace only (all namespaces by default).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Where the operator runs (found by its labels in any namespace by default).
    #[arg(long)]
    pub operator_namespace: Option<String>,
}

/// The label the chart puts on the operator's Deployment.
const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=trellis-operator";

/// What the chart grants the operator in the namespaces it watches, as
/// (API group, resource, verbs); `charts/trellis/templates/rbac.yaml`
/// (`tests/tests/chart.rs` checks that the two agree).
pub const OPERATOR_PERMISSIONS: &[(&str, &str, &[&str])] = &[
    ("trellis.dev", "microservices", &["list", "watch"]),
    ("trellis.dev", "microservices/status", &["patch"]),
    (
        "",
        "configmaps",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "",
        "serviceaccounts",
        &["get", "list", "watch", "create", "patch"],
    ),
    ("", "services", &["get", "list", "watch", "create", "patch"]),
    (
        "apps",
        "deployments",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "rbac.authorization.k8s.io",
        "roles",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["get", "list", "watch", "create", "patch"],
    ),
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
    // Metadata only: the Secrets MicroServices list in spec.secrets.
    ("", "secrets", &["get", "list", "watch"]),
    (
        "discovery.k8s.io",
        "endpointslices",
        &["get", "list", "watch"],
    ),
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// What the chart grants besides when the operator watches every namespace:
/// removing the grants in other namespaces that no dependency names any
/// more.
pub const CLUSTER_WIDE_PERMISSIONS: &[(&str, &str, &[&str])] = &[
    ("rbac.authorization.k8s.io", "roles", &["delete"]),
    ("rbac.authorization.k8s.io", "rolebindings", &["delete"]),
];

/// What the chart grants the gateway controller where the operator watches
/// (`gateway.enabled`): the Gateway API objects it serves and their status,
/// each gateway's configuration Secret, and EdgePolicies and their status.
pub const GATEWAY_PERMISSIONS: &[(&str, &str, &[&str])] = &[
    ("gateway.networking.k8s.io", "gateways", &["list", "watch"]),
    (
        "gateway.networking.k8s.io",
        "httproutes",
        &["list", "watch"],
    ),
    (
        "gateway.networking.k8s.io",
        "grpcroutes",
        &["list", "watch"],
    ),
    (
        "gateway.networking.k8s.io",
        "referencegrants",
        &["list", "watch"],
    ),
    ("gateway.networking.k8s.io", "gateways/status", &["patch"]),
    ("gateway.networking.k8s.io", "httproutes/status", &["patch"]),
    ("gateway.networking.k8s.io", "grpcroutes/status", &["patch"]),
    ("", "secrets", &["create", "patch"]),
    ("trellis.dev", "edgepolicies", &["list", "watch"]),
    ("trellis.dev", "edgepolicies/status", &["patch"]),
];

/// What the gateway controller needs outside any namespace, however the
/// operator is installed: the GatewayClasses and their status.
pub const GATEWAY_CLASS_PERMISSIONS: &[(&str, &str, &[&str])] = &[
    (
        "gateway.networking.k8s.io",
        "gatewayclasses",
        &["list", "watch"],
    ),
    (
        "gateway.networking.k8s.io",
        "gatewayclasses/status",
        &["patch"],
    ),
];

/// What the gateway controller needs outside the one namespace it watches:
/// that namespace's labels, for routes' selectors (granted by name).
pub const GATEWAY_WATCHED_NAMESPACE_PERMISSIONS: &[(&str, &str, &[&str])] =
    &[("", "namespaces", &["get"])];

/// What the gateway controller needs besides when the operator watches
/// every namespace: namespaces, for routes' selectors, and each gateway's
/// binding to the discovery ClusterRole (watching one namespace, it reads
/// that namespace only, and the bindings are RoleBindings there).
pub const GATEWAY_CLUSTER_WIDE_PERMISSIONS: &[(&str, &str, &[&str])] = &[
    ("", "namespaces", &["list", "watch"]),
    (
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        &["list", "create", "patch", "delete"],
    ),
];

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// What was checked.
    pub what: String,
    /// `Ok(detail)` when it holds; `Err((problem, fix))` when not.
    pub result: Result<String, (String, String)>,
}

impl Line {
    fn ok(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            result: Ok(detail.into()),
        }
    }

    fn fail(what: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            result: Err((problem.into(), fix.into())),
        }
    }

    /// The line as printed.
    pub fn render(&self) -> String {
        match &self.result {
            Ok(detail) if detail.is_empty() => format!("✓ {}", self.what),
            Ok(detail) => format!("✓ {}: {detail}", self.what),
            Err((problem, fix)) => format!("✗ {}: {problem}\n    → {fix}", self.what),
        }
    }
}

/// Runs every check, then prints a line for each; `true` when all passed.
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    let client = crate::client().await?;
    let lines = checks(&client, &opts).await?;
    for line in &lines {
        println!("{}", line.render());
    }
    let failed = lines.iter().filter(|l| l.result.is_err()).count();
    if failed == 0 {
        println!("all {} checks passed", lines.len());
    } else {
        println!("{failed} of {} checks failed", lines.len());
    }
    Ok(failed == 0)
}

/// Every check, in order: the CRD, the operator, the MicroServices.
/// Without a served CRD there are no MicroServices to list (the apiserver
/// answers 404): the CRD's line says what to do, and they are not checked.
pub async fn checks(client: &Client, opts: &Options) -> anyhow::Result<Vec<Line>> {
    let (crd_line, served) = crd(client).await?;
    let mut lines = vec![crd_line];
    let operators = operator(client, opts, &mut lines).await?;
    let sidecar_image = operators.iter().find_map(|d| arg(d, "--sidecar-image"));
    if served {
        microservices(client, opts, sidecar_image.as_deref(), &mut lines).await?;
    }
    Ok(lines)
}

/// The MicroService CRD: installed, established, and the one this CLI
/// knows; and whether the apiserver serves MicroServices (installed and
/// established, whatever its version).
async fn crd(client: &Client) -> anyhow::Result<(Line, bool)> {
    let what = "MicroService CRD";
    let want = trellis_operator::crd::crd();
    let name = want.metadata.name.clone().unwrap_or_default();
    let have = Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt(&name)
        .await
        .context("reading the MicroService CRD")?;
    let Some(have) = have else {
        let line = Line::fail(
            what,
            format!("{name} is not installed"),
            "install Trellis: helm install trellis charts/trellis -n trellis-system --create-namespace \
             (or kubectl apply --server-side -f crds/)",
        );
        return Ok((line, false));
    };
    let established = have.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Established" && c.status == "True")
    });
    if !established {
        let line = Line::fail(
            what,
            format!("{name} is not established yet"),
            format!("kubectl describe crd {name} shows why the apiserver has not accepted it"),
        );
        return Ok((line, false));
    }
    let schemas = |crd: &CustomResourceDefinition| {
        crd.spec
            .versions
            .iter()
            .map(|v| {
                let schema = serde_json::to_value(&v.schema).unwrap_or_default();
                (v.name.clone(), numbers_as_floats(schema))
            })
            .collect::<BTreeMap<_, _>>()
    };
    if schemas(&have) != schemas(&want) {
        let line = Line::fail(
            what,
            format!(
                "the installed {name} differs from this CLI's (trellis {})",
                env!("CARGO_PKG_VERSION")
            ),
            "apply the CRD of this version: kubectl apply --server-side -f crds/ \
             (helm upgrade does not update CRDs)",
        );
        return Ok((line, true));
    }
    let versions: Vec<_> = have.spec.versions.iter().map(|v| v.name.as_str()).collect();
    Ok((
        Line::ok(what, format!("{name} {}", versions.join(", "))),
        true,
    ))
}

/// `v` with every number a float: the apiserver gives back `2.0` as `2`
/// (in defaults and bounds), which is the same schema.
fn numbers_as_floats(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Number(n), Value::Number),
        Value::Array(a) => Value::Array(a.into_iter().map(numbers_as_floats).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k, numbers_as_floats(v)))
                .collect(),
        ),
        other => other,
    }
}

/// The value of `--flag=value` in the operator container's arguments.
fn arg(d: &Deployment, flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    operator_container(d)?
        .args
        .as_ref()?
        .iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

/// The value of environment variable `name` of the operator container.
fn env(d: &Deployment, name: &str) -> Option<String> {
    operator_container(d)?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

fn has_flag(d: &Deployment, flag: &str) -> bool {
    operator_container(d)
        .and_then(|c| c.args.as_ref())
        .is_some_and(|args| args.iter().any(|a| a == flag))
}

fn operator_container(d: &Deployment) -> Option<&k8s_openapi::api::core::v1::Container> {
    let containers = &d.spec.as_ref()?.template.spec.as_ref()?.containers;
    containers
        .iter()
        .find(|c| c.name == "operator")
        .or(containers.first())
}

/// The operator: found, ready, leading, and allowed what the chart grants.
async fn operator(
    client: &Client,
    opts: &Options,
    lines: &mut Vec<Line>,
) -> anyhow::Result<Vec<Deployment>> {
    let api = match &opts.operator_namespace {
        Some(ns) => Api::<Deployment>::namespaced(client.clone(), ns),
        None => Api::<Deployment>::all(client.clone()),
    };
    let found = api
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await
        .context("listing the operator's Deployments")?
        .items;
    if found.is_empty() {
        let place = opts
            .operator_namespace
            .as_deref()
            .map_or("any namespace".to_owned(), |ns| format!("namespace {ns}"));
        lines.push(Line::fail(
            "operator",
            format!("no Trellis operator in {place}"),
            "install it: helm install trellis charts/trellis -n trellis-system --create-namespace",
        ));
        return Ok(found);
    }
    for d in &found {
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let name = d.metadata.name.clone().unwrap_or_default();
        let what = format!("operator {ns}/{name}");
        let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if wanted == 0 {
            lines.push(Line::fail(
                format!("{what} running"),
                "scaled to 0 replicas: nothing reconciles MicroServices",
                format!("kubectl -n {ns} scale deployment/{name} --replicas=1"),
            ));
        } else if ready < wanted {
            lines.push(Line::fail(
                format!("{what} running"),
                format!("{ready} of {wanted} replicas ready"),
                format!(
                    "kubectl -n {ns} describe deployment/{name} and kubectl -n {ns} logs deployment/{name} say why"
                ),
            ));
        } else {
            lines.push(Line::ok(
                format!("{what} running"),
                format!("{ready} of {wanted} replicas ready"),
            ));
        }
        lines.push(leader(client, d, &ns, &what).await?);
        lines.push(permissions(client, d, &ns, &what).await?);
    }
    Ok(found)
}

/// Whether one ready pod of the operator holds its Lease (when it elects).
async fn leader(client: &Client, d: &Deployment, ns: &str, what: &str) -> anyhow::Result<Line> {
    let what = format!("{what} leading");
    if !has_flag(d, "--leader-elect") {
        return Ok(Line::ok(what, "one replica, no election"));
    }
    let lease_name = arg(d, "--lease-name").unwrap_or_else(|| "trellis-operator".into());
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(&lease_name)
        .await
        .context("reading the operator's Lease")?;
    let holder = lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty());
    let Some(holder) = holder else {
        return Ok(Line::fail(
            what,
            format!("no replica holds Lease {ns}/{lease_name}"),
            format!(
                "kubectl -n {ns} logs deployment/{} says why no replica leads",
                d.metadata.name.as_deref().unwrap_or_default()
            ),
        ));
    };
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .get_opt(&holder)
        .await?;
    let ready = pod.as_ref().is_some_and(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    });
    Ok(if ready {
        Line::ok(what, format!("{holder} holds Lease {lease_name}"))
    } else {
        Line::fail(
            what,
            format!("Lease {lease_name} names {holder}, which is not a ready pod"),
            "the Lease passes to a ready replica once it expires (about 15 s); if it does not, \
             restart the operator",
        )
    })
}

/// Where a list of grants is checked.
#[derive(Clone, Copy)]
enum Scope {
    /// In the watched namespace (every namespace when the operator watches all).
    Watched,
    /// Cluster-scoped objects.
    Cluster,
    /// The watched Namespace object itself, by name.
    WatchedNamespace,
}

/// Whether the operator's ServiceAccount may do what the chart grants, in
/// the namespace it watches (every namespace when it watches all).
async fn permissions(
    client: &Client,
    d: &Deployment,
    ns: &str,
    what: &str,
) -> anyhow::Result<Line> {
    let what = format!("{what} permissions");
    let account = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let user = format!("system:serviceaccount:{ns}:{account}");
    let watched = arg(d, "--watch-namespace");
    let reviews = Api::<SubjectAccessReview>::all(client.clone());
    let mut missing = Vec::new();
    let gateway = env(d, "TRELLIS_GATEWAY_CONTROLLER").as_deref() != Some("false");
    let mut wanted = vec![(OPERATOR_PERMISSIONS, Scope::Watched)];
    match (&watched, gateway) {
        (None, false) => wanted.push((CLUSTER_WIDE_PERMISSIONS, Scope::Watched)),
        (None, true) => wanted.extend([
            (CLUSTER_WIDE_PERMISSIONS, Scope::Watched),
            (GATEWAY_PERMISSIONS, Scope::Watched),
            (GATEWAY_CLASS_PERMISSIONS, Scope::Watched),
            (GATEWAY_CLUSTER_WIDE_PERMISSIONS, Scope::Watched),
        ]),
        (Some(_), false) => {}
        (Some(_), true) => wanted.extend([
            (GATEWAY_PERMISSIONS, Scope::Watched),
            (GATEWAY_CLASS_PERMISSIONS, Scope::Cluster),
            (
                GATEWAY_WATCHED_NAMESPACE_PERMISSIONS,
                Scope::WatchedNamespace,
            ),
        ]),
    }
    let grants = wanted
        .iter()
        .flat_map(|(list, scope)| list.iter().map(move |g| (g, *scope)));
    for ((group, resource, verbs), scope) in grants {
        let (namespace, name) = match scope {
            Scope::Watched => (watched.clone(), None),
            Scope::Cluster => (None, None),
            Scope::WatchedNamespace => (None, watched.clone()),
        };
        let (resource, subresource) = match resource.split_once('/') {
            Some((r, s)) => (r, Some(s.to_owned())),
            None => (*resource, None),
        };
        for verb in *verbs {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.clone()),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some((*group).into()),
                        resource: Some(resource.into()),
                        subresource: subresource.clone(),
                        verb: Some((*verb).into()),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        ..ResourceAttributes::default()
                    }),
                    ..SubjectAccessReviewSpec::default()
                },
                ..SubjectAccessReview::default()
            };
            let answer = reviews
                .create(&PostParams::default(), &review)
                .await
                .context("asking the apiserver what the operator may do (SubjectAccessReview)")?;
            if !answer.status.is_some_and(|s| s.allowed) {
                let full = subresource
                    .as_ref()
                    .map_or(resource.to_owned(), |s| format!("{resource}/{s}"));
                missing.push(format!(
                    "{verb} {full}{}",
                    if group.is_empty() {
                        String::new()
                    } else {
                        format!(".{group}")
                    }
                ));
            }
        }
    }
    let scope = watched.map_or("all namespaces".to_owned(), |w| format!("namespace {w}"));
    Ok(if missing.is_empty() {
        Line::ok(what, format!("{user} has the chart's grants in {scope}"))
    } else {
        Line::fail(
            what,
            format!("{user} may not {} in {scope}", missing.join(", ")),
            "reinstall the chart's RBAC: helm upgrade with the same values restores the Role and its binding",
        )
    })
}

/// Each MicroService: its children, Ready, and its sidecars on the policy
/// and image they were given.
async fn microservices(
    client: &Client,
    opts: &Options,
    sidecar_image: Option<&str>,
    lines: &mut Vec<Line>,
) -> anyhow::Result<()> {
    let api = match &opts.namespace {
        Some(ns) => Api::<MicroService>::namespaced(client.clone(), ns),
        None => Api::<MicroService>::all(client.clone()),
    };
    let all = api
        .list(&ListParams::default())
        .await
        .context("listing MicroServices")?
        .items;
    if all.is_empty() {
        lines.push(Line::ok("MicroServices", "none to check"));
    }
    for ms in &all {
        let ns = ms.metadata.namespace.clone().unwrap_or_default();
        let name = ms.metadata.name.clone().unwrap_or_default();
        let what = format!("MicroService {ns}/{name}");
        lines.push(children(client, &ns, &name, &what).await?);
        lines.push(ready(ms, &ns, &name, &what));
        lines.extend(sidecars_of(client, &ns, &name, &what, sidecar_image).await?);
    }
    Ok(())
}

async fn children(client: &Client, ns: &str, name: &str, what: &str) -> anyhow::Result<Line> {
    let mut missing = Vec::new();
    if Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .is_none()
    {
        missing.push(format!("Deployment {name}"));
    }
    if Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .is_none()
    {
        missing.push(format!("Service {name}"));
    }
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), ns);
    for cm in [config_map_name(name), sidecar_name(name)] {
        if config_maps.get_opt(&cm).await?.is_none() {
            missing.push(format!("ConfigMap {cm}"));
        }
    }
    Ok(if missing.is_empty() {
        Line::ok(format!("{what} children"), "")
    } else {
        Line::fail(
            format!("{what} children"),
            format!("missing {}", missing.join(", ")),
            format!(
                "the operator makes them: check that it runs and watches {ns} (kubectl describe microservice -n {ns} {name})"
            ),
        )
    })
}

fn ready(ms: &MicroService, ns: &str, name: &str, what: &str) -> Line {
    let ready = ms
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => Line::ok(format!("{what} Ready"), ""),
        Some(c) => Line::fail(
            format!("{what} Ready"),
            format!("{}: {}", c.reason, c.message),
            format!("kubectl describe microservice -n {ns} {name} shows its conditions and events"),
        ),
        None => Line::fail(
            format!("{what} Ready"),
            "no Ready condition: the operator has not reconciled it",
            "check that the operator runs and watches this namespace (trellis check lists it above)",
        ),
    }
}

/// The policy in the sidecar ConfigMap: `None` when there is none,
/// `Some(Err)` when it is not a valid policy (no sidecar can be running it).
async fn given_policy(
    client: &Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<Option<Result<serde_json::Value, String>>> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(&sidecar_name(name))
        .await?;
    let Some(json) = cm
        .and_then(|c| c.data)
        .and_then(|d| d.get(POLICY_KEY).cloned())
    else {
        return Ok(None);
    };
    Ok(Some(
        SidecarPolicy::from_json(&json)
            .map(|p| serde_json::to_value(p).unwrap_or_default())
            .map_err(|e| e.to_string()),
    ))
}

async fn sidecars_of(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    sidecar_image: Option<&str>,
) -> anyhow::Result<Vec<Line>> {
    let pods = sidecars::pods(client, ns, name).await?;
    let given = given_policy(client, ns, name).await?;
    let mut stale = Vec::new();
    let mut images = Vec::new();
    for pod in &pods {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let status: serde_json::Value = match sidecars::admin_get(client, pod, "/status").await {
            Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
            Err(e) => {
                stale.push(format!("{pod_name} (its /status did not answer: {e:#})"));
                continue;
            }
        };
        let current = &status["policy"]["current"];
        let running = SidecarPolicy::from_json(&current.to_string())
            .ok()
            .and_then(|p| serde_json::to_value(p).ok());
        let differs = match &given {
            Some(Ok(want)) => running.as_ref() != Some(want),
            Some(Err(_)) => true,
            None => false,
        };
        if differs {
            let why = match (status["policy"]["rejected"]["error"].as_str(), &given) {
                (Some(e), _) => format!(", it rejected the new one: {e}"),
                (None, Some(Err(e))) => format!(", and the ConfigMap's policy is invalid: {e}"),
                (None, _) => String::new(),
            };
            stale.push(format!("{pod_name}{why}"));
        }
        let image = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
            .find(|c| c.name == SIDECAR_CONTAINER)
            .and_then(|c| c.image.clone());
        if let (Some(want), Some(have)) = (sidecar_image, image)
            && want != have
        {
            images.push(format!("{pod_name} runs {have}"));
        }
    }
    let policy_line = if pods.is_empty() {
        Line::fail(
            format!("{what} sidecars"),
            "no running pod",
            format!("kubectl -n {ns} describe deployment/{name} says why no pod runs"),
        )
    } else if stale.is_empty() {
        Line::ok(
            format!("{what} sidecars"),
            format!(
                "{} running the policy in ConfigMap {}",
                pods.len(),
                sidecar_name(name)
            ),
        )
    } else {
        Line::fail(
            format!("{what} sidecars"),
            format!(
                "not running the policy in ConfigMap {}: {}",
                sidecar_name(name),
                stale.join("; ")
            ),
            format!(
                "a sidecar keeps its last good policy when a new one is invalid: fix the MicroService \
                 (kubectl describe microservice -n {ns} {name}); a valid one applies within about a \
                 minute (the kubelet's ConfigMap sync)"
            ),
        )
    };
    let mut lines = vec![policy_line];
    if let Some(want) = sidecar_image {
        lines.push(if images.is_empty() {
            Line::ok(format!("{what} sidecar version"), want.to_owned())
        } else {
            Line::fail(
                format!("{what} sidecar version"),
                format!("the operator renders {want}, but {}", images.join(", ")),
                format!("roll the pods onto it: kubectl -n {ns} rollout restart deployment/{name}"),
            )
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    /// A client of a fake apiserver that answers with `answer(path)`:
    /// `Some(json)` is a 200, `None` a 404.
    fn fake(answer: fn(&str) -> Option<Value>) -> Client {
        let service = tower::service_fn(move |req: Request<Body>| async move {
            let path = req.uri().path().to_owned();
            let (status, body) = match answer(&path) {
                Some(v) => (StatusCode::OK, v),
                None => (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
                ),
            };
            let rsp = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap();
            Ok::<_, Infallible>(rsp)
        });
        Client::new(service, "default")
    }

    fn empty_list(path: &str) -> Option<Value> {
        // Collections (no object name after the resource) are empty lists.
        let collection = ["deployments", "microservices"]
            .iter()
            .any(|r| path.ends_with(r));
        collection.then(|| json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}))
    }

    #[test]
    fn a_schema_given_back_with_integral_numbers_is_the_same() {
        let a = json!({"default": 2.0, "maximum": 100.0, "items": [{"minimum": 1.5}]});
        let b = json!({"default": 2, "maximum": 100, "items": [{"minimum": 1.5}]});
        assert_ne!(a, b);
        assert_eq!(numbers_as_floats(a), numbers_as_floats(b));
    }

    #[tokio::test]
    async fn a_missing_crd_and_operator_fail_naming_the_fix() {
        // Without the CRD the apiserver has no MicroServices to list: 404.
        fn answer(path: &str) -> Option<Value> {
            if path.ends_with("microservices") {
                return None;
            }
            empty_list(path)
        }
        let client = fake(answer);
        let opts = Options {
            namespace: None,
            operator_namespace: None,
        };
        let lines = checks(&client, &opts).await.unwrap();
        let crd = lines[0].render();
        assert!(
            crd.starts_with("✗ MicroService CRD: microservices.trellis.dev is not installed"),
            "{crd}"
        );
        assert!(crd.contains("→ install Trellis: helm install"), "{crd}");
        let operator = lines[1].render();
        assert!(
            operator.starts_with("✗ operator: no Trellis operator in any namespace"),
            "{operator}"
        );
        assert_eq!(lines.len(), 2, "MicroServices are not checked: {lines:?}");
    }

    #[tokio::test]
    async fn an_operator_scaled_to_zero_fails_naming_the_command() {
        fn answer(path: &str) -> Option<Value> {
            if path.ends_with("customresourcedefinitions/microservices.trellis.dev") {
                let mut crd = serde_json::to_value(trellis_operator::crd::crd()).unwrap();
                crd["status"] = json!({"conditions": [{"type": "Established", "status": "True"}]});
                return Some(crd);
            }
            if path.ends_with("/deployments") {
                return Some(
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": [{
                        "apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"name": "trellis-operator", "namespace": "trellis-system"},
                        "spec": {"replicas": 0, "selector": {}, "template": {"spec": {"containers": [
                            {"name": "operator", "args": ["--sidecar-image=trellis/sidecar:0.1.0"]}]}}},
                        "status": {}
                    }]}),
                );
            }
            if path.ends_with("/subjectaccessreviews") {
                return Some(
                    json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                                   "spec": {}, "status": {"allowed": true}}),
                );
            }
            empty_list(path)
        }
        let lines = checks(
            &fake(answer),
            &Options {
                namespace: None,
                operator_namespace: None,
            },
        )
        .await
        .unwrap();
        let rendered: Vec<String> = lines.iter().map(Line::render).collect();
        assert!(
            rendered[0].starts_with("✓ MicroService CRD: microservices.trellis.dev v1alpha1"),
            "{rendered:?}"
        );
        assert_eq!(
            rendered[1],
            "✗ operator trellis-system/trellis-operator running: scaled to 0 replicas: nothing reconciles MicroServices\n    → kubectl -n trellis-system scale deployment/trellis-operator --replicas=1"
        );
        assert_eq!(
            rendered[2],
            "✓ operator trellis-system/trellis-operator leading: one replica, no election"
        );
        assert!(
            rendered[3].starts_with("✓ operator trellis-system/trellis-operator permissions"),
            "{rendered:?}"
        );
    }
}

#[cfg(test)]
mod policy_tests {
    use std::convert::Infallible;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    const GIVEN: &str =
        r#"{"service":"order","namespace":"shop","appPort":8080,"resilience":{"timeout":"3s"}}"#;
    const OLD: &str = r#"{"service":"order","namespace":"shop","appPort":8080}"#;

    fn answer(path: &str) -> (StatusCode, String) {
        let list = |items: Value| json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items});
        let v = if path.ends_with("/microservices") {
            list(
                json!([{"apiVersion": "trellis.dev/v1alpha1", "kind": "MicroService",
                "metadata": {"name": "order", "namespace": "shop"},
                "spec": {"image": "order:1", "port": 8080},
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Available",
                    "message": "", "lastTransitionTime": "2026-12-02T00:00:00Z"}]}}]),
            )
        } else if path.ends_with("/pods") {
            list(
                json!([{"metadata": {"name": "order-1", "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": "order:1"}]},
                "status": {"phase": "Running"}}]),
            )
        } else if path.ends_with("/pods/order-1:15020/proxy/status") {
            let status = json!({"policy": {"generation": 1, "current": serde_json::from_str::<Value>(OLD).unwrap(),
                "rejected": {"error": "resilience.timeout: invalid duration"}}});
            return (StatusCode::OK, status.to_string());
        } else if path.ends_with("/configmaps/order-sidecar") {
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "order-sidecar"},
                "data": {POLICY_KEY: GIVEN}})
        } else if path.ends_with("/configmaps/order-config") {
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "order-config"}})
        } else if path.ends_with("/deployments/order") {
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "order"}})
        } else if path.ends_with("/services/order") {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "order"}})
        } else {
            return (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1",
                "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
                .to_string(),
            );
        };
        (StatusCode::OK, v.to_string())
    }

    #[tokio::test]
    async fn a_sidecar_on_an_older_policy_fails_naming_the_pod_and_why() {
        let service = tower::service_fn(|req: Request<Body>| async move {
            let (status, body) = answer(req.uri().path());
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Body::from(body.into_bytes()))
                    .unwrap(),
            )
        });
        let client = Client::new(service, "default");
        let mut lines = Vec::new();
        microservices(
            &client,
            &Options {
                namespace: Some("shop".into()),
                operator_namespace: None,
            },
            None,
            &mut lines,
        )
        .await
        .unwrap();
        let rendered: Vec<String> = lines.iter().map(Line::render).collect();
        assert_eq!(rendered[0], "✓ MicroService shop/order children");
        assert_eq!(rendered[1], "✓ MicroService shop/order Ready");
        assert!(
            rendered[2].starts_with(
                "✗ MicroService shop/order sidecars: not running the policy in ConfigMap order-sidecar: \
                 order-1, it rejected the new one: resilience.timeout: invalid duration"
            ),
            "{rendered:?}"
        );
        assert!(
            rendered[2].contains("→ a sidecar keeps its last good policy"),
            "{rendered:?}"
        );
    }
}
