//! The reconcile against a fake apiserver ([`FakeApi`]): which requests it
//! makes for a new MicroService, an unchanged one, a drifted child, a name
//! taken by someone else, a child no longer wanted, and a status change.
//! The cluster tests (tests/tests/operator.rs) check the same behaviours
//! end to end; these catch a planner mistake in milliseconds.

use http::Method;
use serde_json::{Value, json};

use super::{fake_api::FakeApi, watch::CacheWriters, *};

const UID: &str = "7d0c5a1e-0000-4000-8000-000000000001";
const MICROSERVICE: &str = "/apis/trellis.dev/v1alpha1/namespaces/shop/microservices/order";
const STATUS: &str = "/apis/trellis.dev/v1alpha1/namespaces/shop/microservices/order/status";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/shop/deployments/order";
const PDB: &str = "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/order";

/// Where the children of `order` in `shop` are applied, in the order they are.
const CHILDREN: [&str; 7] = [
    "/api/v1/namespaces/shop/configmaps/order-config",
    "/api/v1/namespaces/shop/configmaps/order-sidecar",
    "/api/v1/namespaces/shop/serviceaccounts/order",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/order-sidecar",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/order-sidecar",
    DEPLOYMENT,
    "/api/v1/namespaces/shop/services/order",
];

/// MicroService `order` in `shop`, one replica, as the apiserver has it.
fn order() -> MicroService {
    serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": "order", "namespace": "shop", "uid": UID, "generation": 1 },
        "spec": { "image": "trellis/order-service:0.1.0", "port": 8080, "replicas": 1 },
    }))
    .unwrap()
}

/// A fake apiserver holding `order`, and a client of it.
fn fake() -> (FakeApi, Client) {
    let (fake, client) = FakeApi::new();
    fake.hold(MICROSERVICE, serde_json::to_value(order()).unwrap());
    (fake, client)
}

fn context(client: Client, caches: Caches) -> Arc<Context> {
    context_with(client, caches, REPORT_WAIT)
}

/// A context whose statuses wait `report_wait` for the Deployment controller.
fn context_with(client: Client, caches: Caches, report_wait: Duration) -> Arc<Context> {
    let settings = Settings {
        report_wait,
        ..Settings::default()
    };
    Arc::new(Context::new(
        client,
        settings,
        Arc::new(Metrics::default()),
        caches,
        Arc::default(),
    ))
}

fn paths(fake: &FakeApi, method: Method) -> Vec<String> {
    fake.seen()
        .into_iter()
        .filter(|s| s.method == method)
        .map(|s| s.path)
        .collect()
}

/// The reasons of the Events published.
fn events(fake: &FakeApi) -> Vec<String> {
    fake.seen()
        .into_iter()
        .filter(|s| s.method == Method::POST)
        .filter_map(|s| s.body?["reason"].as_str().map(str::to_owned))
        .collect()
}

/// The Deployment `order` as the fake holds it, with a status as the
/// Deployment controller reports it: generation 1 observed, `ready` of its
/// one replica ready.
fn reported(fake: &FakeApi, ready: i32) -> Value {
    let mut deployment = fake.object(DEPLOYMENT).unwrap();
    deployment["metadata"]["generation"] = json!(1);
    deployment["status"] = json!({
        "observedGeneration": 1,
        "replicas": 1,
        "readyReplicas": ready,
        "updatedReplicas": 1,
        "availableReplicas": ready,
    });
    deployment
}

/// A MicroService reconciled once and its caches filled with what that
/// applied, as the watches would: the state of a converged MicroService.
struct Converged {
    fake: FakeApi,
    ms: MicroService,
    writers: CacheWriters,
    ctx: Arc<Context>,
}

impl Converged {
    async fn new() -> Self {
        Self::of(order(), &[]).await
    }

    /// `ms`, with `secrets` (path, object) held by the apiserver and, after
    /// the first reconcile, in the cache.
    async fn of(ms: MicroService, secrets: &[(&str, Value)]) -> Self {
        let (fake, client) = FakeApi::new();
        fake.hold(MICROSERVICE, serde_json::to_value(&ms).unwrap());
        for (path, secret) in secrets {
            fake.hold(path, secret.clone());
        }
        let (caches, _writers) = Caches::for_tests();
        reconcile(Arc::new(ms.clone()), context(client.clone(), caches))
            .await
            .unwrap();
        let (caches, mut writers) = Caches::for_tests();
        for path in CHILDREN {
            writers.insert(&fake.object(path).expect("applied"));
        }
        for (_, secret) in secrets {
            writers.insert(secret);
        }
        // The Deployment controller reports (no pod ready yet), which
        // brings the MicroService back and gets its status written.
        let deployment = reported(&fake, 0);
        writers.insert(&deployment);
        // One context from here on, as the controller has.
        let ctx = context(client.clone(), caches.clone());
        reconcile(Arc::new(ms.clone()), ctx.clone()).await.unwrap();
        let mut ms = ms;
        let written = fake.object(MICROSERVICE).expect("the status was written");
        ms.status = Some(serde_json::from_value(written["status"].clone()).unwrap());
        fake.clear();
        Self {
            fake,
            ms,
            writers,
            ctx,
        }
    }

    async fn reconcile(&self) -> Action {
        reconcile(Arc::new(self.ms.clone()), self.ctx.clone())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_new_microservice_gets_its_children_applied_in_order_then_its_status() {
    let (fake, client) = fake();
    let (caches, _writers) = Caches::for_tests();
    reconcile(Arc::new(order()), context(client, caches))
        .await
        .unwrap();

    // The Deployment controller has not reported on the new Deployment:
    // no status yet (its report brings the MicroService back).
    assert_eq!(paths(&fake, Method::PATCH), CHILDREN);
    // Server-side apply, forced, by the one field manager.
    for s in fake.seen().iter().filter(|s| s.method == Method::PATCH) {
        assert!(
            s.query.contains("fieldManager=trellis-operator") && s.query.contains("force=true"),
            "{}: {}",
            s.line(),
            s.query
        );
    }
    // The caches, which hold every object of these kinds, had none of
    // them: the names are free, and nothing is read live.
    assert!(
        paths(&fake, Method::GET).is_empty(),
        "{:?}",
        paths(&fake, Method::GET)
    );
    assert!(paths(&fake, Method::DELETE).is_empty());
    assert_eq!(events(&fake), ["Created"]);
    assert!(fake.object(MICROSERVICE).unwrap()["status"].is_null());
}

#[tokio::test]
async fn without_a_report_wait_a_new_microservice_gets_a_progressing_status_at_once() {
    let (fake, client) = fake();
    let (caches, _writers) = Caches::for_tests();
    let ctx = context_with(client, caches, Duration::ZERO);
    reconcile(Arc::new(order()), ctx).await.unwrap();

    let mut expected: Vec<String> = CHILDREN.iter().map(|p| p.to_string()).collect();
    expected.push(STATUS.into());
    assert_eq!(paths(&fake, Method::PATCH), expected);
    let status = &fake.object(MICROSERVICE).unwrap()["status"];
    assert_eq!(status["observedGeneration"], 1, "{status}");
    assert_ne!(status["phase"], "Ready", "{status}");
}

#[tokio::test]
async fn a_status_is_not_written_again_while_the_cache_has_not_seen_it() {
    let (fake, client) = fake();
    let (caches, mut writers) = Caches::for_tests();
    let ctx = context_with(client, caches, Duration::ZERO);
    let mut stale = order();
    stale.metadata.resource_version = Some("1".into());
    reconcile(Arc::new(stale.clone()), ctx.clone())
        .await
        .unwrap();
    for path in CHILDREN {
        writers.insert(&fake.object(path).expect("applied"));
    }
    // A child's event brings it back before the MicroService's watch has
    // delivered the status just written: the cache still has version 1.
    reconcile(Arc::new(stale), ctx.clone()).await.unwrap();
    let status_writes = |fake: &FakeApi| {
        paths(fake, Method::PATCH)
            .iter()
            .filter(|p| *p == STATUS)
            .count()
    };
    assert_eq!(status_writes(&fake), 1);

    // The cache catches up; the status it shows is the one written.
    let mut seen = order();
    seen.metadata.resource_version = Some("2".into());
    seen.status =
        serde_json::from_value(fake.object(MICROSERVICE).unwrap()["status"].clone()).unwrap();
    reconcile(Arc::new(seen.clone()), ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(&fake), 1);

    // The Deployment controller reports: a new status, written once.
    writers.insert(&reported(&fake, 1));
    reconcile(Arc::new(seen.clone()), ctx.clone())
        .await
        .unwrap();
    reconcile(Arc::new(seen), ctx).await.unwrap();
    assert_eq!(status_writes(&fake), 2);
    assert_eq!(events(&fake), ["Created", "Ready"]);
}

#[tokio::test]
async fn a_new_microservice_gets_one_status_write_and_one_event_on_the_way_to_ready() {
    let (fake, client) = fake();
    let (caches, mut writers) = Caches::for_tests();
    let ctx = context(client, caches);
    reconcile(Arc::new(order()), ctx.clone()).await.unwrap();
    for path in CHILDREN {
        writers.insert(&fake.object(path).expect("applied"));
    }
    // The children's watch events bring it back before the Deployment
    // controller has reported: nothing to write yet.
    let action = reconcile(Arc::new(order()), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(REPORT_WAIT));
    // The Deployment controller reports its one replica ready at once.
    writers.insert(&reported(&fake, 1));
    reconcile(Arc::new(order()), ctx).await.unwrap();

    let mut expected: Vec<String> = CHILDREN.iter().map(|p| p.to_string()).collect();
    expected.push(STATUS.into());
    assert_eq!(paths(&fake, Method::PATCH), expected);
    assert_eq!(events(&fake), ["Created"]);
    let status = &fake.object(MICROSERVICE).unwrap()["status"];
    assert_eq!(status["observedGeneration"], 1, "{status}");
    assert_eq!(status["phase"], "Ready", "{status}");
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .expect("a Ready condition");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("ReplicasReady"))
    );
}

#[tokio::test]
async fn a_converged_microservice_makes_no_request() {
    let converged = Converged::new().await;
    converged.reconcile().await;
    let seen: Vec<String> = converged.fake.seen().iter().map(|s| s.line()).collect();
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn after_a_restart_a_converged_microservice_makes_no_request() {
    let converged = Converged::new().await;
    // A new process: nothing recorded, the watches list every child afresh.
    let (caches, mut writers) = Caches::for_tests();
    for path in CHILDREN {
        writers.insert(&converged.fake.object(path).unwrap());
    }
    writers.insert(&reported(&converged.fake, 0));
    let ctx = context(converged.ctx.client.clone(), caches.clone());
    reconcile(Arc::new(converged.ms.clone()), ctx.clone())
        .await
        .unwrap();
    let seen: Vec<String> = converged.fake.seen().iter().map(|s| s.line()).collect();
    assert!(seen.is_empty(), "{seen:?}");
    // Each child was compared whole once; no full copy is left in memory.
    assert!(caches.unverified.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_child_is_cached_as_its_metadata_and_a_content_fingerprint() {
    let converged = Converged::new().await;
    let (caches, mut writers) = Caches::for_tests();
    writers.insert(&converged.fake.object(CHILDREN[0]).unwrap());
    writers.insert(&reported(&converged.fake, 0));
    let cm = ConfigMap::store(&caches)
        .get(&ObjectRef::new("order-config").within("shop"))
        .unwrap();
    assert_eq!(cm.data, None);
    let annotations = cm.metadata.annotations.clone().unwrap();
    assert_eq!(
        annotations.keys().map(String::as_str).collect::<Vec<_>>(),
        [APPLIED_HASH_ANNOTATION, slim::CONTENT_ANNOTATION]
    );
    // A Deployment keeps what its rollout figures are computed from.
    let d = Deployment::store(&caches)
        .get(&ObjectRef::new("order").within("shop"))
        .unwrap();
    let spec = d.spec.as_ref().unwrap();
    assert!(spec.template.spec.is_none());
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(d.status.as_ref().unwrap().observed_generation, Some(1));
    assert!(status::rollout(&d).observed());
}

#[tokio::test]
async fn a_child_changed_by_someone_else_since_the_cache_was_filled_is_read_once() {
    let converged = Converged::new().await;
    // Someone changes the Service's selector; the watch's event brings the
    // change, then (before any reconcile) another event drops the full copy.
    let mut service = converged.fake.object(CHILDREN[6]).unwrap();
    service["spec"]["selector"] = json!({ "app": "other" });
    let (caches, mut writers) = Caches::for_tests();
    for path in CHILDREN {
        writers.insert(&converged.fake.object(path).unwrap());
    }
    writers.insert(&reported(&converged.fake, 0));
    writers.insert(&service);
    caches
        .unverified
        .lock()
        .unwrap()
        .remove("Service/shop/order");
    converged.fake.hold(CHILDREN[6], service);
    let ctx = context(converged.ctx.client.clone(), caches);
    reconcile(Arc::new(converged.ms.clone()), ctx)
        .await
        .unwrap();
    // Read live (no copy), found changed, applied again.
    assert_eq!(paths(&converged.fake, Method::GET), [CHILDREN[6]]);
    assert_eq!(paths(&converged.fake, Method::PATCH), [CHILDREN[6]]);
    assert_eq!(
        converged.fake.object(CHILDREN[6]).unwrap()["spec"]["selector"]["app.kubernetes.io/name"],
        "order"
    );
}

#[tokio::test]
async fn a_drifted_child_is_applied_again_and_nothing_else() {
    let mut converged = Converged::new().await;
    let mut deployment = converged.fake.object(DEPLOYMENT).unwrap();
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = json!("someone/else:1");
    converged.writers.insert(&deployment);
    converged.reconcile().await;
    assert_eq!(
        converged.fake.writes(),
        [
            format!("PATCH {DEPLOYMENT}"),
            "POST /apis/events.k8s.io/v1/namespaces/shop/events".to_owned(),
        ]
    );
    assert_eq!(events(&converged.fake), ["Updated"]);
    let applied = converged.fake.object(DEPLOYMENT).unwrap();
    assert_eq!(
        applied["spec"]["template"]["spec"]["containers"][0]["image"],
        "trellis/order-service:0.1.0"
    );
}

#[tokio::test]
async fn a_name_taken_by_someone_else_stops_the_reconcile_before_any_write() {
    let (fake, client) = fake();
    // Someone else's Service, without the operator's label, as the watch of
    // every Service in scope has it.
    let foreign = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "order",
            "namespace": "shop",
            "resourceVersion": "7",
            "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "{}" },
        },
        "spec": { "ports": [{ "port": 80 }] },
    });
    fake.hold("/api/v1/namespaces/shop/services/order", foreign.clone());
    let (caches, mut writers) = Caches::for_tests();
    writers.insert(&foreign);
    reconcile(Arc::new(order()), context(client, caches))
        .await
        .expect("a collision is reported, not retried");
    // Refused from the cache: nothing is read live.
    assert!(
        paths(&fake, Method::GET).is_empty(),
        "{:?}",
        paths(&fake, Method::GET)
    );
    // Only the status is written, saying what is wrong.
    assert_eq!(paths(&fake, Method::PATCH), [STATUS]);
    assert_eq!(events(&fake), ["NameCollision"]);
    let status = &fake.object(MICROSERVICE).unwrap()["status"];
    let failed = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ReconcileFailed")
        .expect("a ReconcileFailed condition");
    assert_eq!(failed["reason"], "NameCollision", "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("Service shop/order"),
        "{failed}"
    );
}

#[test]
fn someone_elses_object_is_cached_as_its_metadata() {
    let (caches, mut writers) = Caches::for_tests();
    writers.insert(&json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "order-config",
            "namespace": "shop",
            "labels": { "app": "order" },
            "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "{}" },
        },
        "data": { "big": "x".repeat(10_000) },
    }));
    let cached = ConfigMap::store(&caches)
        .get(&ObjectRef::new("order-config").within("shop"))
        .expect("cached");
    assert_eq!(cached.data, None);
    assert_eq!(cached.metadata.annotations, None);
    assert_eq!(cached.metadata.labels.as_ref().unwrap()["app"], "order");
}

#[tokio::test]
async fn a_reconcile_waits_for_the_caches_first_list() {
    let (fake, client) = fake();
    let (caches, _writers) = Caches::for_tests();
    let (unlisted, writer) = reflector::store::<Service>();
    let caches = Caches {
        services: unlisted,
        ..caches
    };
    let ctx = context(client, caches);
    let waiting = tokio::spawn(reconcile(Arc::new(order()), ctx));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fake.seen().is_empty(), "{:?}", fake.writes());
    // The watch ends without listing (the controller stops): nothing is done.
    drop(writer);
    waiting.await.unwrap().unwrap();
    assert!(fake.seen().is_empty(), "{:?}", fake.writes());
}

#[tokio::test]
async fn a_child_no_longer_wanted_is_deleted() {
    let mut converged = Converged::new().await;
    // A PodDisruptionBudget from when the MicroService had more replicas.
    let pdb = json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": "order",
            "namespace": "shop",
            "resourceVersion": "3",
            "ownerReferences": [{
                "apiVersion": "trellis.dev/v1alpha1",
                "kind": "MicroService",
                "name": "order",
                "uid": UID,
                "controller": true,
            }],
        },
    });
    converged.fake.hold(PDB, pdb.clone());
    converged.writers.insert(&pdb);
    converged.reconcile().await;
    assert_eq!(
        converged.fake.writes(),
        [
            format!("DELETE {PDB}"),
            "POST /apis/events.k8s.io/v1/namespaces/shop/events".to_owned(),
        ]
    );
    assert_eq!(events(&converged.fake), ["Deleted"]);
}

#[tokio::test]
async fn a_rollout_that_finishes_updates_only_the_status() {
    let mut converged = Converged::new().await;
    let deployment = reported(&converged.fake, 1);
    converged.writers.insert(&deployment);
    converged.reconcile().await;
    assert_eq!(paths(&converged.fake, Method::PATCH), [STATUS]);
    assert_eq!(events(&converged.fake), ["Ready"]);
    let status: Value = converged.fake.object(MICROSERVICE).unwrap()["status"].clone();
    assert_eq!(status["phase"], "Ready", "{status}");
}

const SECRET: &str = "/api/v1/namespaces/shop/secrets/order-db";

/// `order` listing the Secret `order-db` (as environment variables).
fn order_with_secret() -> MicroService {
    let mut ms = order();
    ms.spec.secrets = vec![crate::crd::SecretRef::env("order-db")];
    ms
}

/// The Secret `order-db` at `resource_version`, as a client-side
/// `kubectl apply` leaves it: its value in the data and in an annotation.
fn secret(resource_version: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "order-db",
            "namespace": "shop",
            "uid": "5ec7e700-0000-4000-8000-000000000001",
            "resourceVersion": resource_version,
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration":
                    "{\"stringData\":{\"DATABASE_URL\":\"postgres://shop:hunter2@postgres/shop\"}}",
            },
        },
        "stringData": { "DATABASE_URL": "postgres://shop:hunter2@postgres/shop" },
    })
}

fn pod_template(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]
}

#[tokio::test]
async fn a_listed_secret_is_read_as_metadata_and_only_named_in_the_deployment() {
    let (fake, client) = FakeApi::new();
    fake.hold(
        MICROSERVICE,
        serde_json::to_value(order_with_secret()).unwrap(),
    );
    fake.hold(SECRET, secret("41"));
    let (caches, _writers) = Caches::for_tests();
    reconcile(Arc::new(order_with_secret()), context(client, caches))
        .await
        .unwrap();

    // Not in the cache yet: read once, asking for its metadata only.
    let reads: Vec<_> = fake
        .seen()
        .into_iter()
        .filter(|s| s.path == SECRET)
        .collect();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0].method, Method::GET);
    assert!(
        reads[0].accept.contains("as=PartialObjectMetadata"),
        "{}",
        reads[0].accept
    );
    // The children are applied as usual, the Secret never written.
    // The Deployment controller has not reported on the new Deployment:
    // no status yet (its report brings the MicroService back).
    assert_eq!(paths(&fake, Method::PATCH), CHILDREN);

    let deployment = fake.object(DEPLOYMENT).unwrap();
    let template = pod_template(&deployment);
    assert_eq!(
        template["spec"]["containers"][0]["envFrom"][1],
        json!({ "secretRef": { "name": "order-db", "optional": false } })
    );
    let sum = &template["metadata"]["annotations"][render::SECRETS_CHECKSUM_ANNOTATION];
    assert_eq!(sum.as_str().map(str::len), Some(64), "{template}");
    // No value, in any request the operator made.
    for s in fake.seen() {
        let body = s.body.as_ref().map(Value::to_string).unwrap_or_default();
        assert!(!body.contains("hunter2"), "{}: {body}", s.line());
    }
}

#[tokio::test]
async fn a_missing_secret_is_reported_by_name_and_nothing_is_applied() {
    let (fake, client) = FakeApi::new();
    fake.hold(
        MICROSERVICE,
        serde_json::to_value(order_with_secret()).unwrap(),
    );
    let (caches, _writers) = Caches::for_tests();
    reconcile(Arc::new(order_with_secret()), context(client, caches))
        .await
        .expect("a missing Secret is reported, then awaited");
    assert_eq!(paths(&fake, Method::PATCH), [STATUS]);
    assert_eq!(events(&fake), ["SecretMissing"]);
    let status = &fake.object(MICROSERVICE).unwrap()["status"];
    let failed = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ReconcileFailed")
        .expect("a ReconcileFailed condition");
    assert_eq!(failed["reason"], "SecretMissing", "{failed}");
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Secret order-db, listed in spec.secrets, does not exist in namespace shop; create it"
        ),
        "{message}"
    );
    assert!(message.chars().count() <= status::MAX_MESSAGE, "{message}");
    assert_eq!(status["phase"], "Failed", "{status}");
}

#[tokio::test]
async fn a_changed_secret_rolls_the_pods_and_changes_nothing_else() {
    let mut converged = Converged::of(order_with_secret(), &[(SECRET, secret("41"))]).await;
    // Converged: the Secret comes from the cache, no request at all.
    converged.reconcile().await;
    assert!(
        converged.fake.seen().is_empty(),
        "{:?}",
        converged.fake.writes()
    );
    let before = converged.fake.object(DEPLOYMENT).unwrap();

    // The Secret changes (the watch fills the cache with its new version).
    converged.writers.insert(&secret("42"));
    converged.reconcile().await;
    assert_eq!(
        converged.fake.writes(),
        [
            format!("PATCH {DEPLOYMENT}"),
            "POST /apis/events.k8s.io/v1/namespaces/shop/events".to_owned(),
        ]
    );
    let after = converged.fake.object(DEPLOYMENT).unwrap();
    let annotation = |d: &Value| {
        pod_template(d)["metadata"]["annotations"][render::SECRETS_CHECKSUM_ANNOTATION].clone()
    };
    assert_ne!(annotation(&before), annotation(&after));
    assert_eq!(
        pod_template(&before)["spec"],
        pod_template(&after)["spec"],
        "only the checksum changes"
    );
}
