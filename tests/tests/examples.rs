//! The manifests in examples/ are accepted by a real apiserver with the committed
//! CRDs installed (schema, CEL rules and all), so a user's first `kubectl apply`
//! cannot fail on them, and come in an order that needs no second apply.
//! Server-side dry run, in a test namespace.

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
    discovery::Discovery,
};
use trellis_tests::{
    TestNamespace,
    operator::{install_crd, install_edge_policy_crd},
};

#[tokio::test]
#[ignore = "needs a cluster: cargo xtask test"]
async fn the_shop_example_is_accepted_by_the_apiserver() {
    let ns = TestNamespace::new("examples").await;
    install_crd(&ns.client).await;
    install_edge_policy_crd(&ns.client).await;
    let discovery = Discovery::new(ns.client.clone())
        .run()
        .await
        .expect("API discovery");

    let dir = trellis_tests::shop::workspace().join("examples/shop");
    let mut applied = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let text = std::fs::read_to_string(path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            let mut object: DynamicObject = serde_json::from_value(value).unwrap();
            let types = object.types.clone().expect("apiVersion and kind");
            if types.kind == "Namespace" {
                continue; // the test's own namespace stands in for it
            }
            let (group, version) = types
                .api_version
                .rsplit_once('/')
                .unwrap_or(("", &types.api_version));
            let (resource, _) = discovery
                .resolve_gvk(&kube::api::GroupVersionKind::gvk(
                    group,
                    version,
                    &types.kind,
                ))
                .unwrap_or_else(|| panic!("the apiserver does not serve {}", types.kind));
            object.metadata.namespace = Some(ns.name.clone());
            let name = object.metadata.name.clone().expect("a name");
            let api: Api<DynamicObject> =
                Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
            api.patch(
                &name,
                &PatchParams::apply("trellis-tests")
                    .dry_run()
                    .validation_strict(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{} {name} in {} is refused: {e}",
                    types.kind,
                    path.display()
                )
            });
            applied.push(format!("{}/{name}", types.kind));
        }
    }
    for expected in [
        "MicroService/user",
        "MicroService/product",
        "MicroService/order",
        "Service/postgres",
        "Secret/user-db",
        "Secret/product-db",
        "Secret/order-db",
        "Gateway/shop",
        "HTTPRoute/shop-api",
        "GRPCRoute/user-grpc",
    ] {
        assert!(
            applied.iter().any(|a| a == expected),
            "{expected} missing from examples/shop: {applied:?}"
        );
    }
    // `kubectl apply -f examples/shop/` and the suites apply in this order
    // (files sorted, documents in order): each database Secret comes before
    // the MicroService that lists it, so none is ever reported missing.
    for service in ["user", "product", "order"] {
        let at = |what: String| applied.iter().position(|a| *a == what);
        assert!(
            at(format!("Secret/{service}-db")) < at(format!("MicroService/{service}")),
            "Secret/{service}-db must come before MicroService/{service}: {applied:?}"
        );
    }
}
