//! The edge on the local node: the chart installed for every namespace,
//! a Gateway of its class and an HTTPRoute, reached from the host at the
//! address the Gateway's status gives, as a client outside the cluster
//! would.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Mutex, MutexGuard};
use trellis_tests::{
    TestNamespace, eventually,
    issuer::{self, Issuer},
    kubectl,
    shop::{apply, install_chart_with, run, uninstall_chart},
};

const RELEASE: &str = "trellis-gw";
const RELEASE_NAMESPACE: &str = "trellis-gw-system";
const CLASS: &str = "trellis-e2e";
/// Its own controller name, so a release installed beside it (the
/// conformance run's) serves only its own class.
const CONTROLLER: &str = "trellis.dev/gateway-controller-e2e";

/// One test at a time installs the release: the tests of this file share its
/// name and namespace, and the test harness runs them in parallel.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The chart for every namespace, uninstalled when dropped; holds `SERIAL`
/// until then.
struct Installed {
    _serial: MutexGuard<'static, ()>,
}

impl Installed {
    async fn new() -> Self {
        let serial = SERIAL.lock().await;
        install_chart_with(
            RELEASE,
            RELEASE_NAMESPACE,
            "",
            &[
                "gateway.addressFrom=pod",
                &format!("gateway.className={CLASS}"),
                &format!("gateway.controllerName={CONTROLLER}"),
                "identity.enabled=false",
            ],
        )
        .expect("the chart installs for every namespace");
        Self { _serial: serial }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(e) = uninstall_chart(RELEASE, RELEASE_NAMESPACE) {
            eprintln!("could not uninstall {RELEASE}: {e}");
        }
        // Waits for the namespace to be gone: the next test installs the
        // same release into it, which a terminating namespace refuses.
        let _ = run(kubectl().args([
            "delete",
            "namespace",
            RELEASE_NAMESPACE,
            "--ignore-not-found",
            "--timeout=180s",
        ]));
    }
}

/// A Deployment of the smoke server and its Service, `name` on port 8080.
fn backend(ns: &str, name: &str) -> Vec<Value> {
    let security = json!({
        "runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    });
    vec![
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{
                        "name": "serve", "image": trellis_tests::callers::IMAGE,
                        "args": ["serve", "8080"], "securityContext": security,
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                    }]},
                },
            },
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"port": 8080, "targetPort": 8080}]},
        }),
    ]
}

fn get_json(args: &[&str]) -> Value {
    serde_json::from_str(&run(kubectl().args(args).args(["-o", "json"])).unwrap()).unwrap()
}

fn condition<'a>(conditions: &'a Value, t: &str) -> Option<(&'a str, &'a str)> {
    conditions
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or(""),
            )
        })
}

/// The address of Gateway `edge` once it is Programmed at its current
/// generation, other than `not` (the address of a pod since replaced).
async fn programmed_address(n: &str, not: Option<&str>) -> String {
    eventually(
        "Gateway edge Programmed with an address",
        Duration::from_secs(120),
        || async {
            let gw = get_json(&["get", "gateway", "edge", "-n", n]);
            let status = &gw["status"];
            let programmed =
                condition(&status["conditions"], "Programmed") == Some(("True", "Programmed"));
            let current =
                status["conditions"][0]["observedGeneration"] == gw["metadata"]["generation"];
            let address = status["addresses"][0]["value"].as_str()?.to_owned();
            (programmed && current && Some(address.as_str()) != not).then_some(address)
        },
    )
    .await
}

/// `GET http://<address><path>` with `Host: <host>`: the status, the
/// Location header and the body.
async fn fetch(
    http: &reqwest::Client,
    address: &str,
    host: &str,
    path: &str,
) -> Option<(u16, Option<String>, String)> {
    let rsp = http
        .get(format!("http://{address}{path}"))
        .header("host", host)
        .send()
        .await
        .ok()?;
    let status = rsp.status().as_u16();
    let location = rsp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    Some((status, location, rsp.text().await.ok()?))
}

#[tokio::test]
#[ignore = "needs the full local node: cargo xtask test"]
async fn a_gateway_serves_its_routes_and_reports_their_status() {
    let ns = TestNamespace::on_node("gw").await;
    let _chart = Installed::new().await;
    let n = ns.name.as_str();
    let mut items = backend(n, "alpha");
    items.extend(backend(n, "beta"));
    items.push(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": n},
        "spec": {"gatewayClassName": CLASS, "listeners": [
            {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
        ]},
    }));
    items.push(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "shop", "namespace": n},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "hostnames": ["shop.example.com"],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/alpha"}}],
                 "backendRefs": [{"name": "alpha", "port": 8080}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/beta"}}],
                 "backendRefs": [{"name": "beta", "port": 8080}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/moved"}}],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 302}}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/missing"}}],
                 "backendRefs": [{"name": "nothing", "port": 8080}]},
            ],
        },
    }));
    apply(&json!({"apiVersion": "v1", "kind": "List", "items": items})).unwrap();

    // The class is Accepted; the Gateway gets an address and is Programmed.
    eventually("GatewayClass Accepted", Duration::from_secs(60), || async {
        let c = get_json(&["get", "gatewayclass", CLASS]);
        (condition(&c["status"]["conditions"], "Accepted") == Some(("True", "Accepted")))
            .then_some(())
    })
    .await;
    let address = programmed_address(n, None).await;

    // The route is attached, and says which backend does not resolve.
    let route = get_json(&["get", "httproute", "shop", "-n", n]);
    let parent = &route["status"]["parents"][0];
    assert_eq!(parent["controllerName"], CONTROLLER);
    assert_eq!(
        condition(&parent["conditions"], "Accepted"),
        Some(("True", "Accepted")),
        "{parent}"
    );
    assert_eq!(
        condition(&parent["conditions"], "ResolvedRefs"),
        Some(("False", "BackendNotFound")),
        "{parent}"
    );
    let gw = get_json(&["get", "gateway", "edge", "-n", n]);
    assert_eq!(gw["status"]["listeners"][0]["attachedRoutes"], 1, "{gw}");

    // From the host, as a client at the edge.
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let send = |host: &'static str, path: &'static str| fetch(&http, &address, host, path);
    let alpha = eventually(
        "the gateway routes /alpha",
        Duration::from_secs(60),
        || async {
            send("shop.example.com", "/alpha/x")
                .await
                .filter(|(s, _, _)| *s == 200)
        },
    )
    .await;
    assert!(alpha.2.starts_with("hello from alpha-"), "{alpha:?}");
    let beta = send("shop.example.com", "/beta").await.unwrap();
    assert!(beta.2.starts_with("hello from beta-"), "{beta:?}");
    let moved = send("shop.example.com", "/moved/here").await.unwrap();
    assert_eq!(
        (moved.0, moved.1.as_deref()),
        (302, Some("https://shop.example.com/moved/here"))
    );
    assert_eq!(send("shop.example.com", "/missing").await.unwrap().0, 500);
    assert_eq!(send("other.example.com", "/alpha").await.unwrap().0, 404);

    // A fix to the route reaches status and traffic.
    run(kubectl().args([
        "patch",
        "httproute",
        "shop",
        "-n",
        n,
        "--type",
        "json",
        "-p",
        r#"[{"op": "remove", "path": "/spec/rules/3"}]"#,
    ]))
    .unwrap();
    eventually(
        "ResolvedRefs True after the fix",
        Duration::from_secs(60),
        || async {
            let r = get_json(&["get", "httproute", "shop", "-n", n]);
            (condition(&r["status"]["parents"][0]["conditions"], "ResolvedRefs")
                == Some(("True", "ResolvedRefs")))
            .then_some(())
        },
    )
    .await;
    eventually(
        "/missing answered 404 once its rule is gone",
        Duration::from_secs(30),
        || async {
            send("shop.example.com", "/missing")
                .await
                .filter(|(s, _, _)| *s == 404)
        },
    )
    .await;

    // A data plane deleted by hand is put back.
    run(kubectl().args([
        "delete",
        "deployment",
        "edge-trellis-gateway",
        "-n",
        n,
        "--wait",
    ]))
    .unwrap();
    let moved = programmed_address(n, Some(&address)).await;
    eventually(
        "the gateway Deployment put back and serving",
        Duration::from_secs(90),
        || async {
            fetch(&http, &moved, "shop.example.com", "/beta")
                .await
                .filter(|(s, _, _)| *s == 200)
        },
    )
    .await;

    // The Gateway's data plane goes with it, its cluster-wide binding too.
    run(kubectl().args(["delete", "gateway", "edge", "-n", n, "--wait"])).unwrap();
    eventually("the discovery binding removed", Duration::from_secs(60), || async {
        let out = run(kubectl().args([
            "get", "clusterrolebinding", "-l", "app.kubernetes.io/managed-by=trellis-gateway,gateway.networking.k8s.io/gateway-name=edge",
            "-o", "name",
        ]))
        .ok()?;
        out.trim().is_empty().then_some(())
    })
    .await;
}

/// `GET http://<address><path>` with `Host: shop.example.com` and, when
/// given, a bearer token: the status, `WWW-Authenticate` and the body.
async fn fetch_with_token(
    http: &reqwest::Client,
    address: &str,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, Option<String>, String)> {
    let mut req = http
        .get(format!("http://{address}{path}"))
        .header("host", "shop.example.com");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let rsp = req.send().await.ok()?;
    let status = rsp.status().as_u16();
    let challenge = rsp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    Some((status, challenge, rsp.text().await.ok()?))
}

/// An EdgePolicy on an HTTPRoute, its key set in a Secret made by the test:
/// a request without a token gets 401 with a challenge, one with a token
/// the test signed gets through, and the policy says Accepted.
#[tokio::test]
#[ignore = "needs the full local node: cargo xtask test"]
async fn an_edge_policy_requires_a_token_at_the_gateway_and_reports_accepted() {
    let ns = TestNamespace::on_node("gw-policy").await;
    // The CRD as committed (Helm installs crds/ only where none is yet).
    run(kubectl().args([
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        trellis_tests::shop::workspace()
            .join("crds/edgepolicy.yaml")
            .to_str()
            .unwrap(),
    ]))
    .unwrap();
    let _chart = Installed::new().await;
    let n = ns.name.as_str();
    let issuer = Issuer::new();
    issuer.store(n, "issuer-keys").unwrap();
    let mut items = backend(n, "alpha");
    items.push(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": n},
        "spec": {"gatewayClassName": CLASS, "listeners": [
            {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
        ]},
    }));
    items.push(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "shop", "namespace": n},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "hostnames": ["shop.example.com"],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/alpha"}}],
                       "backendRefs": [{"name": "alpha", "port": 8080}]}],
        },
    }));
    items.push(json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "EdgePolicy",
        "metadata": {"name": "require-token", "namespace": n},
        "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "shop"}],
            "jwt": {
                "issuer": issuer::ISSUER,
                "audiences": [issuer::AUDIENCE],
                "jwks": {"secretRef": {"name": "issuer-keys", "key": "jwks.json"}},
                "claimToHeaders": [{"claim": "sub", "header": "x-user-id"}],
            },
            "rateLimit": {"perSecond": 50, "burst": 100, "key": {"type": "Claim", "claim": "sub"}},
        },
    }));
    apply(&json!({"apiVersion": "v1", "kind": "List", "items": items})).unwrap();
    let address = programmed_address(n, None).await;

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // Without a token: 401 and a bare challenge, once the policy is in force.
    let refused = eventually(
        "the gateway requires a token on /alpha",
        Duration::from_secs(90),
        || async {
            fetch_with_token(&http, &address, "/alpha/x", None)
                .await
                .filter(|(s, _, _)| *s == 401)
        },
    )
    .await;
    assert_eq!(
        refused.1.as_deref(),
        Some("Bearer realm=\"trellis\""),
        "{refused:?}"
    );
    // A token the test signed: through to the backend. (The smoke server
    // does not echo headers, so the claim header is checked in
    // sidecar/tests/gateway.rs.)
    let token = issuer.token("e2e-user");
    let served = fetch_with_token(&http, &address, "/alpha/x", Some(&token))
        .await
        .unwrap();
    assert_eq!(served.0, 200, "{served:?}");
    assert!(served.2.starts_with("hello from alpha-"), "{served:?}");
    // A token from another key: 401 invalid_token.
    let forged = Issuer::new().token("e2e-user");
    let r = fetch_with_token(&http, &address, "/alpha/x", Some(&forged))
        .await
        .unwrap();
    assert_eq!(r.0, 401, "{r:?}");
    assert!(
        r.1.as_deref().is_some_and(|c| c.contains("invalid_token")),
        "{r:?}"
    );

    // The policy's status: this controller's entry for the route, Accepted.
    let policy = eventually("EdgePolicy Accepted", Duration::from_secs(60), || async {
        let p = get_json(&["get", "edgepolicy", "require-token", "-n", n]);
        let entry = p["status"]["ancestors"]
            .as_array()?
            .iter()
            .find(|a| a["controllerName"] == CONTROLLER)?
            .clone();
        (condition(&entry["conditions"], "Accepted") == Some(("True", "Accepted"))).then_some(entry)
    })
    .await;
    assert_eq!(
        policy["ancestorRef"],
        json!({"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": n, "name": "shop"})
    );
    assert_eq!(
        condition(&policy["conditions"], "ResolvedRefs"),
        Some(("True", "ResolvedRefs")),
        "{policy}"
    );
}
