//! The operator's watches across API outages (control-plane tier), without
//! disturbing the shared apiserver: the real `trellis-operator` binary talks
//! to the apiserver through a TCP relay in this test (its kubeconfig points
//! at the relay), and the relay is cut three times during a burst of creates
//! and updates — every relayed connection reset, the port closed so that
//! connecting is refused — and restored a few seconds later on the same port.
//! The burst itself goes straight to the apiserver, so changes keep
//! happening while the operator cannot see them.
//!
//! This is the relay version of `tests/tests/faults.rs`'s
//! `apiserver_restarted_three_times_during_a_burst_converges`. It found why
//! that one lagged: kube-runtime's `Controller` pauses its one merged trigger
//! stream (every watch at once) with an exponential backoff after any watch
//! error, so the errors of nine watches during the outages kept all of them
//! paused for up to a minute after the API was back; new and changed
//! MicroServices went unseen that long. Each watch now backs off on its own.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, ResourceQuota, Service, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use trellis_operator::{MicroService, render};
use trellis_tests::{
    TestNamespace, binaries::built, kubeconfig_path, operator::install_crd, relay::Relay,
};

/// MicroServices created in the burst; half of them are updated too.
const COUNT: usize = 120;
/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(5);
/// How long convergence may take after the API is back for good.
const CONVERGE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// The relay (trellis_tests::relay) and the kubeconfig through it

/// The apiserver's address and a copy of the admin kubeconfig whose server is the relay.
fn apiserver() -> (String, SocketAddr) {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig_path()).unwrap();
    let server = kubeconfig.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("the kubeconfig names a server");
    let target = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .expect("the server is an ip:port address");
    (server, target)
}

fn kubeconfig_through(relay: &Relay, server: &str, ns: &str) -> PathBuf {
    let original = fs::read_to_string(kubeconfig_path()).unwrap();
    let relayed = original.replace(server, &format!("https://{}", relay.addr));
    assert_ne!(original, relayed, "the kubeconfig names {server}");
    let path = std::env::temp_dir().join(format!("trellis-operator-watch-{ns}.kubeconfig"));
    fs::write(&path, relayed).unwrap();
    path
}

// ---------------------------------------------------------------------------
// The operator as a child process

struct OperatorProcess {
    child: Child,
    metrics: String,
    log: PathBuf,
}

impl OperatorProcess {
    fn start(ns: &str, kubeconfig: &PathBuf) -> Self {
        let binary = built("trellis-operator", "trellis-operator");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("trellis-operator-watch-{ns}.log"));
        let file = fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .args(["--watch-namespace", ns, "--lease-namespace", ns])
            .args(["--identity", "watch", "--metrics-addr", &metrics])
            .args(["--log-format", "json"])
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting trellis-operator");
        Self {
            child,
            metrics,
            log,
        }
    }

    /// The sum of every series of the metric `name`, once /metrics answers.
    async fn metric(&self, name: &str) -> f64 {
        for _ in 0..50 {
            if let Some(text) = self.scrape().await {
                return text
                    .lines()
                    .filter(|l| {
                        l.strip_prefix(name)
                            .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the operator's /metrics does not answer");
    }

    async fn scrape(&self) -> Option<String> {
        let mut s = TcpStream::connect(&self.metrics).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut text))
            .await
            .ok()?
            .ok()?;
        Some(text.split_once("\r\n\r\n")?.1.to_owned())
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("operator log: {}", self.log.display());
    }
}

// ---------------------------------------------------------------------------
// What the MicroServices should converge to

async fn namespace() -> TestNamespace {
    let ns = TestNamespace::new("operator-watch").await;
    install_crd(&ns.client).await;
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": { "name": "no-pods" },
        "spec": { "hard": { "pods": "0" } },
    }))
    .unwrap();
    ns.api::<ResourceQuota>()
        .create(&PostParams::default(), &quota)
        .await
        .unwrap();
    ns
}

fn microservice(name: &str, version: &str) -> MicroService {
    serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": name },
        "spec": {
            "image": "trellis/smoke:0.1.0",
            "port": 8080,
            "replicas": 0,
            "config": { "VERSION": version },
        },
    }))
    .unwrap()
}

async fn children<K>(ns: &TestNamespace) -> Result<BTreeMap<String, (Vec<String>, K)>, String>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let list = ns
        .api::<K>()
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=trellis-operator"))
        .await
        .map_err(|e| format!("listing {}: {e}", K::kind(&())))?;
    Ok(list
        .items
        .into_iter()
        .map(|k| {
            let owners = k
                .owner_references()
                .iter()
                .filter(|o| o.controller == Some(true))
                .map(|o| o.uid.clone())
                .collect();
            (k.name_any(), (owners, k))
        })
        .collect())
}

/// Exactly the expected names, each controlled by exactly its MicroService.
fn exactly<K>(
    kind: &str,
    have: &BTreeMap<String, (Vec<String>, K)>,
    want: &BTreeMap<String, String>,
) -> Result<(), String> {
    let have_names: BTreeSet<&String> = have.keys().collect();
    let want_names: BTreeSet<&String> = want.keys().collect();
    if have_names != want_names {
        let missing: Vec<_> = want_names.difference(&have_names).take(5).collect();
        let extra: Vec<_> = have_names.difference(&want_names).take(5).collect();
        return Err(format!(
            "{kind}: {} of {} (missing e.g. {missing:?}, unexpected {extra:?})",
            have.len(),
            want.len()
        ));
    }
    for (name, (owners, _)) in have {
        if owners != &vec![want[name].clone()] {
            return Err(format!(
                "{kind} {name}: controller owners {owners:?}, want [{}]",
                want[name]
            ));
        }
    }
    Ok(())
}

/// Every MicroService in `want` (name → config VERSION) Ready at its current
/// generation, every child present once with the right owner and the last config.
async fn converged(ns: &TestNamespace, want: &BTreeMap<String, String>) -> Result<(), String> {
    let all = ns
        .api::<MicroService>()
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let uids: BTreeMap<String, String> = all
        .items
        .iter()
        .map(|m| (m.name_any(), m.uid().unwrap_or_default()))
        .collect();
    if uids.keys().collect::<BTreeSet<_>>() != want.keys().collect() {
        return Err(format!("{} MicroServices, want {}", uids.len(), want.len()));
    }
    let not_ready: Vec<String> = all
        .items
        .iter()
        .filter(|m| {
            let st = m.status.as_ref();
            st.and_then(|s| s.observed_generation) != m.metadata.generation
                || !st.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        })
        .map(|m| m.name_any())
        .collect();
    if !not_ready.is_empty() {
        return Err(format!(
            "{} MicroServices not Ready at their generation, e.g. {:?}",
            not_ready.len(),
            &not_ready[..not_ready.len().min(5)]
        ));
    }
    let by = |suffix: &str| -> BTreeMap<String, String> {
        uids.iter()
            .map(|(n, uid)| (format!("{n}{suffix}"), uid.clone()))
            .collect()
    };
    let mut config_maps = by("-config");
    config_maps.extend(by("-sidecar"));
    let cms = children::<ConfigMap>(ns).await?;
    exactly("ConfigMap", &cms, &config_maps)?;
    exactly(
        "ServiceAccount",
        &children::<ServiceAccount>(ns).await?,
        &by(""),
    )?;
    exactly("Role", &children::<Role>(ns).await?, &by("-sidecar"))?;
    exactly(
        "RoleBinding",
        &children::<RoleBinding>(ns).await?,
        &by("-sidecar"),
    )?;
    exactly("Service", &children::<Service>(ns).await?, &by(""))?;
    let deployments = children::<Deployment>(ns).await?;
    exactly("Deployment", &deployments, &by(""))?;
    for (name, version) in want {
        let have = cms[&format!("{name}-config")]
            .1
            .data
            .as_ref()
            .and_then(|d| d.get("VERSION"));
        if have != Some(version) {
            return Err(format!(
                "ConfigMap {name}-config has VERSION {have:?}, want {version}"
            ));
        }
        let checksum =
            render::config_checksum(&BTreeMap::from([("VERSION".to_owned(), version.clone())]));
        let have = deployments[name]
            .1
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(render::CONFIG_CHECKSUM_ANNOTATION));
        if have != Some(&checksum) {
            return Err(format!(
                "Deployment {name} has checksum {have:?}, want {checksum}"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The test

/// `COUNT` creates and `COUNT / 2` updates, paced over about 30 s, while the
/// operator's API connection is cut three times for [`OUTAGE`] each: every
/// MicroService converges to its last spec within [`CONVERGE`] of the API
/// being back, with exactly one of each child and no orphans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: cargo xtask test"]
async fn api_cut_three_times_during_a_burst_converges() {
    let ns = namespace().await;
    let (server, target) = apiserver();
    let relay = Arc::new(Relay::new(target).await);
    let kubeconfig = kubeconfig_through(&relay, &server, &ns.name);
    let mut operator = OperatorProcess::start(&ns.name, &kubeconfig);
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
    let back = Instant::now();

    let took = loop {
        let last = match converged(&ns, &want).await {
            Ok(()) => break back.elapsed(),
            Err(e) => e,
        };
        assert!(
            back.elapsed() < CONVERGE,
            "not converged {CONVERGE:?} after the API came back: {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let reconciles = operator.metric("trellis_operator_reconciles_total").await;
    let errors = operator
        .metric("trellis_operator_reconcile_errors_total")
        .await;
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
    let _ = fs::remove_file(kubeconfig);
}
