//! The operator against a real apiserver (the control-plane-only cluster:
//! etcd, kube-apiserver and kube-controller-manager with its garbage
//! collector; pods may never run, so nothing here waits for readiness).
//!
//! Each test gets a namespace of its own (restricted Pod Security enforced)
//! and runs the controller in-process, watching that namespace only, after
//! installing the CRD from the committed `crds/microservice.yaml` with
//! server-side apply. Run them with `cargo xtask test`, or with
//! `cargo test -p trellis-tests --test operator -- --ignored`.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount},
    events::v1::Event,
    policy::v1::PodDisruptionBudget,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use trellis_operator::{
    MicroService, Phase, Settings,
    leader::{LeaderElector, Timing},
    render::{self, RenderConfig},
};
use trellis_policy::SidecarPolicy;
use trellis_tests::{
    TestNamespace, eventually,
    operator::{Operator, install_crd},
};

const SIDECAR_IMAGE: &str = "trellis/sidecar:itest";
const WAIT: Duration = Duration::from_secs(30);

fn microservice(name: &str, spec: Value) -> MicroService {
    serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a MicroService")
}

/// Applies a MicroService as a user would (`kubectl apply --server-side`).
async fn apply_ms(ns: &TestNamespace, name: &str, spec: Value) -> MicroService {
    let ms = microservice(name, spec);
    ns.api::<MicroService>()
        .patch(
            name,
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&ms),
        )
        .await
        .unwrap_or_else(|e| panic!("applying MicroService {name}: {e}"))
}

async fn get<K>(ns: &TestNamespace, name: &str) -> Option<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    ns.api::<K>()
        .get_opt(name)
        .await
        .expect("reading from the apiserver")
}

/// Waits until `name` of kind `K` exists and `ok` holds for it.
async fn wait_for<K>(ns: &TestNamespace, name: &str, what: &str, ok: impl Fn(&K) -> bool) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    eventually(what, WAIT, || async {
        get::<K>(ns, name).await.filter(|k| ok(k))
    })
    .await
}

async fn wait_status(
    ns: &TestNamespace,
    name: &str,
    what: &str,
    ok: impl Fn(&MicroService) -> bool,
) -> MicroService {
    wait_for::<MicroService>(ns, name, what, |m| m.status.is_some() && ok(m)).await
}

fn condition<'a>(
    ms: &'a MicroService,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    ms.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Asserts that every field of `want` is in `have` with the same value
/// (`have` may have more: apiserver defaults, status, metadata).
fn assert_subset(path: &str, want: &Value, have: &Value) {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => {
            for (k, v) in w {
                let at = format!("{path}.{k}");
                let hv = h
                    .get(k)
                    .unwrap_or_else(|| panic!("{at} missing; have {have:#}"));
                assert_subset(&at, v, hv);
            }
        }
        (Value::Array(w), Value::Array(h)) => {
            assert_eq!(
                w.len(),
                h.len(),
                "{path}: lengths differ: want {want:#}, have {have:#}"
            );
            for (i, (wv, hv)) in w.iter().zip(h).enumerate() {
                assert_subset(&format!("{path}[{i}]"), wv, hv);
            }
        }
        _ => assert_eq!(want, have, "{path}"),
    }
}

/// The live object holds every field the renderer produced for it.
fn assert_rendered<K: serde::Serialize>(want: &K, have: &K) {
    let mut want = serde_json::to_value(want).unwrap();
    let have = serde_json::to_value(have).unwrap();
    // The owner reference is checked separately (its uid is known only now).
    want["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("ownerReferences");
    let kind = want["kind"].as_str().unwrap_or_default().to_owned();
    assert_subset(&kind, &want, &have);
}

fn controlled_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ms: &MicroService,
) -> bool {
    render::is_controlled_by(meta.owner_references.as_deref(), ms)
}

/// Events about the MicroService `name`, as (type, reason, note).
async fn events(ns: &TestNamespace, name: &str) -> Vec<(String, String, String)> {
    ns.api::<Event>()
        .list(&ListParams::default())
        .await
        .expect("listing events")
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("MicroService")
        })
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

fn policy_of(cm: &ConfigMap) -> SidecarPolicy {
    SidecarPolicy::from_json(&cm.data.as_ref().unwrap()[trellis_policy::POLICY_KEY])
        .expect("a valid policy")
}

fn checksum_of(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(render::CONFIG_CHECKSUM_ANNOTATION)
        .cloned()
}

fn replicas_of(d: &Deployment) -> Option<i32> {
    d.spec.as_ref()?.replicas
}

fn app_image(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .clone()
}

fn order_spec() -> Value {
    json!({
        "image": "trellis/order-service:0.1.0",
        "port": 8080,
        "replicas": 2,
        "config": { "LOG_LEVEL": "info" },
        "dependencies": [ { "name": "user" }, { "name": "product", "timeout": "800ms" } ],
        "resilience": { "timeout": "2s", "retry": { "attempts": 3 } },
        "inbound": { "rateLimit": { "perSecond": 200, "burst": 50 } },
    })
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn create_makes_every_child_with_the_exact_fields() {
    let ns = TestNamespace::new("operator").await;
    let _op = Operator::start(&ns, SIDECAR_IMAGE).await;
    apply_ms(&ns, "order", order_spec()).await;

    let ms = wait_status(&ns, "order", "a status", |m| {
        m.status.as_ref().unwrap().observed_generation == m.metadata.generation
    })
    .await;
    let want = render::render(
        &ms,
        &RenderConfig {
            sidecar_image: SIDECAR_IMAGE.into(),
            cluster_domain: "cluster.local".into(),
            otlp_endpoint: None,
            mesh: None,
        },
        &render::SecretVersions::new(),
    )
    .expect("renders");

    let config: ConfigMap = get(&ns, "order-config").await.expect("order-config");
    let policy: ConfigMap = get(&ns, "order-sidecar").await.expect("order-sidecar");
    let sa: ServiceAccount = get(&ns, "order").await.expect("ServiceAccount");
    let role: Role = get(&ns, "order-sidecar").await.expect("Role");
    let rb: RoleBinding = get(&ns, "order-sidecar").await.expect("RoleBinding");
    let deploy: Deployment = get(&ns, "order").await.expect("Deployment");
    let svc: Service = get(&ns, "order").await.expect("Service");
    let pdb: PodDisruptionBudget = get(&ns, "order").await.expect("a PDB for 2 replicas");
    assert!(
        get::<HorizontalPodAutoscaler>(&ns, "order").await.is_none(),
        "no HPA without autoscaling"
    );

    assert_rendered(&want.config, &config);
    assert_rendered(&want.policy, &policy);
    assert_rendered(&want.service_account, &sa);
    assert_rendered(&want.role, &role);
    assert_rendered(&want.role_binding, &rb);
    assert_rendered(&want.deployment, &deploy);
    assert_rendered(&want.service, &svc);
    assert_rendered(want.pdb.as_ref().unwrap(), &pdb);
    for meta in [
        &config.metadata,
        &policy.metadata,
        &sa.metadata,
        &role.metadata,
        &rb.metadata,
        &deploy.metadata,
        &svc.metadata,
        &pdb.metadata,
    ] {
        assert!(
            controlled_by(meta, &ms),
            "{:?} is not controlled by the MicroService",
            meta.name
        );
        let managers: Vec<_> = meta
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| m.operation.as_deref() == Some("Apply"))
            .filter_map(|m| m.manager.clone())
            .collect();
        assert_eq!(managers, ["trellis-operator"], "{:?}", meta.name);
    }

    // The exact fields the contract with the sidecar names.
    assert_eq!(
        config.data,
        Some(BTreeMap::from([(
            "LOG_LEVEL".to_owned(),
            "info".to_owned()
        )]))
    );
    let p = policy_of(&policy);
    assert_eq!(
        (p.service.as_str(), p.namespace.as_str(), p.app_port),
        ("order", ns.name.as_str(), 8080)
    );
    assert_eq!(
        p.dependencies
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        ["user", "product"]
    );
    assert_eq!(
        p.inbound
            .rate_limit
            .as_ref()
            .map(|r| (r.per_second, r.burst)),
        Some((200, 50))
    );
    assert_eq!(replicas_of(&deploy), Some(2));
    let pod = deploy
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let sidecar = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.name, "trellis-sidecar");
    assert_eq!(sidecar.image.as_deref(), Some(SIDECAR_IMAGE));
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("trellis/order-service:0.1.0")
    );
    assert_eq!(
        checksum_of(&deploy),
        Some(render::config_checksum(&ms.spec.config))
    );
    let port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("http"), 80));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15006))
    );

    // Status: no kubelet here (or no sidecar image), so no ready pod.
    let status = ms.status.as_ref().unwrap();
    assert_eq!(
        status.url.as_deref(),
        Some(format!("http://order.{}.svc.cluster.local", ns.name).as_str())
    );
    assert!(
        matches!(status.phase, Some(Phase::Pending | Phase::Progressing)),
        "{:?}",
        status.phase
    );
    assert_eq!(
        condition(&ms, "Ready").map(|c| c.status.as_str()),
        Some("False")
    );
    let failed = condition(&ms, "ReconcileFailed").expect("ReconcileFailed condition");
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("False", "Reconciled")
    );
    let ms = wait_status(&ns, "order", "status replicas 2", |m| {
        m.status.as_ref().unwrap().replicas == 2
    })
    .await;
    let status = ms.status.as_ref().unwrap();
    assert_eq!(
        status.replica_summary,
        Some(format!("{}/2", status.ready_replicas))
    );

    // The ReplicaSet controller created the pods: restricted Pod Security admitted them.
    eventually(
        "2 pods admitted under restricted Pod Security",
        WAIT,
        || async {
            let pods = ns
                .api::<Pod>()
                .list(&ListParams::default().labels("app.kubernetes.io/instance=order"))
                .await
                .ok()?;
            (pods.items.len() == 2).then_some(())
        },
    )
    .await;

    let evs = eventually("a Created event", WAIT, || async {
        let evs = events(&ns, "order").await;
        evs.iter()
            .any(|(t, r, _)| t == "Normal" && r == "Created")
            .then_some(evs)
    })
    .await;
    let (_, _, note) = evs.iter().find(|(_, r, _)| r == "Created").unwrap();
    assert!(
        note.contains("Deployment order") && note.contains("ConfigMap order-sidecar"),
        "{note}"
    );
}

/// What the resourceVersions (and, for the Deployment, the generation) of every child are.
async fn versions(ns: &TestNamespace) -> BTreeMap<&'static str, String> {
    let rv = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.resource_version.clone().unwrap_or_default()
    };
    BTreeMap::from([
        (
            "config",
            rv(&get::<ConfigMap>(ns, "order-config").await.unwrap().metadata),
        ),
        (
            "policy",
            rv(&get::<ConfigMap>(ns, "order-sidecar")
                .await
                .unwrap()
                .metadata),
        ),
        (
            "serviceaccount",
            rv(&get::<ServiceAccount>(ns, "order").await.unwrap().metadata),
        ),
        (
            "role",
            rv(&get::<Role>(ns, "order-sidecar").await.unwrap().metadata),
        ),
        (
            "rolebinding",
            rv(&get::<RoleBinding>(ns, "order-sidecar")
                .await
                .unwrap()
                .metadata),
        ),
        // The Deployment's status changes on its own: its generation counts.
        (
            "deployment",
            get::<Deployment>(ns, "order")
                .await
                .unwrap()
                .metadata
                .generation
                .unwrap()
                .to_string(),
        ),
        (
            "service",
            rv(&get::<Service>(ns, "order").await.unwrap().metadata),
        ),
    ])
}

fn changed(
    before: &BTreeMap<&'static str, String>,
    after: &BTreeMap<&'static str, String>,
) -> Vec<&'static str> {
    before
        .iter()
        .filter(|(k, v)| after[*k] != **v)
        .map(|(k, _)| *k)
        .collect()
}

/// Applies a new spec and waits until the operator has reconciled it.
async fn update(ns: &TestNamespace, spec: Value) -> MicroService {
    let ms = apply_ms(ns, "order", spec).await;
    let generation = ms.metadata.generation;
    let ms = wait_status(ns, "order", "the new generation to be observed", |m| {
        m.status.as_ref().unwrap().observed_generation == generation
    })
    .await;
    // Give a wrongly triggered second write a moment to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ms
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn updates_change_the_right_children_and_only_them() {
    let ns = TestNamespace::new("operator").await;
    let _op = Operator::start(&ns, SIDECAR_IMAGE).await;
    let mut spec = json!({ "image": "trellis/order-service:0.1.0", "port": 8080, "config": { "LOG_LEVEL": "info" } });
    update(&ns, spec.clone()).await;
    let v0 = versions(&ns).await;
    let d0: Deployment = get(&ns, "order").await.unwrap();

    // A policy field: only the sidecar ConfigMap; the pods do not roll.
    spec["resilience"] = json!({ "timeout": "5s" });
    update(&ns, spec.clone()).await;
    let v1 = versions(&ns).await;
    assert_eq!(changed(&v0, &v1), ["policy"]);
    let policy = policy_of(&get(&ns, "order-sidecar").await.unwrap());
    assert_eq!(
        policy.resilience.timeout,
        trellis_policy::Duration::from_secs(5)
    );

    // The config: its ConfigMap and the checksum on the pod template.
    spec["config"] = json!({ "LOG_LEVEL": "debug" });
    update(&ns, spec.clone()).await;
    let v2 = versions(&ns).await;
    assert_eq!(changed(&v1, &v2), ["config", "deployment"]);
    let d2: Deployment = get(&ns, "order").await.unwrap();
    assert_ne!(checksum_of(&d2), checksum_of(&d0));
    assert_eq!(
        checksum_of(&d2),
        Some(render::config_checksum(&BTreeMap::from([(
            "LOG_LEVEL".into(),
            "debug".into()
        )])))
    );
    let cm: ConfigMap = get(&ns, "order-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["LOG_LEVEL"], "debug");

    // The image: the Deployment alone.
    spec["image"] = json!("trellis/order-service:0.2.0");
    update(&ns, spec.clone()).await;
    let v3 = versions(&ns).await;
    assert_eq!(changed(&v2, &v3), ["deployment"]);
    let d3: Deployment = get(&ns, "order").await.unwrap();
    assert_eq!(
        app_image(&d3).as_deref(),
        Some("trellis/order-service:0.2.0")
    );
    assert_eq!(
        d3.labels()
            .get("app.kubernetes.io/version")
            .map(String::as_str),
        Some("0.2.0")
    );
    assert_eq!(checksum_of(&d3), checksum_of(&d2));

    // Replicas: the Deployment, and a PDB appears; back to 1 and it goes.
    spec["replicas"] = json!(3);
    update(&ns, spec.clone()).await;
    let v4 = versions(&ns).await;
    assert_eq!(changed(&v3, &v4), ["deployment"]);
    assert_eq!(replicas_of(&get(&ns, "order").await.unwrap()), Some(3));
    assert!(get::<PodDisruptionBudget>(&ns, "order").await.is_some());
    spec["replicas"] = json!(1);
    update(&ns, spec.clone()).await;
    eventually("the PDB to go", WAIT, || async {
        get::<PodDisruptionBudget>(&ns, "order")
            .await
            .is_none()
            .then_some(())
    })
    .await;

    // hotReload: a config change no longer rolls the pods.
    spec["hotReload"] = json!(true);
    update(&ns, spec.clone()).await;
    let v5 = versions(&ns).await;
    spec["config"] = json!({ "LOG_LEVEL": "warn" });
    update(&ns, spec.clone()).await;
    let v6 = versions(&ns).await;
    assert_eq!(changed(&v5, &v6), ["config"]);

    // Autoscaling: an HPA, and the Deployment's replicas are left to it.
    spec["autoscaling"] = json!({ "minReplicas": 2, "maxReplicas": 5 });
    update(&ns, spec.clone()).await;
    let hpa: HorizontalPodAutoscaler = get(&ns, "order").await.expect("an HPA");
    let hpa_spec = hpa.spec.unwrap();
    assert_eq!((hpa_spec.min_replicas, hpa_spec.max_replicas), (Some(2), 5));
    let d: Deployment = get(&ns, "order").await.unwrap();
    let ours = d
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| m.manager.as_deref() == Some("trellis-operator"))
        .unwrap();
    let fields = serde_json::to_string(&ours.fields_v1).unwrap();
    assert!(
        !fields.contains("f:replicas"),
        "the operator still owns spec.replicas: {fields}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn delete_garbage_collects_every_child() {
    let ns = TestNamespace::new("operator").await;
    let _op = Operator::start(&ns, SIDECAR_IMAGE).await;
    let mut spec = order_spec();
    spec["autoscaling"] = json!({ "minReplicas": 2, "maxReplicas": 4 });
    apply_ms(&ns, "order", spec).await;
    wait_for::<HorizontalPodAutoscaler>(&ns, "order", "the HPA", |_| true).await;
    wait_for::<PodDisruptionBudget>(&ns, "order", "the PDB", |_| true).await;

    ns.api::<MicroService>()
        .delete("order", &DeleteParams::foreground())
        .await
        .expect("deleting");
    eventually(
        "every child to be garbage-collected",
        Duration::from_secs(60),
        || async {
            let left = [
                get::<ConfigMap>(&ns, "order-config")
                    .await
                    .map(|_| "ConfigMap order-config"),
                get::<ConfigMap>(&ns, "order-sidecar")
                    .await
                    .map(|_| "ConfigMap order-sidecar"),
                get::<ServiceAccount>(&ns, "order")
                    .await
                    .map(|_| "ServiceAccount"),
                get::<Role>(&ns, "order-sidecar").await.map(|_| "Role"),
                get::<RoleBinding>(&ns, "order-sidecar")
                    .await
                    .map(|_| "RoleBinding"),
                get::<Deployment>(&ns, "order").await.map(|_| "Deployment"),
                get::<Service>(&ns, "order").await.map(|_| "Service"),
                get::<PodDisruptionBudget>(&ns, "order")
                    .await
                    .map(|_| "PDB"),
                get::<HorizontalPodAutoscaler>(&ns, "order")
                    .await
                    .map(|_| "HPA"),
                get::<MicroService>(&ns, "order")
                    .await
                    .map(|_| "MicroService"),
            ];
            left.iter().all(Option::is_none).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn a_dependency_namespace_created_later_is_reported_then_granted() {
    let ns = TestNamespace::new("operator").await;
    // For all namespaces (grants need it), reconciling this test's MicroService only.
    let label = ("trellis.dev/grants-test", ns.name.clone());
    let _op = Operator::start_settings(
        &ns.client,
        Settings {
            render: RenderConfig {
                sidecar_image: SIDECAR_IMAGE.into(),
                ..RenderConfig::default()
            },
            namespace: None,
            selector: Some(format!("{}={}", label.0, label.1)),
            instance: Some("itest".into()),
            ..Settings::default()
        },
    )
    .await;
    let later = format!("{}-later", ns.name);
    let mut spec = order_spec();
    spec["dependencies"] = json!([{ "name": "payment", "namespace": later }]);
    let mut ms = microservice("order", spec);
    ms.metadata.labels = Some(BTreeMap::from([(label.0.to_owned(), label.1.clone())]));
    ns.api::<MicroService>()
        .patch(
            "order",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&ms),
        )
        .await
        .expect("applying the MicroService");

    // Said in the status and an event, one sentence naming the namespace;
    // everything in the MicroService's own namespace is made meanwhile.
    // The failure is told once, in ReconcileFailed.
    let ms = wait_status(&ns, "order", "the missing namespace reported", |m| {
        condition(m, "ReconcileFailed").is_some_and(|c| c.message.contains("does not exist yet"))
    })
    .await;
    let failed = condition(&ms, "ReconcileFailed").unwrap();
    assert!(
        failed.message.starts_with(&format!(
            "dependency namespace {later} does not exist yet, so the sidecar cannot read the \
             EndpointSlices there; the operator grants that read once it is created"
        )),
        "{}",
        failed.message
    );
    assert_eq!(failed.reason, "DependencyNamespaceMissing");
    assert_eq!(
        ms.status.as_ref().unwrap().replicas,
        2,
        "the Deployment is read"
    );
    wait_for::<Deployment>(&ns, "order", "the Deployment", |_| true).await;
    let events = events(&ns, "order").await;
    assert!(
        events.iter().any(|(t, reason, note)| t == "Warning"
            && reason == "DependencyNamespaceMissing"
            && note.contains(&later)),
        "{events:?}"
    );

    // The namespace appears: the retries (at most MAX_RETRY_DELAY apart, plus
    // 25% jitter) make the grant there and clear the failure.
    let namespaces: Api<Namespace> = Api::all(ns.client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": later, "labels": { trellis_tests::TEST_LABEL: "true" } },
            }))
            .unwrap(),
        )
        .await
        .expect("creating the dependency's namespace");
    let in_later: Api<Role> = Api::namespaced(ns.client.clone(), &later);
    let grant = format!("trellis-sidecar.{}.order", ns.name);
    let by = trellis_operator::controller::MAX_RETRY_DELAY.mul_f64(1.25) + WAIT;
    let found = eventually("the grant once the namespace exists", by, || async {
        in_later.get_opt(&grant).await.ok().flatten()
    })
    .await;
    wait_status(&ns, "order", "the failure to clear", |m| {
        condition(m, "Degraded").is_some_and(|c| c.reason != "DependencyNamespaceMissing")
    })
    .await;
    assert_eq!(
        found.rules.unwrap()[0].resources,
        Some(vec!["endpointslices".to_owned()])
    );
    namespaces
        .delete(&later, &DeleteParams::default())
        .await
        .expect("deleting the dependency's namespace");
}

/// The pod template's checksum of the listed Secrets.
fn secrets_checksum_of(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(render::SECRETS_CHECKSUM_ANNOTATION)
        .cloned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn a_listed_secret_is_awaited_then_named_and_its_change_rolls_the_pods() {
    let ns = TestNamespace::new("operator").await;
    let _op = Operator::start(&ns, SIDECAR_IMAGE).await;
    let mut spec = order_spec();
    spec["secrets"] =
        json!([{ "name": "order-db" }, { "name": "order-tls", "env": false, "files": true }]);
    apply_ms(&ns, "order", spec).await;

    // Missing: said in the status and an event, naming the Secrets; nothing applied.
    let ms = wait_status(&ns, "order", "the missing Secrets reported", |m| {
        condition(m, "ReconcileFailed").is_some_and(|c| c.reason == "SecretMissing")
    })
    .await;
    let failed = condition(&ms, "ReconcileFailed").unwrap();
    assert!(
        failed.message.starts_with(&format!(
            "Secrets order-db, order-tls, listed in spec.secrets, do not exist in namespace {}",
            ns.name
        )),
        "{}",
        failed.message
    );
    assert!(get::<Deployment>(&ns, "order").await.is_none());
    let events = events(&ns, "order").await;
    assert!(
        events.iter().any(|(t, reason, note)| t == "Warning"
            && reason == "SecretMissing"
            && note.contains("order-db")),
        "{events:?}"
    );

    // Created: the watch brings the MicroService back at once.
    let secrets = ns.api::<k8s_openapi::api::core::v1::Secret>();
    for name in ["order-db", "order-tls"] {
        let secret = serde_json::from_value(json!({
            "metadata": { "name": name },
            "stringData": { "VALUE": "s3cr3t-1" },
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let d = wait_for::<Deployment>(&ns, "order", "the Deployment once the Secrets exist", |d| {
        secrets_checksum_of(d).is_some()
    })
    .await;
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let app = &pod.containers[0];
    let env_from: Vec<_> = app
        .env_from
        .iter()
        .flatten()
        .filter_map(|e| e.secret_ref.as_ref().map(|s| s.name.clone()))
        .collect();
    assert_eq!(env_from, ["order-db"]);
    assert!(
        app.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/etc/trellis/secrets/order-tls" && m.read_only == Some(true))
    );
    assert!(pod.init_containers.as_ref().unwrap()[0].env_from.is_none());
    let config_sum = checksum_of(&d);
    let first = secrets_checksum_of(&d);
    wait_status(&ns, "order", "the failure to clear", |m| {
        condition(m, "ReconcileFailed").is_some_and(|c| c.status == "False")
    })
    .await;

    // Changed: a new checksum, so the pods roll; the config's is the same.
    secrets
        .patch(
            "order-db",
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "VALUE": "s3cr3t-2" } })),
        )
        .await
        .unwrap();
    let d = wait_for::<Deployment>(&ns, "order", "a new Secrets checksum", |d| {
        secrets_checksum_of(d) != first
    })
    .await;
    assert_eq!(checksum_of(&d), config_sum);
    // No value anywhere the operator writes.
    let config: ConfigMap = get(&ns, "order-config").await.unwrap();
    assert!(!serde_json::to_string(&config).unwrap().contains("s3cr3t"));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn drift_is_put_back_promptly() {
    let ns = TestNamespace::new("operator").await;
    let _op = Operator::start(&ns, SIDECAR_IMAGE).await;
    apply_ms(&ns, "order", order_spec()).await;
    wait_status(&ns, "order", "a first reconcile", |_| true).await;
    let prompt = Duration::from_secs(10);
    let intruder = PatchParams::apply("intruder").force();

    // Someone changes the app image on the Deployment.
    let patch = json!({ "apiVersion": "apps/v1", "kind": "Deployment", "spec": { "template": { "spec": {
        "containers": [ { "name": "app", "image": "evil/image:1" } ] } } } });
    ns.api::<Deployment>()
        .patch("order", &intruder, &Patch::Apply(&patch))
        .await
        .expect("patching the Deployment");
    eventually("the image to be put back", prompt, || async {
        let d = get::<Deployment>(&ns, "order").await?;
        (app_image(&d).as_deref() == Some("trellis/order-service:0.1.0")).then_some(())
    })
    .await;

    // Someone edits the sidecar policy by hand (a merge patch, like kubectl edit).
    ns.api::<ConfigMap>()
        .patch(
            "order-sidecar",
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": { "policy.json": "{}" } })),
        )
        .await
        .expect("patching the policy");
    eventually("the policy to be put back", prompt, || async {
        let cm = get::<ConfigMap>(&ns, "order-sidecar").await?;
        SidecarPolicy::from_json(&cm.data?[trellis_policy::POLICY_KEY])
            .ok()
            .map(|_| ())
    })
    .await;

    // Someone widens the Role.
    ns.api::<Role>()
        .patch("order-sidecar", &PatchParams::default(), &Patch::Merge(json!({ "rules": [ { "apiGroups": [""], "resources": ["secrets"], "verbs": ["get"] } ] })))
        .await
        .expect("patching the Role");
    eventually("the Role to be put back", prompt, || async {
        let role = get::<Role>(&ns, "order-sidecar").await?;
        let rules = role.rules?;
        (rules.len() == 2
            && rules
                .iter()
                .all(|r| !r.resources.iter().flatten().any(|x| x == "secrets")))
        .then_some(())
    })
    .await;

    // Someone deletes the Service; then, separately, the app ConfigMap (each
    // kind's own watch must bring the operator back).
    ns.api::<Service>()
        .delete("order", &DeleteParams::default())
        .await
        .expect("deleting the Service");
    eventually("the Service to be recreated", prompt, || async {
        get::<Service>(&ns, "order").await.map(|_| ())
    })
    .await;
    ns.api::<ConfigMap>()
        .delete("order-config", &DeleteParams::default())
        .await
        .expect("deleting the ConfigMap");
    eventually("the ConfigMap to be recreated", prompt, || async {
        let cm = get::<ConfigMap>(&ns, "order-config").await?;
        (cm.data?.get("LOG_LEVEL").map(String::as_str) == Some("info")).then_some(())
    })
    .await;

    // Someone removes the managed-by label (the watches select on it).
    ns.api::<ServiceAccount>()
        .patch(
            "order",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([
            { "op": "remove", "path": "/metadata/labels/app.kubernetes.io~1managed-by" } ]))
                .unwrap(),
            ),
        )
        .await
        .expect("patching the ServiceAccount");
    eventually("the label to be put back", prompt, || async {
        let sa = get::<ServiceAccount>(&ns, "order").await?;
        (sa.labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("trellis-operator"))
        .then_some(())
    })
    .await;

    let evs = events(&ns, "order").await;
    assert!(
        evs.iter()
            .any(|(_, r, n)| r == "Updated" && n.contains("Deployment")),
        "{evs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn a_foreign_object_with_a_child_name_is_left_alone_and_reported() {
    let ns = TestNamespace::new("operator").await;
    let _op = Operator::start(&ns, SIDECAR_IMAGE).await;
    let foreign: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "order-config", "labels": { "owner": "someone-else" } },
        "data": { "DATABASE_URL": "postgres://theirs" },
    }))
    .unwrap();
    let foreign = ns
        .api::<ConfigMap>()
        .create(&PostParams::default(), &foreign)
        .await
        .expect("creating the foreign ConfigMap");

    apply_ms(&ns, "order", order_spec()).await;
    let ms = wait_status(&ns, "order", "ReconcileFailed", |m| {
        condition(m, "ReconcileFailed").is_some_and(|c| c.status == "True")
    })
    .await;
    let c = condition(&ms, "ReconcileFailed").unwrap();
    assert_eq!(c.reason, "NameCollision");
    assert!(
        c.message
            .contains(&format!("ConfigMap {}/order-config", ns.name)),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("not owned by this MicroService"),
        "{}",
        c.message
    );
    assert_eq!(ms.status.as_ref().unwrap().phase, Some(Phase::Failed));
    assert_eq!(
        condition(&ms, "Ready").map(|c| c.status.as_str()),
        Some("False")
    );

    let evs = eventually("a NameCollision warning", WAIT, || async {
        let evs = events(&ns, "order").await;
        evs.iter()
            .any(|(t, r, _)| t == "Warning" && r == "NameCollision")
            .then_some(evs)
    })
    .await;
    assert!(
        evs.iter().any(|(_, _, n)| n.contains("order-config")),
        "{evs:#?}"
    );

    // Untouched: same resourceVersion, no owner, no fields of ours. And nothing else was written.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now: ConfigMap = get(&ns, "order-config").await.unwrap();
    assert_eq!(
        now.metadata.resource_version,
        foreign.metadata.resource_version
    );
    assert_eq!(now.data, foreign.data);
    assert!(now.metadata.owner_references.is_none());
    assert!(
        now.metadata
            .managed_fields
            .iter()
            .flatten()
            .all(|m| m.manager.as_deref() != Some("trellis-operator"))
    );
    assert!(
        get::<Deployment>(&ns, "order").await.is_none(),
        "nothing is applied while a name collides"
    );
    assert!(
        get::<ConfigMap>(&ns, "order-sidecar").await.is_none(),
        "nothing is applied while a name collides"
    );

    // Once the foreign object is gone, the next reconcile (here triggered by an edit) succeeds.
    ns.api::<ConfigMap>()
        .delete("order-config", &DeleteParams::default())
        .await
        .unwrap();
    let mut spec = order_spec();
    spec["replicas"] = json!(1);
    apply_ms(&ns, "order", spec).await;
    let ms = wait_status(&ns, "order", "the collision to clear", |m| {
        condition(m, "ReconcileFailed").is_some_and(|c| c.status == "False")
    })
    .await;
    assert_ne!(ms.status.unwrap().phase, Some(Phase::Failed));
    let cm: ConfigMap = get(&ns, "order-config").await.unwrap();
    assert!(controlled_by(&cm.metadata, &ms_named(&ns, "order").await));
}

async fn ms_named(ns: &TestNamespace, name: &str) -> MicroService {
    get::<MicroService>(ns, name)
        .await
        .expect("the MicroService")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn bad_microservices_are_refused_naming_the_field() {
    let ns = TestNamespace::new("operator").await;
    install_crd(&ns.client).await;
    let base = || json!({ "image": "trellis/order-service:0.1.0", "port": 8080 });
    let with = |path: &[&str], value: Value| {
        let mut spec = base();
        let mut at = &mut spec;
        for (i, key) in path.iter().enumerate() {
            if i + 1 == path.len() {
                at[*key] = value.clone();
            } else {
                if at.get(*key).is_none() {
                    at[*key] = json!({});
                }
                at = &mut at[*key];
            }
        }
        spec
    };
    let without = |key: &str| {
        let mut spec = base();
        spec.as_object_mut().unwrap().remove(key);
        spec
    };
    // (what, spec, the field the error must name, more the message must say)
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("no image", without("image"), "spec.image", "Required value"),
        ("no port", without("port"), "spec.port", "Required value"),
        (
            "image with a space",
            with(&["image"], json!("order service")),
            "spec.image",
            "should match",
        ),
        (
            "port 0",
            with(&["port"], json!(0)),
            "spec.port",
            "greater than or equal to 1",
        ),
        (
            "port 70000",
            with(&["port"], json!(70000)),
            "spec.port",
            "less than or equal to 65535",
        ),
        (
            "the sidecar's port",
            with(&["port"], json!(15006)),
            "spec.port",
            "used by the Trellis sidecar",
        ),
        (
            "101 replicas",
            with(&["replicas"], json!(101)),
            "spec.replicas",
            "less than or equal to 100",
        ),
        (
            "negative replicas",
            with(&["replicas"], json!(-1)),
            "spec.replicas",
            "greater than or equal to 0",
        ),
        (
            "unknown protocol",
            with(&["protocol"], json!("TCP")),
            "spec.protocol",
            "Unsupported value",
        ),
        (
            "bad duration",
            with(&["resilience", "timeout"], json!("2sec")),
            "spec.resilience.timeout",
            "should match",
        ),
        (
            "zero attempts",
            with(&["resilience", "retry", "attempts"], json!(0)),
            "spec.resilience.retry.attempts",
            "greater than or equal to 1",
        ),
        (
            "unknown retry condition",
            with(&["resilience", "retry", "retryOn"], json!(["4xx"])),
            "spec.resilience.retry.retryOn[0]",
            "Unsupported value",
        ),
        (
            "backoff base over max",
            with(
                &["resilience", "retry", "backoff"],
                json!({ "base": "5s", "max": "1s" }),
            ),
            "spec.resilience.retry.backoff.base",
            "backoff base must not exceed max",
        ),
        (
            "perTryTimeout over timeout",
            with(
                &["resilience"],
                json!({ "timeout": "1s", "perTryTimeout": "2s" }),
            ),
            "spec.resilience.perTryTimeout",
            "perTryTimeout must not exceed timeout",
        ),
        (
            "failure ratio 0",
            with(&["resilience", "circuitBreaker", "failureRatio"], json!(0)),
            "spec.resilience.circuitBreaker.failureRatio",
            "greater than 0",
        ),
        (
            "failure ratio over 1",
            with(
                &["resilience", "circuitBreaker", "failureRatio"],
                json!(1.5),
            ),
            "spec.resilience.circuitBreaker.failureRatio",
            "less than or equal to 1",
        ),
        (
            "no half-open requests",
            with(
                &["resilience", "circuitBreaker", "halfOpenRequests"],
                json!(0),
            ),
            "spec.resilience.circuitBreaker.halfOpenRequests",
            "greater than or equal to 1",
        ),
        (
            "duplicate dependencies",
            with(
                &["dependencies"],
                json!([{ "name": "user" }, { "name": "user" }]),
            ),
            "spec.dependencies[1]",
            "Duplicate value",
        ),
        (
            "self dependency",
            with(&["dependencies"], json!([{ "name": "bad" }])),
            "spec.dependencies",
            "may not depend on itself",
        ),
        (
            "dependency not a DNS label",
            with(&["dependencies"], json!([{ "name": "User_1" }])),
            "spec.dependencies[0].name",
            "should match",
        ),
        (
            "autoscaling min over max",
            with(
                &["autoscaling"],
                json!({ "minReplicas": 5, "maxReplicas": 2 }),
            ),
            "spec.autoscaling.minReplicas",
            "minReplicas must not exceed maxReplicas",
        ),
        (
            "autoscaling without max",
            with(&["autoscaling"], json!({ "minReplicas": 1 })),
            "spec.autoscaling.maxReplicas",
            "Required value",
        ),
        (
            "config key with a space",
            with(&["config"], json!({ "LOG LEVEL": "info" })),
            "spec.config",
            "config keys may contain only",
        ),
        (
            "sample ratio over 1",
            with(&["tracing", "sampleRatio"], json!(2)),
            "spec.tracing.sampleRatio",
            "less than or equal to 1",
        ),
        (
            "health path not absolute",
            with(&["health", "path"], json!("health")),
            "spec.health.path",
            "should match",
        ),
        (
            "rate limit of 0",
            with(&["inbound", "rateLimit"], json!({ "perSecond": 0 })),
            "spec.inbound.rateLimit.perSecond",
            "greater than or equal to 1",
        ),
    ];
    // Sent as raw JSON, as kubectl would: several are not even valid Rust values.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &kube::api::ApiResource::erase::<MicroService>(&()),
    );
    let mut failures = Vec::new();
    for (what, spec, field, message) in &cases {
        let obj: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "MicroService",
            "metadata": { "name": "bad" }, "spec": spec,
        }))
        .unwrap();
        match raw.create(&PostParams::default(), &obj).await {
            Ok(_) => {
                failures.push(format!("{what}: accepted"));
                let _ = raw.delete("bad", &DeleteParams::default()).await;
            }
            Err(kube::Error::Api(s)) => check_refusal(what, &s, field, message, &mut failures),
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // And the control: a valid one is accepted, with the defaults filled in.
    let ms = ns
        .api::<MicroService>()
        .create(&PostParams::default(), &microservice("good", order_spec()))
        .await
        .expect("a valid MicroService");
    assert_eq!(ms.spec.protocol, trellis_policy::Protocol::Http);
    assert_eq!(
        ms.spec
            .resilience
            .unwrap()
            .circuit_breaker
            .half_open_requests,
        5
    );
}

fn check_refusal(
    what: &str,
    s: &kube::core::Status,
    field: &str,
    message: &str,
    failures: &mut Vec<String>,
) {
    if s.code != 422 {
        failures.push(format!(
            "{what}: expected 422, got {}: {}",
            s.code, s.message
        ));
    } else if !s.message.contains(&format!("{field}:")) || !s.message.contains(message) {
        failures.push(format!(
            "{what}: the error does not name {field} with {message:?}: {}",
            s.message
        ));
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn leader_election_hands_over() {
    let ns = TestNamespace::new("operator").await;
    let timing = Timing {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_secs(1),
        retry_period: Duration::from_millis(200),
    };
    let a = LeaderElector::new(ns.client.clone(), &ns.name, "trellis-operator", "a", timing);
    let b = LeaderElector::new(ns.client.clone(), &ns.name, "trellis-operator", "b", timing);

    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "a takes the free Lease"
    );
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "b cannot while a holds it"
    );
    assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");

    // a releases: b takes over at once.
    a.release().await;
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "b takes the released Lease"
    );
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "a cannot take it back"
    );

    // b stops renewing (it crashed): a takes over once the Lease expires, not before.
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), a.acquire())
        .await
        .expect("a acquires the expired Lease");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "took over after {:?}, before the Lease expired",
        started.elapsed()
    );
    let lease: Lease = ns.api::<Lease>().get("trellis-operator").await.unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    assert_eq!(spec.lease_transitions, Some(2));
}
