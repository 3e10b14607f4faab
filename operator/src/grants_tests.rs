//! Unit tests of the grants: which namespaces, which objects, which owner.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use trellis_policy::Dependency;

use super::*;
use crate::{
    crd::{MicroService, MicroServiceSpec},
    render,
};

fn ms(namespace: &str, name: &str, dependencies: &[(&str, Option<&str>)]) -> MicroService {
    let mut spec: MicroServiceSpec = serde_json::from_value(serde_json::json!({
        "image": "trellis/order-service:0.1.0",
        "port": 8080,
    }))
    .unwrap();
    spec.dependencies = dependencies
        .iter()
        .map(|(dep, ns)| Dependency {
            namespace: ns.map(str::to_owned),
            ..Dependency::named(*dep)
        })
        .collect();
    let mut ms = MicroService::new(name, spec);
    ms.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: Some("0b5a1c9e-1111-2222-3333-444455556666".into()),
        ..ObjectMeta::default()
    };
    ms
}

#[test]
fn one_grant_per_other_namespace_a_dependency_names() {
    let order = ms(
        "shop",
        "order",
        &[
            ("user", None),
            ("product", Some("shop")),
            ("payment", Some("billing")),
            ("invoice", Some("billing")),
            ("ledger", Some("finance")),
        ],
    );
    let grants = render(&order).unwrap();
    let where_: Vec<&str> = grants.iter().map(|g| g.namespace.as_str()).collect();
    assert_eq!(where_, ["billing", "finance"]);

    for g in &grants {
        let name = "trellis-sidecar.shop.order";
        for meta in [&g.role.metadata, &g.role_binding.metadata] {
            assert_eq!(meta.name.as_deref(), Some(name));
            assert_eq!(meta.namespace.as_deref(), Some(g.namespace.as_str()));
            assert_eq!(meta.owner_references, None, "no owner across namespaces");
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels[OWNER_NAMESPACE_LABEL], "shop");
            assert_eq!(labels[OWNER_NAME_LABEL], "order");
            // The operator's watches select on this label.
            assert_eq!(labels["app.kubernetes.io/managed-by"], "trellis-operator");
        }
        // Read of EndpointSlices, nothing else.
        let rules = g.role.rules.as_ref().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].api_groups.as_deref(),
            Some(&["discovery.k8s.io".to_owned()][..])
        );
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["endpointslices".to_owned()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        assert_eq!(rules[0].resource_names, None);
        // Bound to the sidecar's ServiceAccount, in the MicroService's namespace.
        let b = &g.role_binding;
        assert_eq!(
            (b.role_ref.kind.as_str(), b.role_ref.name.as_str()),
            ("Role", name)
        );
        assert_eq!(b.role_ref.api_group, "rbac.authorization.k8s.io");
        let subjects = b.subjects.as_ref().unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(
            (
                subjects[0].kind.as_str(),
                subjects[0].name.as_str(),
                subjects[0].namespace.as_deref()
            ),
            ("ServiceAccount", "order", Some("shop"))
        );
    }
    // The subject is the ServiceAccount the Deployment runs as.
    let children = render::render(
        &order,
        &render::RenderConfig::default(),
        &render::SecretVersions::new(),
    )
    .unwrap();
    assert_eq!(
        children.service_account.metadata.name.as_deref(),
        Some("order")
    );
}

#[test]
fn dependencies_in_the_own_namespace_need_no_grant() {
    let order = ms(
        "shop",
        "order",
        &[("user", None), ("product", Some("shop"))],
    );
    assert!(namespaces(&order).is_empty());
    assert!(render(&order).unwrap().is_empty());
}

#[test]
fn grant_names_keep_microservices_apart() {
    // Dots cannot occur in namespaces or MicroService names.
    assert_ne!(grant_name("a-b", "c"), grant_name("a", "b-c"));
    assert_ne!(grant_name("shop", "order"), grant_name("order", "shop"));
    assert_ne!(grant_name("shop", "order"), render::sidecar_name("order"));
}

#[test]
fn a_grant_names_its_owner_and_no_other() {
    let order = ms("shop", "order", &[("payment", Some("billing"))]);
    let grant = render(&order).unwrap().remove(0);
    let meta = &grant.role.metadata;
    assert_eq!(owner(meta), Some(ObjectRef::new("order").within("shop")));
    assert!(is_granted_by(meta, &order));
    assert!(!is_granted_by(meta, &ms("shop", "cart", &[])));
    assert!(!is_granted_by(meta, &ms("other", "order", &[])));
    assert_eq!(owner(&ObjectMeta::default()), None);
}

#[test]
fn role_events_reconcile_the_child_owner_or_the_grant_owner() {
    let order = ms("shop", "order", &[("payment", Some("billing"))]);
    // A grant in another namespace: its labels name the MicroService.
    let grant = render(&order).unwrap().remove(0);
    assert_eq!(
        owners(grant.role.clone()),
        Some(ObjectRef::new("order").within("shop"))
    );
    assert_eq!(
        owners(grant.role_binding),
        Some(ObjectRef::new("order").within("shop"))
    );
    // The sidecar's own Role: its controller owner reference does.
    let children = render::render(
        &order,
        &render::RenderConfig::default(),
        &render::SecretVersions::new(),
    )
    .unwrap();
    assert_eq!(
        owners(children.role),
        Some(ObjectRef::new("order").within("shop"))
    );
    // Anything else triggers nothing.
    let mut other = grant.role;
    other.metadata.labels = None;
    other.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: "order".into(),
        uid: "x".into(),
        controller: Some(true),
        ..OwnerReference::default()
    }]);
    assert_eq!(owners(other), None);
}

#[test]
fn pending_and_out_of_scope_namespaces_are_one_sentence_naming_them() {
    let missing = Error::DependencyNamespaceMissing(vec!["billing".into()]);
    assert_eq!(
        missing.to_string(),
        "dependency namespace billing does not exist yet, so the sidecar cannot read the \
         EndpointSlices there; the operator grants that read once it is created"
    );
    assert_eq!(missing.reason(), "DependencyNamespaceMissing");
    let two = Error::DependencyNamespaceMissing(vec!["billing".into(), "finance".into()]);
    assert!(
        two.to_string()
            .starts_with("dependency namespaces billing, finance do not exist yet"),
        "{two}"
    );
    let scoped = Error::DependencyOutOfScope {
        namespaces: vec!["billing".into()],
        watched: "shop".into(),
    };
    assert_eq!(
        scoped.to_string(),
        "dependency namespace billing is outside the namespace this operator watches (shop), \
         so it cannot let the sidecar read the EndpointSlices there; install the operator for \
         all namespaces (empty watchNamespace) or grant that read yourself"
    );
    assert_eq!(scoped.reason(), "DependencyOutOfScope");
}

/// The sweep's wait for the caches must end even when another task (the
/// controller) waits on the same store at the same time: kube wakes only
/// the last waiter, and a plain `wait_until_ready` here never ends.
#[tokio::test]
async fn the_wait_for_a_store_ends_when_another_task_waits_too() {
    use kube::runtime::{reflector, watcher};
    let (store, mut writer) = reflector::store::<MicroService>();
    let ours = tokio::spawn({
        let store = store.clone();
        async move { until_ready(&store).await }
    });
    // Let ours register first; the other waiter then takes the one waker.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = tokio::spawn({
        let store = store.clone();
        async move { store.wait_until_ready().await.is_ok() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let ours = tokio::time::timeout(Duration::from_secs(5), ours)
        .await
        .expect("the sweep's wait ended once the store was ready");
    assert!(ours.unwrap());
    assert!(other.await.unwrap());
}
