//! The operator's watches across API outages (control-plane tier), without
//! disturbing the shared apiserver: the real `trellis-operator` binary talks
//! to the apiserver through a TCP relay in this test (its kubeconfig points
//! at the relay), and the relay is cut three times during a burst of creates
//! and updates — every relayed connection reset, the port closed so that
//! connecting is refused — and restored a few seconds later on the same port.
//! The burst itself goes straight to the apiserver, so changes keep
//! happening while the operator cannot see them.
//!
//! This is the relay version of `tests/tests/control_plane_faults.rs`'s
//! `apiserver_restarted_three_times_during_a_burst_converges`. It needs each
//! watch to back off on its own: kube-runtime's `Controller` pauses its one
//! merged trigger stream (every watch at once) with an exponential backoff
//! after any watch error, so the errors of nine watches during the outages
//! would keep all of them paused for up to a minute after the API is back,
//! and new and changed MicroServices unseen that long.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use trellis_operator::MicroService;
use trellis_tests::{
    convergence::{microservice, namespace, wait_converged},
    operator_process::OperatorProcess,
    relay::{Relay, apiserver},
};

/// MicroServices created in the burst; half of them are updated too.
const COUNT: usize = 120;
/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(5);
/// How long convergence may take after the API is back for good.
const CONVERGE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// The test

/// `COUNT` creates and `COUNT / 2` updates, paced over about 30 s, while the
/// operator's API connection is cut three times for [`OUTAGE`] each: every
/// MicroService converges to its last spec within [`CONVERGE`] of the API
/// being back, with exactly one of each child and no orphans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: cargo xtask test"]
async fn api_cut_three_times_during_a_burst_converges() {
    let ns = namespace("operator-watch").await;
    let (server, target) = apiserver();
    let relay = Arc::new(Relay::new(target).await);
    let kubeconfig = relay.kubeconfig(&server, &format!("trellis-operator-watch-{}", ns.name));
    let mut operator = OperatorProcess::start(&ns.name, "watch", &kubeconfig, &[]);
    let api = ns.api::<MicroService>();

    // Outages at about a quarter, a half and three quarters of the burst.
    let started = Instant::now();
    let cuts = {
        let relay = relay.clone();
        tokio::spawn(async move {
            for at in [6, 16, 26] {
                tokio::time::sleep_until((started + Duration::from_secs(at)).into()).await;
                relay.cut().await;
                tokio::time::sleep(OUTAGE).await;
                relay.restore().await;
            }
        })
    };
    let mut want = BTreeMap::new();
    let pace = Duration::from_secs(32) / (COUNT as u32 * 3 / 2);
    let mut next = Instant::now();
    for i in 0..COUNT {
        let name = format!("ms-{i:03}");
        api.create(&PostParams::default(), &microservice(&name, "1"))
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        want.insert(name, "1".to_owned());
        next += pace;
        tokio::time::sleep_until(next.into()).await;
        if i % 2 == 1 {
            let earlier = format!("ms-{:03}", i / 2);
            let patch = Patch::Merge(json!({ "spec": { "config": { "VERSION": "2" } } }));
            api.patch(&earlier, &PatchParams::default(), &patch)
                .await
                .unwrap_or_else(|e| panic!("updating {earlier}: {e}"));
            want.insert(earlier, "2".to_owned());
            next += pace;
            tokio::time::sleep_until(next.into()).await;
        }
    }
    let burst = started.elapsed();
    cuts.await.unwrap();

    let took = wait_converged(&ns, &want, CONVERGE).await;
    let metrics = operator.metrics().await;
    let (reconciles, errors) = (metrics.reconciles(), metrics.errors());
    assert!(operator.alive(), "the operator survived the outages");
    eprintln!(
        "burst of {} writes over {burst:.1?} with 3 API outages of {OUTAGE:?}; converged {took:.1?} \
         after the API came back; operator: {reconciles} reconciles, {errors} errors",
        COUNT + COUNT / 2,
    );
    assert!(
        errors <= (COUNT * 5) as f64,
        "{errors} reconcile errors for {COUNT} MicroServices"
    );
    let _ = std::fs::remove_file(kubeconfig);
}
