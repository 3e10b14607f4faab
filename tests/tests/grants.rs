//! A dependency in another namespace (control-plane tier): the operator lets
//! the sidecar's ServiceAccount read EndpointSlices there, the sidecar running
//! as that ServiceAccount reaches the dependency, and the grant goes when the
//! dependency or the MicroService goes, even while the operator is down.
//!
//! One test in a binary of its own: the in-process sidecar takes its identity
//! from `KUBECONFIG`, which the test points at a kubeconfig impersonating the
//! ServiceAccount while the sidecar starts, so nothing else may create a
//! client meanwhile.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Service},
    discovery::v1::EndpointSlice,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};
use trellis_operator::{MicroService, Settings, render::RenderConfig};
use trellis_sidecar::Discovery;
use trellis_tests::{
    TestNamespace, eventually, kubeconfig_path,
    node_peers::{endpoint_slice, get, service, try_get, upstream},
    operator::Operator,
};

const WAIT: Duration = Duration::from_secs(30);
/// The label on a grant naming the namespace of its MicroService.
const OWNER_NAMESPACE_LABEL: &str = "trellis.dev/microservice-namespace";

/// Whether the sidecar whose admin listener is `admin` has applied a policy.
async fn policy_applied(admin: SocketAddr) -> bool {
    let Some((_, body)) = try_get(admin, "/status", "admin").await else {
        return false;
    };
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["policy"]["generation"].as_u64())
        .is_some_and(|g| g >= 1)
}

/// The admin kubeconfig with every user impersonating `user`.
fn impersonating(user: &str) -> Kubeconfig {
    let path = kubeconfig_path();
    let mut kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}; is the cluster up?", path.display()));
    for named in &mut kubeconfig.auth_infos {
        if let Some(auth) = &mut named.auth_info {
            auth.impersonate = Some(user.into());
        }
    }
    kubeconfig
}

/// A kube client acting as `user`.
async fn client_as(user: &str) -> Client {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).expect("the admin kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig");
    config.auth_info.impersonate = Some(user.into());
    Client::try_from(config).expect("a kube client")
}

/// The sidecar of `service` in `ns`, in-process, with Kubernetes discovery
/// and its policy ConfigMap, acting as `user`.
async fn sidecar_as(ns: &str, service: &str, user: &str) -> trellis_sidecar::Running {
    let path: PathBuf = std::env::temp_dir().join(format!("trellis-{ns}-{service}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&impersonating(user)).unwrap()).unwrap();
    let admin = std::env::var_os("KUBECONFIG");
    // SAFETY: the only test of this binary; no other thread reads the
    // environment while the sidecar creates its client.
    unsafe { std::env::set_var("KUBECONFIG", &path) };
    let mut config = trellis_sidecar::Config::local(None);
    config.namespace = ns.into();
    config.service = Some(service.into());
    config.discovery = Discovery::Kubernetes { max_services: 16 };
    config.policy_configmap = Some(format!("{service}-sidecar"));
    config.discovery_timeout = Duration::from_secs(5);
    let running = trellis_sidecar::start(config).await;
    // SAFETY: as above.
    unsafe {
        match admin {
            Some(v) => std::env::set_var("KUBECONFIG", v),
            None => std::env::remove_var("KUBECONFIG"),
        }
    }
    let _ = std::fs::remove_file(&path);
    running.expect("the sidecar starts")
}

/// Applies MicroService `name` in `ns` with `spec`, labelled for this test's operator.
async fn apply_ms(ns: &TestNamespace, name: &str, selector: (&str, &str), spec: Value) {
    let ms: MicroService = serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": name, "labels": { selector.0: selector.1 } },
        "spec": spec,
    }))
    .unwrap();
    ns.api::<MicroService>()
        .patch(
            name,
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&ms),
        )
        .await
        .unwrap_or_else(|e| panic!("applying MicroService {name}: {e}"));
}

/// The names of the Roles and RoleBindings in `ns` that grant to a MicroService of `owner_ns`.
async fn grants_in(ns: &TestNamespace, owner_ns: &str) -> Vec<String> {
    let lp = ListParams::default().labels(&format!("{OWNER_NAMESPACE_LABEL}={owner_ns}"));
    let mut names: Vec<String> = Vec::new();
    for role in ns.api::<Role>().list(&lp).await.unwrap() {
        names.push(format!("Role/{}", role.name_any()));
    }
    for binding in ns.api::<RoleBinding>().list(&lp).await.unwrap() {
        names.push(format!("RoleBinding/{}", binding.name_any()));
    }
    names
}

fn start_operator(client: &Client, selector: &str) -> impl Future<Output = Operator> {
    Operator::start_settings(
        client,
        Settings {
            render: RenderConfig {
                sidecar_image: "trellis/sidecar:itest".into(),
                ..RenderConfig::default()
            },
            // For all namespaces, as installed with an empty watchNamespace.
            namespace: None,
            selector: Some(selector.into()),
            instance: Some("itest-grants".into()),
            resync: Duration::from_secs(300),
            ..Settings::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: cargo xtask test"]
async fn a_dependency_in_another_namespace_is_granted_used_and_revoked() {
    let a = TestNamespace::new("grants-a").await;
    let b = TestNamespace::new("grants-b").await;
    // The operator watches every namespace, as the chart's default install
    // does, but reconciles only this test's MicroServices.
    let label = ("trellis.dev/grants-test", a.name.as_str());
    let selector = format!("{}={}", label.0, label.1);
    let operator = start_operator(&a.client, &selector).await;

    // The dependency: `payment` in namespace b, one ready endpoint.
    let payment = upstream("payment").await;
    b.api::<Service>()
        .create(&PostParams::default(), &service("payment"))
        .await
        .unwrap();
    b.api::<EndpointSlice>()
        .create(
            &PostParams::default(),
            &endpoint_slice("payment", &[(payment, true)]),
        )
        .await
        .unwrap();

    let with_dependency = json!({
        "image": "trellis/order-service:0.1.0",
        "port": 8080,
        "dependencies": [{ "name": "payment", "namespace": b.name }],
    });
    apply_ms(&a, "order", label, with_dependency.clone()).await;

    // The grant in b: read of EndpointSlices, bound to order's ServiceAccount in a.
    let grant = format!("trellis-sidecar.{}.order", a.name);
    let role = eventually(
        "the grant's Role in the dependency's namespace",
        WAIT,
        || async { b.api::<Role>().get_opt(&grant).await.unwrap() },
    )
    .await;
    assert_eq!(
        serde_json::to_value(&role.rules).unwrap(),
        json!([{
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }])
    );
    let binding = eventually("the grant's RoleBinding", WAIT, || async {
        b.api::<RoleBinding>().get_opt(&grant).await.unwrap()
    })
    .await;
    assert_eq!(binding.role_ref.name, grant);
    assert_eq!(
        serde_json::to_value(&binding.subjects).unwrap(),
        json!([{ "kind": "ServiceAccount", "name": "order", "namespace": a.name }])
    );
    // What the sidecar needs in its own namespace is there too.
    for (what, found) in [
        (
            "the policy ConfigMap",
            a.api::<ConfigMap>()
                .get_opt("order-sidecar")
                .await
                .unwrap()
                .is_some(),
        ),
        (
            "the sidecar's RoleBinding",
            eventually("the sidecar's RoleBinding", WAIT, || async {
                a.api::<RoleBinding>()
                    .get_opt("order-sidecar")
                    .await
                    .unwrap()
            })
            .await
            .metadata
            .name
            .is_some(),
        ),
    ] {
        assert!(found, "{what} missing");
    }

    // Acting as the sidecar's ServiceAccount: EndpointSlices in b, and nothing more.
    let sa = format!("system:serviceaccount:{}:order", a.name);
    let as_sidecar = client_as(&sa).await;
    let slices_in_b: Api<EndpointSlice> = Api::namespaced(as_sidecar.clone(), &b.name);
    let listed = slices_in_b
        .list(&ListParams::default().labels("kubernetes.io/service-name=payment"))
        .await
        .unwrap_or_else(|e| panic!("{sa} listing EndpointSlices in {}: {e}", b.name));
    assert_eq!(listed.items.len(), 1);
    let forbidden = Api::<ConfigMap>::namespaced(as_sidecar.clone(), &b.name)
        .list(&ListParams::default())
        .await
        .expect_err("the grant covers EndpointSlices only");
    assert!(
        matches!(&forbidden, kube::Error::Api(s) if s.code == 403),
        "{forbidden}"
    );

    // The sidecar itself, as that ServiceAccount, reaches payment in b.
    let sidecar = sidecar_as(&a.name, "order", &sa).await;
    // Its policy comes from the ConfigMap a moment after it starts; until
    // then it knows no dependency, and b is a namespace it does not read.
    eventually("the sidecar's policy", WAIT, || async {
        let ready = policy_applied(sidecar.admin).await;
        ready.then_some(())
    })
    .await;
    let to = format!("payment.{}", b.name);
    let (status, body) = get(sidecar.outbound, &to).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from payment"),
        "{to} through the sidecar"
    );
    sidecar.shutdown().await;

    // The dependency goes: so does the grant, and with it the read.
    let mut without = with_dependency.clone();
    without["dependencies"] = json!([]);
    apply_ms(&a, "order", label, without).await;
    eventually("the grant to be revoked", WAIT, || async {
        grants_in(&b, &a.name).await.is_empty().then_some(())
    })
    .await;
    eventually("the read to be refused", WAIT, || async {
        match slices_in_b.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) if s.code == 403 => Some(()),
            _ => None,
        }
    })
    .await;

    // Back, then the MicroService deleted while the operator runs: nothing left in b.
    apply_ms(&a, "order", label, with_dependency.clone()).await;
    eventually("the grant to be back", WAIT, || async {
        (grants_in(&b, &a.name).await.len() == 2).then_some(())
    })
    .await;
    a.api::<MicroService>()
        .delete("order", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the grant of the deleted MicroService to go",
        WAIT,
        || async { grants_in(&b, &a.name).await.is_empty().then_some(()) },
    )
    .await;

    // Deleted while no operator runs: it is not held up (no finalizer), and
    // the grant goes once an operator starts again.
    apply_ms(&a, "order", label, with_dependency).await;
    eventually("the grant to be made again", WAIT, || async {
        (grants_in(&b, &a.name).await.len() == 2).then_some(())
    })
    .await;
    drop(operator);
    a.api::<MicroService>()
        .delete("order", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the MicroService to be gone at once", WAIT, || async {
        a.api::<MicroService>()
            .get_opt("order")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        grants_in(&b, &a.name).await.len(),
        2,
        "no operator, no sweep"
    );
    let _operator = start_operator(&a.client, &selector).await;
    eventually(
        "the grant left by a deletion while down to go",
        WAIT,
        || async { grants_in(&b, &a.name).await.is_empty().then_some(()) },
    )
    .await;
}
