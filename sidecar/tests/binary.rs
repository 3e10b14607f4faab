//! The `trellis-sidecar` binary as a user runs it: from its documented
//! flags alone, in static mode, on loopback. Also the RSS benchmark
//! (`cargo test -p trellis-sidecar --test binary -- --ignored --nocapture`).

mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use http::StatusCode;
use support::*;

/// The binary from its documented flags alone, its JSON logs on a pipe.
async fn spawn_binary(policy_text: &str, endpoints: &str) -> SidecarProcess {
    sidecar_process(policy_text, endpoints, &[], Stdio::piped()).await
}

#[test]
fn help_documents_every_flag_and_environment_variable() {
    let out = Command::new(SIDECAR_BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--inbound-addr",
        "--outbound-addr",
        "--admin-addr",
        "--policy-file",
        "--policy-configmap",
        "--static-endpoints",
        "--endpoints-file",
        "--drain-grace",
        "TRELLIS_POLICY_CONFIGMAP",
        "TRELLIS_POLICY_FILE",
        "POD_NAMESPACE",
        "POD_NAME",
        "TRELLIS_SERVICE",
        "0.0.0.0:15006",
        "127.0.0.1:15001",
        "0.0.0.0:15020",
    ] {
        assert!(
            help.contains(needle),
            "--help does not mention {needle}:\n{help}"
        );
    }
}

#[tokio::test]
async fn runs_from_flags_alone_and_drains_on_sigterm() {
    let app = upstream("app").await;
    let user = upstream("user").await;
    let mut sc = spawn_binary(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &format!("user={}", user.addr),
    )
    .await;
    let a = get_via(sc.outbound, "http://user/api/v1/users/1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["path"], "/api/v1/users/1");

    // SIGTERM with requests in flight: they finish, then the process exits 0.
    let outbound = sc.outbound;
    let in_flight: Vec<_> = (0..4)
        .map(|_| tokio::spawn(get_via(outbound, "http://user/slow?ms=500")))
        .collect();
    // Signal only once all 4 are in flight, however long they took to get
    // there: one not yet connected would be refused, not drained.
    assert!(
        eventually(Duration::from_secs(10), || async { user.hits() == 5 }).await,
        "only {} of 4 requests reached the upstream",
        user.hits() - 1
    );
    let killed = Command::new("kill")
        .args(["-TERM", &sc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for r in in_flight {
        assert_eq!(r.await.unwrap().status, StatusCode::OK);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = sc.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");

    // Logs are JSON lines.
    let mut logs = String::new();
    use std::io::Read;
    sc.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    let first = logs.lines().next().expect("some log output");
    let line: serde_json::Value = serde_json::from_str(first).unwrap();
    assert!(
        line["level"].is_string() && line["message"].is_string(),
        "{first}"
    );
    assert!(logs.contains("draining"), "{logs}");
}

/// The process's resident set in KiB, 0 once it is gone.
fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:").unwrap_or(0)
}

/// Prints the sidecar's RSS idle and under load, with throughput and
/// latency. Run it against a release build for numbers that mean anything;
/// under `cargo test` it measures the debug build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: prints numbers, asserts nothing about speed"]
async fn bench_rss_idle_and_under_load() {
    let app = upstream("app").await;
    let ups = [
        upstream("u1").await,
        upstream("u2").await,
        upstream("u3").await,
    ];
    let eps: Vec<String> = ups.iter().map(|u| u.addr.to_string()).collect();
    let sc = spawn_binary(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &format!("user={}", eps.join(",")),
    )
    .await;
    let pid = sc.child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(pid);

    let (total, concurrency) = (20_000usize, 32usize);
    let outbound = sc.outbound;
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        workers.push(tokio::spawn(async move {
            // One keep-alive connection per worker, as a pooled client would.
            let mut send = h1_connect(outbound).await;
            let mut lat = Vec::with_capacity(total / concurrency);
            for _ in 0..total / concurrency {
                let req = http::Request::get("http://user/")
                    .header("host", "user")
                    .body(full(""))
                    .unwrap();
                let t = Instant::now();
                send.ready().await.unwrap();
                let rsp = send.send_request(req).await.unwrap();
                assert_eq!(rsp.status(), StatusCode::OK);
                http_body_util::BodyExt::collect(rsp.into_body())
                    .await
                    .unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    let elapsed = start.elapsed();
    let loaded = rss_kib(pid);
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed).max(loaded);
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "trellis-sidecar ({} build): idle RSS {:.1} MiB; under load RSS {:.1} MiB (peak {:.1} MiB); \
         {} requests at concurrency {} in {:.2?} = {:.0} req/s; latency p50 {:.2?} p99 {:.2?}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        peak as f64 / 1024.0,
        lat.len(),
        concurrency,
        elapsed,
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
    );
}
