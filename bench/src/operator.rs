//! `cargo xtask bench operator`: the operator against the API's own cost.
//!
//! On the shared cluster, in a fresh namespace whose ResourceQuota allows no
//! pods (and with `replicas: 0`, so the 1,000 Deployments never start one):
//!
//! 1. start the release operator as a process (`--watch-namespace`), its API
//!    traffic going through a counting proxy on loopback (plain HTTP in,
//!    the admin credentials out), so every request it makes is counted;
//! 2. apply N MicroServices at once and time until every one has
//!    `status.observedGeneration == metadata.generation` and all children exist;
//! 3. count its API writes over an idle minute with everything converged;
//! 4. edit one spec at a time and time until its Deployment changes;
//! 5. stop it, and in a second namespace write the same objects straight to
//!    the API with server-side apply (the MicroService, the children that
//!    `trellis_operator::render` produces, the status) at the operator's
//!    reconcile concurrency: the lower bound.
//!
//! Both namespaces are deleted at the end. Writes `target/bench/operator.json`
//! and `operator.md`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, ResourceQuota, Service, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    core::NamespaceResourceScope,
    runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use trellis_operator::{
    MicroService,
    render::{self, CONFIG_CHECKSUM_ANNOTATION, RenderConfig},
};

use super::{
    Procs, RssSampler, commit, cpu_seconds, free_addr, loadavg, machine, mib, ms, now_utc,
    release_binary, report, results_dir, status_kib, version_of,
};
use xtask::paths;

/// Settings of one run.
#[derive(Clone, Debug, clap::Args)]
pub struct OperatorBench {
    /// MicroServices to create.
    #[arg(long, default_value = "1000")]
    pub count: usize,
    /// The operator's reconcile concurrency (`--concurrency`), and the lower
    /// bound's writers.
    #[arg(long, default_value = "4")]
    pub concurrency: usize,
    /// Clients applying the MicroServices at once (the same in both runs).
    #[arg(long, default_value = "32")]
    pub apply_concurrency: usize,
    /// Spec edits timed one after another.
    #[arg(long, default_value = "100")]
    pub edits: usize,
    /// How long to count writes with everything converged.
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    pub idle: u64,
    /// How long convergence may take before the run gives up.
    #[arg(long, default_value = "1800", value_name = "SECONDS")]
    pub timeout: u64,
    /// Use the already built release trellis-operator.
    #[arg(long)]
    pub no_build: bool,
    /// More environment for the operator (`KEY=VALUE`, repeatable), for
    /// trials such as `TRELLIS_STATUS_REPORT_WAIT_SECONDS=0`.
    #[arg(long, value_name = "KEY=VALUE")]
    pub operator_env: Vec<String>,
    /// Run the operator under this command, split on spaces (a heap
    /// profiler: `heaptrack -o target/bench/operator.heaptrack`).
    #[arg(long, value_name = "COMMAND")]
    pub operator_wrapper: Option<String>,
}

/// The processes whose CPU time each phase reports, the control plane and
/// the operator: their `comm` (the first 15 bytes of the name) and label.
const CPU_OF: [(&str, &str); 4] = [
    ("kube-apiserver", "apiserver"),
    ("etcd", "etcd"),
    ("kube-controller", "controller-manager"),
    ("trellis-operato", "operator"),
];

/// CPU seconds (user + system) used so far by the processes of
/// [`CPU_OF`], by label.
fn cpu_by_process() -> BTreeMap<String, f64> {
    let mut pids: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if let Some((_, label)) = CPU_OF.iter().find(|(c, _)| *c == comm.trim()) {
            pids.entry(label).or_default().push(pid);
        }
    }
    CPU_OF
        .iter()
        .map(|(_, label)| {
            let of = pids.get(label).map(Vec::as_slice).unwrap_or_default();
            (label.to_string(), cpu_seconds(of))
        })
        .collect()
}

/// What each process of [`CPU_OF`] used between two [`cpu_by_process`].
fn cpu_used(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> serde_json::Value {
    after
        .iter()
        .map(|(name, t)| {
            let used = (t - before.get(name).copied().unwrap_or(0.0)).max(0.0);
            (name.clone(), json!((used * 100.0).round() / 100.0))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

const OPERATOR_NS: &str = "trellis-bench-operator";
const DIRECT_NS: &str = "trellis-bench-direct";
const MANAGER: &str = "trellis-bench";
/// Children per MicroService with `replicas: 0` and no autoscaling: two
/// ConfigMaps, ServiceAccount, Role, RoleBinding, Deployment, Service.
const CHILDREN: usize = 7;

pub fn operator(opts: &OperatorBench) -> Result<()> {
    if opts.count == 0 || opts.concurrency == 0 || opts.apply_concurrency == 0 {
        bail!("--count, --concurrency and --apply-concurrency must be positive");
    }
    let binary = release_binary("trellis-operator", "trellis-operator", opts.no_build)?;
    let dir = results_dir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(admin_client())?;
    let mut procs = Procs::default();
    let result = rt.block_on(run(opts, &client, &binary, &dir, &mut procs));
    drop(procs);
    // Whatever happened, leave no 1,000-object namespaces behind.
    rt.block_on(async {
        for ns in [OPERATOR_NS, DIRECT_NS] {
            let _ = Api::<Namespace>::all(client.clone())
                .delete(ns, &DeleteParams::background())
                .await;
        }
    });
    let report = result?;
    let md = markdown(&report);
    report::write(
        &dir,
        "operator",
        &report,
        &md,
        &format!(" (namespaces {OPERATOR_NS} and {DIRECT_NS} are being deleted)"),
    )
}

async fn admin_client() -> Result<Client> {
    let path = paths::admin_kubeconfig();
    let kc = kube::config::Kubeconfig::read_from(&path)
        .with_context(|| format!("reading {} (is the cluster up?)", path.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(Client::try_from(cfg)?)
}

async fn run(
    opts: &OperatorBench,
    client: &Client,
    binary: &std::path::Path,
    dir: &std::path::Path,
    procs: &mut Procs,
) -> Result<serde_json::Value> {
    install_crd(client).await?;
    for ns in [OPERATOR_NS, DIRECT_NS] {
        fresh_namespace(client, ns).await?;
    }
    let load_before = loadavg();

    // The operator, through the counting proxy.
    let counter = Counter::default();
    let proxy = start_proxy(client.clone(), counter.clone()).await?;
    let kubeconfig = dir.join("operator-bench.kubeconfig");
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n    server: http://{proxy}\n\
             users:\n- name: bench\n  user: {{}}\ncontexts:\n- name: bench\n  context:\n    cluster: bench\n    user: bench\n\
             current-context: bench\n"
        ),
    )?;
    let admin = free_addr()?;
    let mut words = opts
        .operator_wrapper
        .as_deref()
        .unwrap_or("")
        .split_whitespace();
    let mut command = match words.next() {
        Some(w) => {
            let mut c = Command::new(w);
            c.args(words).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let pid = procs.spawn(
        "operator",
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", "/root")
            .args(["--watch-namespace", OPERATOR_NS])
            .args(["--metrics-addr", &admin.to_string()])
            .args(["--concurrency", &opts.concurrency.to_string()])
            .args(["--log-filter", "warn"])
            .envs(opts.operator_env.iter().filter_map(|kv| kv.split_once('='))),
        &dir.join("operator-bench.log"),
    )?;
    wait_watching(&counter, procs).await?;
    let rss_idle_empty = status_kib(pid, "VmRSS:");
    let sampler = RssSampler::start(vec![vec![pid]]);

    // 1. N MicroServices at once.
    eprintln!("== applying {} MicroServices for the operator", opts.count);
    counter.reset();
    let cpu_before = cpu_by_process();
    let t0 = Instant::now();
    create_microservices(client, OPERATOR_NS, opts.count, opts.apply_concurrency).await?;
    let applied = t0.elapsed();
    let timeout = Duration::from_secs(opts.timeout);
    wait_converged(client, OPERATOR_NS, opts.count, timeout, procs).await?;
    let converge = t0.elapsed();
    let converge_cpu = cpu_used(&cpu_before, &cpu_by_process());
    let (converge_requests, converge_detail) = counter.take();
    eprintln!(
        "   converged in {:.1} s ({:.1} s to apply)",
        converge.as_secs_f64(),
        applied.as_secs_f64()
    );

    // 2. Idle writes with everything converged and settled: every
    // MicroService Ready (the Deployment controller has caught up with
    // every Deployment, so no status is still moving), then a moment more.
    let settled = wait_ready(client, OPERATOR_NS, opts.count, timeout).await?;
    let (_, settle_detail) = counter.take();
    let to_ready = settled - t0;
    eprintln!(
        "   all Ready {:.1} s after applying",
        to_ready.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    eprintln!("== counting idle API requests for {} s", opts.idle);
    counter.reset();
    tokio::time::sleep(Duration::from_secs(opts.idle)).await;
    let (idle, idle_detail) = counter.take();

    // 3. Single-change latency.
    eprintln!("== {} spec edits, one at a time", opts.edits);
    counter.reset();
    let edits = edit_latencies(client, opts.edits, opts.count, EditBy::Operator).await?;
    let (_, edit_detail) = counter.take();
    let peak = sampler.stop()[0].max(status_kib(pid, "VmHWM:"));
    let rss_converged = status_kib(pid, "VmRSS:");
    let rss_kinds = rss_by_kind(pid);
    let threads = status_kib(pid, "Threads:");
    drop(std::mem::take(procs));

    // 4. The lower bound: the same objects straight to the API.
    eprintln!("== the lower bound: the same objects by server-side apply");
    let cpu_before = cpu_by_process();
    let t0 = Instant::now();
    let direct_requests = write_directly(client, opts).await?;
    let lower = t0.elapsed();
    let lower_cpu = cpu_used(&cpu_before, &cpu_by_process());
    wait_converged(client, DIRECT_NS, opts.count, timeout, procs).await?;
    eprintln!("   written in {:.1} s", lower.as_secs_f64());
    eprintln!(
        "== the edits' lower bound: {} edits and their writes by the bench",
        opts.edits
    );
    let direct_edits =
        edit_latencies(client, opts.edits, opts.count, EditBy::Bench(client)).await?;
    eprintln!(
        "== the same {} edits, the bench's writes through the counting proxy",
        opts.edits
    );
    let proxied = Client::try_from(kube::Config::new(format!("http://{proxy}").parse()?))?;
    let proxied_edits =
        edit_latencies(client, opts.edits, opts.count, EditBy::Bench(&proxied)).await?;

    let mut edit_latency = latency_ms(&edits);
    edit_latency["operator_requests_by_resource"] = json!(edit_detail);
    let per = |c: &BTreeMap<String, u64>, n: usize| {
        c.iter()
            .filter(|(k, _)| k.as_str() != "WATCH")
            .map(|(_, v)| *v)
            .sum::<u64>() as f64
            / n as f64
    };
    let writes = |c: &BTreeMap<String, u64>| {
        ["POST", "PUT", "PATCH", "DELETE"]
            .iter()
            .map(|m| c.get(*m).copied().unwrap_or(0))
            .sum::<u64>()
    };
    Ok(json!({
        "date": now_utc(),
        "commit": commit(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "versions": {
            "trellis-operator": version_of(&binary.to_string_lossy(), &["--version"]),
            "kube-apiserver": server_version(client).await,
        },
        "settings": {
            "count": opts.count,
            "concurrency": opts.concurrency,
            "apply_concurrency": opts.apply_concurrency,
            "edits": opts.edits,
            "idle_s": opts.idle,
        },
        "converge": {
            "seconds": converge.as_secs_f64(),
            "apply_seconds": applied.as_secs_f64(),
            "requests_by_verb": converge_requests,
            "requests_by_resource": converge_detail,
            "requests_per_resource": per(&converge_requests, opts.count),
            "writes_per_resource": writes(&converge_requests) as f64 / opts.count as f64,
            "cpu_seconds": converge_cpu,
        },
        // The status writes and Events each MicroService cost on its way
        // from applied to Ready, converging included.
        "to_ready": {
            "seconds": to_ready.as_secs_f64(),
            "status_writes": status_writes_and_events(&[&converge_detail, &settle_detail]).0,
            "events": status_writes_and_events(&[&converge_detail, &settle_detail]).1,
        },
        "lower_bound": {
            "seconds": lower.as_secs_f64(),
            "requests_per_resource": direct_requests as f64 / opts.count as f64,
            "cpu_seconds": lower_cpu,
        },
        "ratio": converge.as_secs_f64() / lower.as_secs_f64(),
        "rss_kib": {
            "idle_empty": rss_idle_empty,
            "converged": rss_converged,
            "peak": peak,
            "converged_by_kind": rss_kinds,
        },
        "threads": threads,
        "operator_env": opts.operator_env,
        // What each MicroService (its children in the caches, its
        // bookkeeping) costs the operator: growth from idle to peak.
        "rss_per_microservice_bytes": peak.saturating_sub(rss_idle_empty) * 1024 / opts.count.max(1) as u64,
        "idle": {
            "seconds": opts.idle,
            "requests_by_verb": idle,
            "requests_by_resource": idle_detail,
            "writes": writes(&idle),
        },
        "edit_latency_ms": edit_latency,
        "edit_lower_bound_ms": latency_ms(&direct_edits),
        "edit_lower_bound_via_proxy_ms": latency_ms(&proxied_edits),
    }))
}

/// The MicroServices' status PATCHes and the Events (created or updated)
/// in the requests counted by resource over the periods given.
fn status_writes_and_events(periods: &[&BTreeMap<String, u64>]) -> (u64, u64) {
    let sum = |keys: &[&str]| {
        periods
            .iter()
            .flat_map(|p| keys.iter().filter_map(|k| p.get(*k)))
            .sum::<u64>()
    };
    (
        sum(&["PATCH microservices/status"]),
        sum(&["POST events", "PATCH events"]),
    )
}

/// A histogram of microseconds as p50, p99 and max in milliseconds, and its count.
fn latency_ms(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50": h.value_at_quantile(0.5) as f64 / 1000.0,
        "p99": h.value_at_quantile(0.99) as f64 / 1000.0,
        "max": h.max() as f64 / 1000.0,
        "count": h.len(),
    })
}

async fn server_version(client: &Client) -> String {
    client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_default()
}

/// Installs (or updates) the CRD from the committed YAML and waits until it is established.
async fn install_crd(client: &Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let path = paths::workspace().join("crds/microservice.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    api.patch(
        &crd.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("installing the MicroService CRD")?;
    for _ in 0..100 {
        let c = api.get(&crd.name_any()).await?;
        let established = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the MicroService CRD is not established after 10 s")
}

/// Deletes a leftover namespace, waits until it is gone, and creates it with
/// a ResourceQuota of zero pods: nothing in it may ever start a pod on the
/// shared node.
async fn fresh_namespace(client: &Client, name: &str) -> Result<()> {
    let api = Api::<Namespace>::all(client.clone());
    if api.get_opt(name).await?.is_some() {
        eprintln!("deleting the leftover namespace {name}");
        let _ = api.delete(name, &DeleteParams::background()).await;
        let deadline = Instant::now() + Duration::from_secs(600);
        while api.get_opt(name).await?.is_some() {
            if Instant::now() > deadline {
                bail!("namespace {name} is still terminating after 10 minutes");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"trellis.dev/bench": "operator"}}
    }))?;
    api.create(&PostParams::default(), &ns).await?;
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}}
    }))?;
    Api::<ResourceQuota>::namespaced(client.clone(), name)
        .create(&PostParams::default(), &quota)
        .await
        .with_context(|| format!("the zero-pod ResourceQuota in {name}"))?;
    Ok(())
}

fn ms_name(i: usize) -> String {
    format!("svc-{i:04}")
}

/// A small but complete MicroService: config, a dependency, resilience,
/// tracing; `replicas: 0` so no pod is wanted.
fn microservice(i: usize) -> serde_json::Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": {"name": ms_name(i)},
        "spec": {
            "image": "trellis/bench-app:0.1.0",
            "replicas": 0,
            "port": 8080,
            "config": {"GREETING": "hello", "INDEX": i.to_string()},
            "dependencies": [{"name": ms_name((i + 1) % 10_000)}],
            "resilience": {"timeout": "2s", "retry": {"attempts": 3}},
            "tracing": {"sampleRatio": 0.01},
        }
    })
}

/// Server-side applies `count` MicroServices, `concurrency` at a time.
async fn create_microservices(
    client: &Client,
    ns: &str,
    count: usize,
    concurrency: usize,
) -> Result<Vec<MicroService>> {
    let api = Api::<MicroService>::namespaced(client.clone(), ns);
    stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            async move {
                api.patch(
                    &ms_name(i),
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&microservice(i)),
                )
                .await
                .with_context(|| format!("applying MicroService {}", ms_name(i)))
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await
}

/// Waits until all `count` MicroServices in `ns` have
/// `status.observedGeneration == metadata.generation` and all their
/// children exist. It follows the MicroServices with one watch, as a
/// client of the operator would: polling LISTs of a thousand whole objects
/// would load the apiserver whose pace is being measured.
async fn wait_converged(
    client: &Client,
    ns: &str,
    count: usize,
    timeout: Duration,
    procs: &mut Procs,
) -> Result<()> {
    let converged = |m: &MicroService| {
        m.metadata.generation.is_some()
            && m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation
    };
    let deadline = Instant::now() + timeout;
    let done = wait_for(client, ns, count, deadline, Some(procs), converged).await;
    if let Err(n) = done {
        bail!(
            "{n} of {count} MicroServices in {ns} converged within {} s (--timeout)",
            timeout.as_secs()
        );
    }
    // Each child is applied before the status that observes its MicroService.
    while children(client, ns).await? < count * CHILDREN {
        if Instant::now() > deadline {
            bail!(
                "the children of {count} MicroServices in {ns} did not all appear within {} s (--timeout)",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Waits until all `count` MicroServices in `ns` have `Ready=True`; when.
async fn wait_ready(client: &Client, ns: &str, count: usize, timeout: Duration) -> Result<Instant> {
    let ready = |m: &MicroService| {
        m.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    };
    let deadline = Instant::now() + timeout;
    match wait_for(client, ns, count, deadline, None, ready).await {
        Ok(at) => Ok(at),
        Err(n) => bail!(
            "{n} of {count} MicroServices in {ns} Ready within {} s (--timeout)",
            timeout.as_secs()
        ),
    }
}

/// Follows the MicroServices in `ns` with one watch until `count` of them
/// satisfy `done` (then returns when), or until `deadline` or the exit of the
/// operator among `procs` (then returns how many did).
async fn wait_for(
    client: &Client,
    ns: &str,
    count: usize,
    deadline: Instant,
    mut procs: Option<&mut Procs>,
    done: impl Fn(&MicroService) -> bool,
) -> Result<Instant, usize> {
    use kube::runtime::watcher::{self, Event};
    let api = Api::<MicroService>::namespaced(client.clone(), ns);
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
    let mut state: BTreeMap<String, bool> = BTreeMap::new();
    let reached = |state: &BTreeMap<String, bool>| state.values().filter(|d| **d).count();
    loop {
        if let Some(procs) = procs.as_deref_mut()
            && let Some(status) = procs.exited("operator")
        {
            eprintln!("   the operator exited ({status}); see target/bench/operator-bench.log");
            return Err(reached(&state));
        }
        if Instant::now() > deadline {
            return Err(reached(&state));
        }
        // A second at most between the checks above.
        let Ok(event) = tokio::time::timeout(Duration::from_secs(1), events.next()).await else {
            continue;
        };
        match event {
            Some(Ok(Event::Init)) => state.clear(),
            Some(Ok(Event::Apply(m) | Event::InitApply(m))) => {
                state.insert(m.name_any(), done(&m));
            }
            Some(Ok(Event::Delete(m))) => {
                state.remove(&m.name_any());
            }
            Some(Ok(Event::InitDone)) => {}
            // The watcher retries on its own; say why it had to.
            Some(Err(error)) => {
                eprintln!("   watching MicroServices in {ns}: {error}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            None => return Err(reached(&state)),
        }
        if reached(&state) >= count {
            return Ok(Instant::now());
        }
    }
}

/// The children in a namespace, counted by kind.
async fn children(client: &Client, ns: &str) -> Result<usize> {
    async fn count<K>(client: &Client, ns: &str) -> Result<usize>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let lp = ListParams::default().labels("app.kubernetes.io/managed-by=trellis-operator");
        Ok(Api::<K>::namespaced(client.clone(), ns)
            .list_metadata(&lp)
            .await?
            .items
            .len())
    }
    Ok(count::<ConfigMap>(client, ns).await?
        + count::<ServiceAccount>(client, ns).await?
        + count::<Role>(client, ns).await?
        + count::<RoleBinding>(client, ns).await?
        + count::<Deployment>(client, ns).await?
        + count::<Service>(client, ns).await?)
}

/// Who carries an edit from a MicroService to its Deployment.
#[derive(Clone, Copy)]
enum EditBy<'a> {
    /// The operator, in [`OPERATOR_NS`].
    Operator,
    /// The bench itself, in [`DIRECT_NS`], writing with the client given:
    /// right after the edit it applies the rendered ConfigMap and
    /// Deployment, then publishes an `Updated` Event without waiting for
    /// it, the writes the operator makes for an edit. The edits' lower
    /// bound: the API's own time for those writes and the watch's delivery,
    /// with no queue, cache or operator between. Given the counting proxy's
    /// client, the same writes take the operator's path to the API, so the
    /// difference is what the proxy adds to the operator's figure.
    Bench(&'a Client),
}

/// Edits one MicroService's config at a time and times until its Deployment
/// carries the new config checksum. Microseconds.
async fn edit_latencies(
    client: &Client,
    edits: usize,
    count: usize,
    by: EditBy<'_>,
) -> Result<Histogram<u64>> {
    use kube::runtime::watcher::{self, Event};
    let (ns, writer) = match by {
        EditBy::Operator => (OPERATOR_NS, client),
        EditBy::Bench(writer) => (DIRECT_NS, writer),
    };
    let mss = Api::<MicroService>::namespaced(client.clone(), ns);
    let deps = Api::<Deployment>::namespaced(client.clone(), ns);
    let cfg = RenderConfig::default();
    let recorder = Recorder::new(
        writer.clone(),
        Reporter {
            controller: render::FIELD_MANAGER.into(),
            instance: None,
        },
    );
    let mut events_published = tokio::task::JoinSet::new();
    let checksum = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_CHECKSUM_ANNOTATION).cloned())
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    for e in 0..edits {
        let name = ms_name(e * 7 % count);
        // The Deployment is followed by a watch opened before the edit, so
        // the time is the operator's and the apiserver's, not a poll's.
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = std::pin::pin!(watcher::watcher(deps.clone(), config));
        let mut before = None;
        loop {
            match events.try_next().await? {
                Some(Event::InitApply(d)) => before = checksum(&d),
                Some(Event::InitDone) => break,
                Some(_) => {}
                None => bail!("edit {e}: the watch of the Deployment {name} ended"),
            }
        }
        // Unique per run of edits: the bench edits each MicroService of the
        // direct namespace in two runs, and an edit to the same value would
        // change nothing.
        let patch = json!({"spec": {"config": {"EDIT": format!("{run}-{e}")}}});
        let t0 = Instant::now();
        let ms = mss
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if let EditBy::Bench(writer) = by {
            // The two children an edit of the config changes, in the
            // operator's order: the ConfigMap, then the Deployment that
            // names its checksum.
            let c = render::render(&ms, &cfg, &render::SecretVersions::new())?;
            apply(writer, &c.config).await?;
            apply(writer, &c.deployment).await?;
            // As the operator does after its applies, alongside what follows.
            let (recorder, reference) = (recorder.clone(), ms.object_ref(&()));
            let note = format!(
                "updated ConfigMap {ns}/{}, Deployment {ns}/{name}",
                c.config.name_any()
            );
            events_published.spawn(async move {
                let event = KubeEvent {
                    type_: EventType::Normal,
                    reason: "Updated".into(),
                    note: Some(note),
                    action: "Apply".into(),
                    secondary: None,
                };
                recorder.publish(&event, &reference).await
            });
        }
        loop {
            let next =
                tokio::time::timeout_at((t0 + Duration::from_secs(60)).into(), events.try_next());
            let Ok(event) = next.await else {
                bail!("edit {e}: the Deployment {name} did not change within 60 s");
            };
            match event? {
                Some(Event::Apply(d) | Event::InitApply(d)) if checksum(&d) != before => break,
                Some(_) => {}
                None => bail!("edit {e}: the watch of the Deployment {name} ended"),
            }
        }
        hist.record((t0.elapsed().as_micros() as u64).max(1))?;
    }
    while let Some(published) = events_published.join_next().await {
        published?.context("publishing an edit's Event")?;
    }
    Ok(hist)
}

/// The lower bound: MicroServices applied as in the operator's run, then
/// for each, as soon as it exists, its rendered children and a status, by
/// server-side apply at the operator's concurrency. Returns the requests made.
async fn write_directly(client: &Client, opts: &OperatorBench) -> Result<u64> {
    let api = Api::<MicroService>::namespaced(client.clone(), DIRECT_NS);
    let cfg = RenderConfig::default();
    let writes = stream::iter(0..opts.count)
        .map(|i| {
            let api = api.clone();
            async move {
                api.patch(
                    &ms_name(i),
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&microservice(i)),
                )
                .await
                .with_context(|| format!("applying MicroService {}", ms_name(i)))
            }
        })
        .buffer_unordered(opts.apply_concurrency)
        .map(|ms| {
            let (client, cfg) = (client.clone(), cfg.clone());
            async move { write_children(&client, ms?, &cfg).await }
        })
        .buffer_unordered(opts.concurrency)
        .try_collect::<Vec<u64>>()
        .await?;
    Ok(writes.iter().sum::<u64>() + opts.count as u64)
}

async fn write_children(client: &Client, ms: MicroService, cfg: &RenderConfig) -> Result<u64> {
    // The bench's MicroServices list no Secrets.
    let c = render::render(&ms, cfg, &render::SecretVersions::new())?;
    let mut n = 0;
    n += apply(client, &c.config).await?;
    n += apply(client, &c.policy).await?;
    n += apply(client, &c.service_account).await?;
    n += apply(client, &c.role).await?;
    n += apply(client, &c.role_binding).await?;
    n += apply(client, &c.deployment).await?;
    n += apply(client, &c.service).await?;
    if let Some(pdb) = &c.pdb {
        n += apply(client, pdb).await?;
    }
    if let Some(hpa) = &c.hpa {
        n += apply(client, hpa).await?;
    }
    let status = json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "status": {"observedGeneration": ms.metadata.generation, "replicas": 0, "readyReplicas": 0},
    });
    Api::<MicroService>::namespaced(client.clone(), DIRECT_NS)
        .patch_status(
            &ms.name_any(),
            &PatchParams::apply(render::FIELD_MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await?;
    Ok(n + 1)
}

async fn apply<K>(client: &Client, obj: &K) -> Result<u64>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), DIRECT_NS)
        .patch(
            &obj.name_any(),
            &PatchParams::apply(render::FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .with_context(|| format!("applying {} {}", K::kind(&()), obj.name_any()))?;
    Ok(1)
}

// ---- the counting proxy ------------------------------------------------------

/// API requests by verb and resource (`PATCH deployments`, `POST events`,
/// `PATCH microservices/status`, `WATCH configmaps`), which says what the
/// writes were; the verb is the HTTP method, or WATCH for `?watch=true`.
#[derive(Clone, Default)]
struct Counter(Arc<Mutex<BTreeMap<String, u64>>>);

impl Counter {
    fn count(&self, verb: &str, path: &str) {
        let key = format!("{verb} {}", resource_of(path));
        *self.0.lock().unwrap().entry(key).or_default() += 1;
    }
    fn reset(&self) {
        self.0.lock().unwrap().clear();
    }
    /// The counts by verb and by verb and resource, reset.
    fn take(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let by_resource = std::mem::take(&mut *self.0.lock().unwrap());
        let mut by_verb = BTreeMap::new();
        for (key, n) in &by_resource {
            let verb = key.split(' ').next().unwrap_or_default();
            *by_verb.entry(verb.to_owned()).or_default() += n;
        }
        (by_verb, by_resource)
    }
    /// Requests of one verb so far.
    fn get(&self, verb: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(key, _)| key.split(' ').next() == Some(verb))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The resource (and subresource) an API path names:
/// `/apis/apps/v1/namespaces/x/deployments/y` → `deployments`,
/// `/apis/trellis.dev/v1alpha1/namespaces/x/microservices/y/status` → `microservices/status`.
fn resource_of(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // Skip `api/v1` or `apis/<group>/<version>`, then `namespaces/<ns>`.
    let mut rest = match parts.first() {
        Some(&"api") => parts.get(2..),
        Some(&"apis") => parts.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        rest = &rest[2..];
    }
    match rest {
        [resource] | [resource, _] => (*resource).to_owned(),
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
        [] => path.to_owned(),
    }
}

/// Plain HTTP on loopback in, the apiserver with the admin credentials out.
async fn start_proxy(client: Client, counter: Counter) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // A response's head and its body (streamed from the apiserver)
            // are two writes; with Nagle's algorithm the body would wait
            // for the client's delayed ACK of the head, up to 40 ms a
            // request, a delay the operator's own connection to the
            // apiserver does not have.
            let _ = stream.set_nodelay(true);
            let (client, counter) = (client.clone(), counter.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (client, counter) = (client.clone(), counter.clone());
                    async move { Ok::<_, Infallible>(forward(&client, &counter, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn forward(
    client: &Client,
    counter: &Counter,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<kube::client::Body> {
    let (mut parts, body) = req.into_parts();
    let watch = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    counter.count(
        if watch {
            "WATCH"
        } else {
            parts.method.as_str()
        },
        parts.uri.path(),
    );
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(format!("reading the request: {e}")),
    };
    parts.headers.remove(http::header::HOST);
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = pq.as_str().parse().unwrap_or_default();
    }
    match client
        .send(http::Request::from_parts(
            parts,
            kube::client::Body::from(body),
        ))
        .await
    {
        Ok(r) => r,
        Err(e) => error_response(format!("the apiserver: {e}")),
    }
}

fn error_response(why: String) -> http::Response<kube::client::Body> {
    let mut r = http::Response::new(kube::client::Body::from(why.into_bytes()));
    *r.status_mut() = http::StatusCode::BAD_GATEWAY;
    r
}

/// Waits until the operator has started its watches through the proxy.
async fn wait_watching(counter: &Counter, procs: &mut Procs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    // One watch per kind: MicroServices and the six kinds of children it owns.
    while counter.get("WATCH") < 7 {
        if let Some(status) = procs.exited("operator") {
            bail!("the operator exited ({status}); see target/bench/operator-bench.log");
        }
        if Instant::now() > deadline {
            bail!("the operator did not start watching within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// The Markdown table of a report.
fn markdown(r: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(out, "Date: {}; commit `{}`", s(&r["date"]), s(&r["commit"]));
    let _ = writeln!(out, "Machine: {}", s(&r["machine"]));
    let _ = writeln!(
        out,
        "Load average (1/5/15 min) before: {}, after: {}",
        s(&r["loadavg_before"]),
        s(&r["loadavg_after"])
    );
    let _ = writeln!(
        out,
        "Versions: {}; kube-apiserver {}\n",
        s(&r["versions"]["trellis-operator"]),
        s(&r["versions"]["kube-apiserver"])
    );
    let st = &r["settings"];
    let _ = writeln!(out, "| measure | value | target |");
    let _ = writeln!(out, "|---|---:|---:|");
    let _ = writeln!(
        out,
        "| {} MicroServices applied at once ({} clients): all converged | {:.1} s (applying took {:.1} s) | |",
        st["count"],
        st["apply_concurrency"],
        f(&r["converge"]["seconds"]),
        f(&r["converge"]["apply_seconds"])
    );
    let _ = writeln!(
        out,
        "| lower bound: the same objects by server-side apply, {} writers | {:.1} s | |",
        st["concurrency"],
        f(&r["lower_bound"]["seconds"])
    );
    let _ = writeln!(
        out,
        "| ratio operator ÷ lower bound | {:.2} | ≤ 1.5 |",
        f(&r["ratio"])
    );
    let _ = writeln!(
        out,
        "| operator RSS: idle before / converged / peak | {} / {} / {} MiB | ≤ 64 MiB peak |",
        mib(u(&r["rss_kib"]["idle_empty"])),
        mib(u(&r["rss_kib"]["converged"])),
        mib(u(&r["rss_kib"]["peak"]))
    );
    let _ = writeln!(
        out,
        "| operator RSS per MicroService: (peak − idle) ÷ count | {:.1} KiB | |",
        u(&r["rss_per_microservice_bytes"]) as f64 / 1024.0
    );
    let labels = CPU_OF.map(|(_, label)| label);
    let cpu = |v: &serde_json::Value| {
        labels
            .iter()
            .map(|l| format!("{:.1}", f(&v[*l])))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let _ = writeln!(
        out,
        "| CPU s while converging: {} | {} | |",
        labels.join(" / "),
        cpu(&r["converge"]["cpu_seconds"])
    );
    let _ = writeln!(
        out,
        "| CPU s of the lower bound's writes: the same | {} | |",
        cpu(&r["lower_bound"]["cpu_seconds"])
    );
    let kinds = &r["rss_kib"]["converged_by_kind"];
    let _ = writeln!(
        out,
        "| operator RSS converged: heap and stacks (anonymous) / file pages (code) | {} / {} MiB ({} threads) | |",
        mib(u(&kinds["Anonymous"])),
        mib(u(&kinds["Rss"]).saturating_sub(u(&kinds["Anonymous"]))),
        u(&r["threads"])
    );
    let verbs = |m: &serde_json::Value| {
        m.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let _ = writeln!(
        out,
        "| operator API requests per MicroService while converging (watches excluded) | {:.2} ({:.2} writes; {}) | |",
        f(&r["converge"]["requests_per_resource"]),
        f(&r["converge"]["writes_per_resource"]),
        verbs(&r["converge"]["requests_by_verb"])
    );
    let _ = writeln!(
        out,
        "| from applied to all Ready ({:.1} s): status writes / Events per MicroService | {:.2} / {:.2} | |",
        f(&r["to_ready"]["seconds"]),
        u(&r["to_ready"]["status_writes"]) as f64 / u(&st["count"]).max(1) as f64,
        u(&r["to_ready"]["events"]) as f64 / u(&st["count"]).max(1) as f64
    );
    let _ = writeln!(
        out,
        "| lower bound's API requests per MicroService | {:.2} | |",
        f(&r["lower_bound"]["requests_per_resource"])
    );
    let p50_p99_max = |v: &serde_json::Value| {
        format!(
            "{} / {} / {}",
            ms(f(&v["p50"])),
            ms(f(&v["p99"])),
            ms(f(&v["max"]))
        )
    };
    let _ = writeln!(
        out,
        "| spec edit → Deployment updated, p50 / p99 / max over {} edits | {} ms | |",
        r["edit_latency_ms"]["count"],
        p50_p99_max(&r["edit_latency_ms"])
    );
    let _ = writeln!(
        out,
        "| the operator's API requests during the edits | {} | |",
        verbs(&r["edit_latency_ms"]["operator_requests_by_resource"])
    );
    let _ = writeln!(
        out,
        "| the edits' lower bound (the bench makes the edit and the operator's writes for it: ConfigMap, Deployment, Event), p50 / p99 / max | {} ms | |",
        p50_p99_max(&r["edit_lower_bound_ms"])
    );
    let _ = writeln!(
        out,
        "| the same, the bench's writes through the counting proxy the operator's requests take, p50 / p99 / max | {} ms | |",
        p50_p99_max(&r["edit_lower_bound_via_proxy_ms"])
    );
    let _ = writeln!(
        out,
        "| API writes in {} s idle with all converged and Ready | {} (all requests: {}) | 0 |",
        r["idle"]["seconds"],
        r["idle"]["writes"],
        verbs(&r["idle"]["requests_by_resource"])
    );
    out
}

/// A process's resident memory by kind (`/proc/<pid>/smaps_rollup`, KiB):
/// `Rss`, `Anonymous` (heap, stacks, malloc arenas) and the rest.
fn rss_by_kind(pid: u32) -> serde_json::Value {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kinds: serde_json::Map<String, serde_json::Value> = text
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some((key.to_owned(), kib.into()))
        })
        .collect();
    kinds.into()
}

#[cfg(test)]
mod tests {
    use super::{
        BTreeMap, Counter, Histogram, json, latency_ms, markdown, resource_of,
        status_writes_and_events,
    };

    #[test]
    fn status_writes_and_events_add_up_over_the_periods() {
        let period = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let converging = period(&[
            ("PATCH microservices/status", 1000),
            ("POST events", 1000),
            ("PATCH deployments", 1000),
        ]);
        let settling = period(&[
            ("PATCH microservices/status", 600),
            ("POST events", 550),
            ("PATCH events", 50),
            ("GET namespaces", 1),
        ]);
        assert_eq!(
            status_writes_and_events(&[&converging, &settling]),
            (1600, 1600)
        );
    }

    #[test]
    fn the_report_gives_the_edits_beside_their_lower_bound() {
        let mut operator = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        let mut direct = operator.clone();
        let mut proxied = operator.clone();
        for us in [20_000, 30_000, 110_000] {
            operator.record(us).unwrap();
            direct.record(us / 2).unwrap();
            proxied.record(us / 3 * 2).unwrap();
        }
        let mut edits = latency_ms(&operator);
        edits["operator_requests_by_resource"] = json!({"PATCH deployments": 3});
        let md = markdown(&json!({
            "edit_latency_ms": edits,
            "edit_lower_bound_ms": latency_ms(&direct),
            "edit_lower_bound_via_proxy_ms": latency_ms(&proxied),
        }));
        let row = |h: &Histogram<u64>| {
            let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
            format!(
                "{} / {} / {} ms",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.max())
            )
        };
        assert!(
            md.contains(&format!("over 3 edits | {} |", row(&operator))),
            "{md}"
        );
        assert!(
            md.contains(&format!("Event), p50 / p99 / max | {} |", row(&direct))),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "proxy the operator's requests take, p50 / p99 / max | {} |",
                row(&proxied)
            )),
            "{md}"
        );
        assert_ne!(row(&operator), row(&direct));
        assert_ne!(row(&proxied), row(&direct));
        assert!(
            md.contains("during the edits | PATCH deployments 3 |"),
            "{md}"
        );
    }

    #[test]
    fn counts_by_resource_and_derives_the_verbs() {
        let c = Counter::default();
        c.count("PATCH", "/apis/apps/v1/namespaces/x/deployments/web");
        c.count(
            "PATCH",
            "/apis/trellis.dev/v1alpha1/namespaces/x/microservices/web/status",
        );
        c.count("WATCH", "/api/v1/namespaces/x/configmaps");
        assert_eq!(c.get("PATCH"), 2);
        assert_eq!(c.get("WATCH"), 1);
        let (by_verb, by_resource) = c.take();
        assert_eq!(by_verb["PATCH"], 2);
        assert_eq!(by_resource["PATCH microservices/status"], 1);
        assert_eq!(c.get("PATCH"), 0);
    }

    #[test]
    fn names_the_resource_of_an_api_path() {
        for (path, want) in [
            ("/api/v1/namespaces/x/events", "events"),
            ("/apis/events.k8s.io/v1/namespaces/x/events/e1", "events"),
            ("/apis/apps/v1/namespaces/x/deployments/web", "deployments"),
            (
                "/apis/trellis.dev/v1alpha1/namespaces/x/microservices/web/status",
                "microservices/status",
            ),
            ("/apis/coordination.k8s.io/v1/namespaces/x/leases", "leases"),
            ("/api/v1/namespaces", "namespaces"),
            ("/version", "/version"),
        ] {
            assert_eq!(resource_of(path), want, "{path}");
        }
    }
}
