//! Distributed tracing end to end, into a real OpenTelemetry Collector.
//!
//! The shop's three services run behind real sidecars on loopback (static
//! discovery), each sidecar exporting over OTLP/gRPC to the pinned collector
//! (`cargo xtask tools`), whose file exporter's JSON lines are what these
//! tests read. No Kubernetes is needed; the tests are `#[ignore]`d only
//! because they need the collector from the tools cache, which the
//! control-plane tier of `cargo xtask test` has built.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use order_service::{AppState, Deps};
use serde_json::{Value, json};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};
use trellis_service_kit::testing::{self, Api};
use trellis_sidecar::{Config, Discovery, Running};
use trellis_tests::collector::{CLIENT, Collector, SERVER, SpanRecord};

/// A sidecar for `service` exporting to `collector` (or to `otlp`), resolving
/// each dependency name to its addresses.
async fn sidecar(
    service: &str,
    policy: Value,
    endpoints: &[(&str, SocketAddr)],
    otlp: &str,
) -> Running {
    let path = testing::temp_dir("sidecar").join("policy.json");
    std::fs::write(&path, policy.to_string()).unwrap();
    let mut cfg = Config::local(Some(path));
    cfg.service = Some(service.to_owned());
    cfg.pod_name = Some(format!("{service}-7d9f-abcde"));
    cfg.service_version = Some("1.2.3".into());
    cfg.otlp_endpoint = Some(otlp.to_owned());
    cfg.discovery = Discovery::Static {
        endpoints: endpoints
            .iter()
            .map(|(n, a)| ((*n).to_owned(), vec![*a]))
            .collect(),
        file: None,
    };
    trellis_sidecar::start(cfg).await.unwrap()
}

fn policy(service: &str, app_port: u16, ratio: f64) -> Value {
    json!({
        "service": service,
        "namespace": "default",
        "appPort": app_port,
        "tracing": {"sampleRatio": ratio},
    })
}

async fn user_app() -> SocketAddr {
    let pool = trellis_service_kit::db::connect(
        &testing::sqlite_url(),
        &user_service::SQLITE,
        &user_service::POSTGRES,
    )
    .await
    .unwrap();
    testing::spawn(user_service::app(pool)).await
}

async fn product_app() -> SocketAddr {
    let pool = trellis_service_kit::db::connect(
        &testing::sqlite_url(),
        &product_service::SQLITE,
        &product_service::POSTGRES,
    )
    .await
    .unwrap();
    testing::spawn(product_service::app(pool)).await
}

async fn create(api: &Api, path: &str, body: Value) -> i64 {
    let (status, v) = api
        .call(reqwest::Method::POST, path, Some(&body.to_string()))
        .await;
    assert_eq!(status, 201, "{v}");
    v["id"].as_i64().unwrap()
}

/// The one span matching `what`, or a failure listing the trace.
fn one<'a>(spans: &'a [SpanRecord], what: &str, f: impl Fn(&SpanRecord) -> bool) -> &'a SpanRecord {
    let found: Vec<_> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {what} span; the trace:\n{}",
        spans
            .iter()
            .map(|s| format!("  {s}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    found[0]
}

/// One order → one trace: client → order sidecar (server) → order app →
/// order sidecar (client, gRPC) → user sidecar (server) → user app, and the
/// same for the product reservation over REST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the OpenTelemetry Collector from cargo xtask tools"]
async fn one_order_is_one_trace_across_the_three_services() {
    let collector = Collector::start([127, 0, 0, 1]);
    let (user, product) = (user_app().await, product_app().await);
    let alice = create(
        &Api::new(user),
        "/api/v1/users",
        json!({"name": "alice", "email": "alice@example.com", "age": 33}),
    )
    .await;
    let widget = create(
        &Api::new(product),
        "/api/v1/products",
        json!({"name": "widget", "category": "tools", "price_cents": 250, "stock": 5}),
    )
    .await;
    let u = sidecar(
        "user",
        policy("user", user.port(), 1.0),
        &[],
        &collector.endpoint,
    )
    .await;
    let p = sidecar(
        "product",
        policy("product", product.port(), 1.0),
        &[],
        &collector.endpoint,
    )
    .await;
    // The order sidecar must exist before the order app (the app calls through
    // it), and the app before the sidecar's policy can name its port.
    let o = sidecar(
        "order",
        policy("order", 1, 1.0),
        &[("user", u.inbound), ("product", p.inbound)],
        &collector.endpoint,
    )
    .await;
    let pool = trellis_service_kit::db::connect(
        &testing::sqlite_url(),
        &order_service::SQLITE,
        &order_service::POSTGRES,
    )
    .await
    .unwrap();
    let deps = Deps::new(o.outbound, "user", "product").unwrap();
    let order_app = testing::spawn(order_service::app(AppState { pool, deps })).await;
    o.policy
        .offer(&policy("order", order_app.port(), 1.0).to_string(), "test")
        .unwrap();

    let id = create(
        &Api::new(o.inbound),
        "/api/v1/orders",
        json!({"user_id": alice, "items": [{"product_id": widget, "quantity": 2}]}),
    )
    .await;
    assert!(id > 0);

    // The order's server span is the root; wait for its whole trace.
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            let Some(root) = spans
                .iter()
                .find(|s| s.service == "order" && s.kind == SERVER && s.name == "POST")
            else {
                return false;
            };
            let trace: Vec<_> = spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .collect();
            ["user", "product"]
                .iter()
                .all(|svc| trace.iter().any(|s| s.service == *svc && s.kind == SERVER))
                && trace.iter().filter(|s| s.kind == CLIENT).count() >= 2
        })
        .await;
    let root = one(&spans, "order server", |s| {
        s.service == "order" && s.kind == SERVER
    });
    let trace: Vec<SpanRecord> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .cloned()
        .collect();
    assert_eq!(trace.len(), spans.len(), "one order made one trace");
    assert!(
        root.parent.is_empty(),
        "the client sent no traceparent: {root}"
    );
    assert_eq!(root.attributes["http.request.method"], "POST");
    assert_eq!(root.attributes["url.path"], "/api/v1/orders");
    assert_eq!(root.attributes["http.response.status_code"], "201");
    assert_eq!(root.resource["k8s.pod.name"], "order-7d9f-abcde");
    assert_eq!(root.resource["k8s.namespace.name"], "default");
    assert_eq!(root.resource["service.version"], "1.2.3");

    for (dependency, protocol) in [("user", "grpc"), ("product", "http")] {
        // The order app's call, made by the order sidecar: a child of the
        // order's server span only if the app copied the traceparent it got.
        let call = one(&trace, &format!("order → {dependency} client"), |s| {
            s.service == "order"
                && s.kind == CLIENT
                && s.attributes.get("peer.service").map(String::as_str) == Some(dependency)
        });
        assert_eq!(call.parent, root.span_id, "{call}");
        assert_eq!(call.status, 0, "the call succeeded: {call}");
        let served = one(&trace, &format!("{dependency} server"), |s| {
            s.service == dependency && s.kind == SERVER
        });
        assert_eq!(served.parent, call.span_id, "{served}");
        assert_eq!(served.status, 0, "{served}");
        if protocol == "grpc" {
            assert_eq!(served.attributes["rpc.system"], "grpc", "{served}");
            assert!(served.name.ends_with("/ValidateUser"), "{served}");
        } else {
            assert_eq!(served.attributes["http.response.status_code"], "200");
        }
    }
    assert_eq!(
        trace.len(),
        5,
        "order server, two client calls, two servers"
    );
    drop((u, p, o));
}

/// A TCP relay to `to` that resets the first connection once it has read
/// the request: a try that fails before any response, which the sidecar
/// retries.
async fn resets_first_connection(to: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut conn, _)) = l.accept().await else {
                return;
            };
            if std::mem::take(&mut first) {
                // Closing with unread bytes makes the kernel answer with a reset.
                let mut first_byte = [0u8; 1];
                let _ = conn.read(&mut first_byte).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(conn);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    addr
}

async fn hello_app() -> SocketAddr {
    testing::spawn(axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" })))
        .await
}

fn counter(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "trellis_trace_spans_total{{outcome=\"{outcome}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// A retried call shows as sibling client spans under the caller's span:
/// the failed try (error status, an event saying why) and the retry
/// (`http.request.resend_count` 1), whose span the callee continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the OpenTelemetry Collector from cargo xtask tools"]
async fn retries_are_sibling_client_spans() {
    let collector = Collector::start([127, 0, 0, 1]);
    let app = hello_app().await;
    let b = sidecar(
        "backend",
        policy("backend", app.port(), 1.0),
        &[],
        &collector.endpoint,
    )
    .await;
    let relay = resets_first_connection(b.inbound).await;
    let a = sidecar(
        "frontend",
        policy("frontend", 1, 1.0),
        &[("backend", relay)],
        &collector.endpoint,
    )
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let rsp = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", a.outbound)).unwrap())
        .build()
        .unwrap()
        .get("http://backend/hello")
        .header("traceparent", format!("00-{trace_id}-{caller}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.text().await.unwrap(), "hello");

    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().filter(|s| s.kind == CLIENT).count() >= 2
                && spans
                    .iter()
                    .any(|s| s.service == "backend" && s.kind == SERVER)
        })
        .await;
    assert!(
        spans.iter().all(|s| s.trace_id == trace_id),
        "the caller's trace continued"
    );
    let tries: Vec<_> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    assert_eq!(tries.len(), 2, "two tries: {tries:#?}");
    assert!(
        tries.iter().all(|t| t.parent == caller),
        "siblings under the caller: {tries:#?}"
    );
    let failed = one(&spans, "failed try", |s| s.kind == CLIENT && s.status == 2);
    assert!(
        !failed.events.is_empty(),
        "the failed try says why: {failed}"
    );
    assert!(
        !failed.attributes.contains_key("http.request.resend_count"),
        "{failed}"
    );
    let retry = one(&spans, "retry", |s| s.kind == CLIENT && s.status != 2);
    assert_eq!(
        retry.attributes["http.request.resend_count"], "1",
        "{retry}"
    );
    let served = one(&spans, "backend server", |s| {
        s.service == "backend" && s.kind == SERVER
    });
    assert_eq!(
        served.parent, retry.span_id,
        "the callee continues the retry's span"
    );
    drop((a, b));
}

/// Ratio 0 exports nothing, ratio 1 everything: the same sidecars, the
/// policy changed live between two batches of calls without trace headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the OpenTelemetry Collector from cargo xtask tools"]
async fn sample_ratio_zero_exports_nothing_and_one_everything() {
    let collector = Collector::start([127, 0, 0, 1]);
    let app = hello_app().await;
    let b = sidecar(
        "backend",
        policy("backend", app.port(), 0.0),
        &[],
        &collector.endpoint,
    )
    .await;
    let a = sidecar(
        "frontend",
        policy("frontend", 1, 0.0),
        &[("backend", b.inbound)],
        &collector.endpoint,
    )
    .await;
    let http = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", a.outbound)).unwrap())
        .build()
        .unwrap();
    let calls = 25;
    let send = |n: usize| {
        let http = http.clone();
        async move {
            for _ in 0..n {
                let rsp = http.get("http://backend/hello").send().await.unwrap();
                assert_eq!(rsp.status(), 200);
            }
        }
    };

    send(calls).await;
    let live = |s: &Running, service: &str, port: u16| {
        s.policy
            .offer(&policy(service, port, 1.0).to_string(), "test")
            .unwrap();
    };
    live(&a, "frontend", 1);
    live(&b, "backend", app.port());
    send(calls).await;

    // Spans leave in order, so once the second batch is all in, the first
    // would be too.
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().filter(|s| s.service == "backend").count() >= calls
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = if collector.spans().len() > spans.len() {
        collector.spans()
    } else {
        spans
    };
    let traces: std::collections::HashSet<_> = spans.iter().map(|s| &s.trace_id).collect();
    assert_eq!(
        traces.len(),
        calls,
        "ratio 0 exported nothing, ratio 1 every call"
    );
    assert_eq!(
        spans.len(),
        2 * calls,
        "a client and a server span per call"
    );
    for s in [&a, &b] {
        let m = s.metrics.encode();
        assert_eq!(counter(&m, "dropped") + counter(&m, "failed"), 0, "{m}");
    }
    drop((a, b));
}

/// With the collector down every call still succeeds, and the spans that
/// could not be exported are counted as failed (or dropped), not lost
/// silently. (That a down collector costs no latency is a benchmark:
/// `cargo xtask bench sidecar`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the OpenTelemetry Collector from cargo xtask tools"]
async fn a_down_collector_fails_no_request_and_is_counted() {
    // Nothing listens there: a port taken from the OS and released.
    let down = format!(
        "http://127.0.0.1:{}",
        trellis_tests::free_port([127, 0, 0, 1])
    );
    let app = hello_app().await;
    let b = sidecar("backend", policy("backend", app.port(), 1.0), &[], &down).await;
    let http = reqwest::Client::new();
    let calls = 200u64;
    for _ in 0..calls {
        let rsp = http
            .get(format!("http://{}/hello", b.inbound))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = b.metrics.encode();
        let (failed, dropped, exported) = (
            counter(&m, "failed"),
            counter(&m, "dropped"),
            counter(&m, "exported"),
        );
        assert_eq!(exported, 0, "{m}");
        if failed + dropped == calls {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans not accounted for: failed {failed}, dropped {dropped}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.shutdown().await;
}

/// The operator's reconciles are traces too when it has an endpoint: the
/// real binary against the local apiserver, exporting to the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster and the OpenTelemetry Collector"]
async fn the_operators_reconciles_are_traced() {
    use trellis_tests::{
        TestNamespace, binaries::built, kubeconfig_path, kubectl, operator::install_crd,
    };

    let collector = Collector::start([127, 0, 0, 1]);
    let ns = TestNamespace::new("tracing").await;
    install_crd(&ns.client).await;
    let operator = built("trellis-operator", "trellis-operator");
    let log = testing::temp_dir("operator").join("operator.log");
    let mut child = std::process::Command::new(operator)
        .args([
            "--watch-namespace",
            &ns.name,
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--otlp-endpoint", &collector.endpoint])
        .env("KUBECONFIG", kubeconfig_path())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting trellis-operator");
    let manifest = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: MicroService\nmetadata:\n  name: traced\n  namespace: {}\nspec:\n  image: trellis/smoke:0.1.0\n  port: 8080\n",
        ns.name
    );
    let mut apply = kubectl()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    assert!(
        apply.wait().unwrap().success(),
        "kubectl apply of the MicroService"
    );

    let spans = collector
        .wait_for(Duration::from_secs(60), |spans| {
            spans.iter().any(|s| {
                s.service == "trellis-operator"
                    && s.name == "reconcile"
                    && s.attributes.get("microservice").map(String::as_str) == Some("traced")
            })
        })
        .await;
    let _ = child.kill();
    let _ = child.wait();
    let reconcile = spans
        .iter()
        .find(|s| {
            s.name == "reconcile"
                && s.attributes.get("microservice").map(String::as_str) == Some("traced")
        })
        .unwrap();
    assert_eq!(reconcile.attributes["namespace"], ns.name, "{reconcile}");
    assert!(
        reconcile.parent.is_empty(),
        "each reconcile is its own trace: {reconcile}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("exporting reconcile traces"),
        "the operator says where its traces go"
    );
}
