//! The `trellis` CLI against a chart install on the node: `trellis check`
//! passes, then fails naming the cause and the fix when the operator is
//! scaled to 0 and when a sidecar keeps an older policy than it was given
//! (the missing CRD is a unit test of cli/src/check.rs: deleting the CRD of
//! a cluster someone's MicroServices run on would delete them all);
//! `trellis stat` under a known load reports the rate and latency the load
//! generator measured.

use std::{
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod},
};
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use trellis_operator::MicroService;
use trellis_tests::{TestNamespace, binaries::built, eventually, helm, kubeconfig_path};

fn chart() -> PathBuf {
    trellis_tests::shop::workspace().join("charts/trellis")
}

fn trellis(args: &[&str]) -> Output {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let bin = BIN.get_or_init(|| built("trellis-cli", "trellis"));
    std::process::Command::new(bin)
        .args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .output()
        .expect("running trellis")
}

/// Runs `trellis check` with `args` until `done` holds for its exit code
/// and output, for at most `timeout`; the output then. On time-out, panics
/// with the last output.
async fn check_until(
    args: &[&str],
    timeout: Duration,
    done: impl Fn(Option<i32>, &str) -> bool,
) -> String {
    let started = Instant::now();
    loop {
        let out = trellis(&[&["check"], args].concat());
        let t = text(&out);
        if done(out.status.code(), &t) {
            return t;
        }
        assert!(
            started.elapsed() < timeout,
            "trellis check after {timeout:?}:\n{t}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Requests at `per_second` to `url` for `seconds`; the latencies of those
/// answered 200.
async fn load(url: String, per_second: u64, seconds: u64) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
    let mut calls = Vec::new();
    for _ in 0..per_second * seconds {
        tick.tick().await;
        let (client, url) = (client.clone(), url.clone());
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let ok = client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            ok.then(|| started.elapsed())
        }));
    }
    let mut latencies = Vec::new();
    for c in calls {
        if let Ok(Some(l)) = c.await {
            latencies.push(l);
        }
    }
    latencies.sort();
    latencies
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the full local node and the images: cargo xtask test"]
async fn check_passes_then_names_each_fault_and_stat_agrees_with_the_load() {
    let system = TestNamespace::on_node("trellis-system").await;
    let apps = TestNamespace::on_node("apps").await;
    let release = format!("c{}", &system.name[system.name.len() - 6..]);
    let out = helm()
        .args(["install", &release])
        .arg(chart())
        .args(["--namespace", &system.name])
        .args(["--set", &format!("watchNamespace={}", apps.name)])
        .args(["--wait", "--timeout", "120s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm install: {}", text(&out));
    let ms: MicroService = serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": "hello" },
        // Permissive: the load below comes from this host, outside the mesh,
        // in plaintext, which the default (Strict) refuses with 403.
        "spec": {
            "image": "trellis/smoke:0.1.0", "port": 8080,
            "health": { "path": "/", "interval": "1s" },
            "inbound": { "mtls": "Permissive" },
        },
    }))
    .unwrap();
    let microservices = apps.api::<MicroService>();
    microservices
        .create(&PostParams::default(), &ms)
        .await
        .unwrap();
    eventually("hello to be Ready", Duration::from_secs(120), || async {
        let ms = microservices.get("hello").await.ok()?;
        ms.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    let scope = ["-n", &apps.name, "--operator-namespace", &system.name];

    // A healthy install passes every check.
    let passed = check_until(&scope, Duration::from_secs(60), |code, _| code == Some(0)).await;
    assert!(
        passed.contains("all ") && passed.contains("checks passed"),
        "{passed}"
    );
    assert!(passed.contains("✓ MicroService CRD"), "{passed}");
    assert!(
        passed.contains(&format!(
            "✓ MicroService {}/hello sidecars: 1 running the policy",
            apps.name
        )),
        "{passed}"
    );

    // stat under a known load: 40 requests a second for 12 s to the pod's
    // inbound listener, stat's 8 s window inside it.
    let pod = apps
        .api::<Pod>()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("hello"))
        })
        .expect("hello's pod");
    let ip = pod.status.unwrap().pod_ip.unwrap();
    let generator = tokio::spawn(load(format!("http://{ip}:15006/"), 40, 12));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ns = apps.name.clone();
    let stat = tokio::task::spawn_blocking(move || {
        trellis(&["stat", "-n", &ns, "hello", "--interval", "8", "-o", "json"])
    })
    .await
    .unwrap();
    assert!(stat.status.success(), "{}", text(&stat));
    let latencies = generator.await.unwrap();
    assert!(
        latencies.len() >= 470,
        "the generator's calls mostly succeed: {}",
        latencies.len()
    );
    let rows: Value = serde_json::from_slice(&stat.stdout).unwrap();
    let inbound = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["direction"] == "inbound")
        .unwrap_or_else(|| panic!("an inbound row: {rows}"));
    // Tolerances: the rate within 15 % of the 40/s sent; success 100 %;
    // the sidecar's inbound latency is part of what the generator saw, and
    // a quantile from doubling buckets may read up to twice the truth, so
    // stat's p50 is at most twice the generator's plus 1 ms.
    let rps = inbound["rps"].as_f64().unwrap();
    assert!(
        (34.0..=46.0).contains(&rps),
        "stat says {rps}/s, the generator sent 40/s: {inbound}"
    );
    assert_eq!(inbound["success"], 1.0, "{inbound}");
    let (stat_p50, load_p50) = (
        inbound["p50Ms"].as_f64().unwrap(),
        quantile(&latencies, 0.5),
    );
    assert!(
        stat_p50 <= 2.0 * load_p50 + 1.0,
        "stat's p50 {stat_p50:.2} ms against the generator's {load_p50:.2} ms"
    );

    // The operator scaled to 0: named, with the command that fixes it.
    let operator = format!("{release}-operator");
    system
        .api::<Deployment>()
        .patch(
            &operator,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    let failed = check_until(&scope, Duration::from_secs(60), |code, t| {
        code == Some(1) && t.contains("scaled to 0")
    })
    .await;
    assert!(
        failed.contains(&format!(
            "kubectl -n {} scale deployment/{operator} --replicas=1",
            system.name
        )),
        "{failed}"
    );

    // With the operator down, an invalid policy in the sidecar's ConfigMap:
    // the sidecar keeps its last good one, and check names the pod and why.
    apps.api::<ConfigMap>()
        .patch(
            "hello-sidecar",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"data": {"policy.json": "{\"service\": \"hello\", \"appPort\": 0}"}}),
            ),
        )
        .await
        .unwrap();
    let stale = check_until(&scope, Duration::from_secs(150), |code, t| {
        code == Some(1) && t.contains("not running the policy in ConfigMap hello-sidecar")
    })
    .await;
    assert!(stale.contains("it rejected the new one"), "{stale}");
    assert!(
        stale.contains("→ a sidecar keeps its last good policy"),
        "{stale}"
    );

    let out = helm()
        .args(["uninstall", &release, "--namespace", &system.name, "--wait"])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm uninstall: {}", text(&out));
}
