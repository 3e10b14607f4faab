//! A real single-node Kubernetes cluster built from source, the way Kubernetes'
//! own `hack/local-up-cluster.sh` runs one: every component a host process.
//!
//! Two modes:
//! - [`Mode::ControlPlane`]: etcd, kube-apiserver and kube-controller-manager
//!   (garbage collector and namespace controller included): our envtest, up in seconds;
//! - [`Mode::Node`]: the whole node: also kube-scheduler, containerd, kubelet,
//!   kube-proxy (iptables) and CoreDNS.
//!
//! `up` is idempotent and can grow a control plane into a node; `down` stops
//! everything and removes everything the cluster added to the host.

mod config;
mod dns;
pub mod network;
mod pki;
pub mod process;

use std::{fs, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{gateway_api, images, paths, run, tools::Tools};
use config::{API_PORT, NODE_NAME};
use network::NODE_IP;

/// Which components to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// etcd, kube-apiserver, kube-controller-manager.
    ControlPlane,
    /// The control plane plus scheduler, containerd, kubelet, kube-proxy and CoreDNS.
    Node,
}

const CONTROL_PLANE: &[&str] = &["etcd", "kube-apiserver", "kube-controller-manager"];
const NODE: &[&str] = &[
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
    "coredns",
];

fn components(mode: Mode) -> Vec<&'static str> {
    match mode {
        Mode::ControlPlane => CONTROL_PLANE.to_vec(),
        Mode::Node => CONTROL_PLANE.iter().chain(NODE).copied().collect(),
    }
}

/// Which mode runs now, if any: every component of it is alive.
pub fn running_mode() -> Option<Mode> {
    let all = |mode| {
        components(mode)
            .iter()
            .all(|c| process::running(c).is_some())
    };
    if all(Mode::Node) {
        Some(Mode::Node)
    } else if all(Mode::ControlPlane) {
        Some(Mode::ControlPlane)
    } else {
        None
    }
}

/// Starts the cluster in `mode`; a running cluster is left as it is.
pub fn up(mode: Mode) -> Result<()> {
    preflight(mode)?;
    match running_mode() {
        Some(Mode::Node) => {
            eprintln!("==> the local cluster is already running (full node)");
            gateway_api::crds::ensure(&Tools::ensure()?)?;
            return ready_message();
        }
        Some(Mode::ControlPlane) if mode == Mode::ControlPlane => {
            eprintln!("==> the local cluster's control plane is already running");
            gateway_api::crds::ensure(&Tools::ensure()?)?;
            return ready_message();
        }
        _ => {}
    }
    let nothing_runs = components(Mode::Node)
        .iter()
        .all(|c| process::running(c).is_none());
    if nothing_runs && (paths::state_dir().exists() || paths::run_dir().exists()) {
        // A cluster whose processes died (a reboot, a killed session) left state,
        // mounts and rules behind; starting over them would mix old and new.
        eprintln!("==> a stopped cluster left state behind; cleaning it up first");
        down()?;
    }
    let tools = Tools::ensure()?;
    let state = paths::state_dir();
    fs::create_dir_all(&state)?;
    fs::create_dir_all(paths::log_dir())?;
    eprintln!(
        "==> starting the local cluster ({mode:?}, Kubernetes {}) in {}",
        tools.kubernetes_version,
        state.display()
    );

    let pki = state.join("pki");
    let serving_names: Vec<String> = [
        NODE_IP,
        "127.0.0.1",
        "10.96.0.1",
        "localhost",
        NODE_NAME,
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .map(String::from)
    .to_vec();
    pki::ensure(&pki, &serving_names)?;
    let server = format!("https://127.0.0.1:{API_PORT}");
    for id in pki::CLIENTS {
        let path = state.join(format!("{}.kubeconfig", id.file));
        write_if_changed(&path, config::kubeconfig(&pki, id.file, &server))?;
    }
    network::up(&state)?;

    start_control_plane(&tools, &state)?;
    // The Gateway API's CRDs are part of the cluster Trellis runs on, as in
    // a real installation (README, "Gateway API"): the operator watches them.
    gateway_api::crds::ensure(&tools)?;
    if mode == Mode::Node {
        start_node(&tools, &state)?;
    }
    ready_message()
}

fn ready_message() -> Result<()> {
    eprintln!(
        "==> ready. export KUBECONFIG={}",
        paths::admin_kubeconfig().display()
    );
    eprintln!(
        "    logs: {}   stop: cargo xtask cluster down",
        paths::log_dir().display()
    );
    Ok(())
}

/// Refuses early, with what to do, when the machine lacks what the mode needs.
fn preflight(mode: Mode) -> Result<()> {
    let uid = run::output(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        bail!(
            "the local cluster needs root (it creates a bridge, routes and iptables rules); run as root"
        );
    }
    let mut needed = vec!["go", "ip", "iptables"];
    if mode == Mode::Node {
        needed.extend(["containerd", "ctr", "runc", "conntrack"]);
    }
    let missing: Vec<_> = needed
        .into_iter()
        .filter(|c| !run::quietly(Command::new("sh").arg("-c").arg(format!("command -v {c}"))))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing commands: {}. Install them with `bash .ci/install` (Debian: containerd runc containernetworking-plugins iptables conntrack; Go from the toolchain)",
            missing.join(", ")
        );
    }
    if mode == Mode::Node && !Path::new("/usr/lib/cni/bridge").exists() {
        bail!(
            "the CNI plugins are missing from /usr/lib/cni: apt-get install containernetworking-plugins"
        );
    }
    Ok(())
}

fn start_control_plane(tools: &Tools, state: &Path) -> Result<()> {
    let pki = state.join("pki");
    let p = |f: &str| pki.join(f).display().to_string();

    process::start(
        "etcd",
        Command::new(tools.etcd())
            .arg("--name=trellis")
            .arg(format!("--data-dir={}", state.join("etcd").display()))
            .args([
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=trellis=http://127.0.0.1:2380",
                "--log-level=warn",
            ]),
    )?;
    process::wait_for("etcd", "etcd", Duration::from_secs(30), || {
        http_get("127.0.0.1:2379", "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
    })?;

    process::start(
        "kube-apiserver",
        Command::new(tools.kube("kube-apiserver")).args([
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={API_PORT}"),
            format!("--advertise-address={NODE_IP}"),
            format!("--service-cluster-ip-range={}", network::SERVICE_CIDR),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction,PodSecurity".into(),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--tls-cert-file={}", p("serving.crt")),
            format!("--tls-private-key-file={}", p("serving.key")),
            format!(
                "--kubelet-client-certificate={}",
                p("apiserver-kubelet-client.crt")
            ),
            format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            format!("--kubelet-certificate-authority={}", p("ca.crt")),
            // Reach the kubelet by its address, not by resolving the node's name on the host.
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--profiling=false".into(),
            "--v=1".into(),
        ]),
    )?;
    let kubectl = || tools.kubectl();
    process::wait_for(
        "kube-apiserver",
        "kube-apiserver",
        Duration::from_secs(90),
        || run::output(kubectl().args(["get", "--raw", "/readyz"])).is_ok_and(|s| s.trim() == "ok"),
    )?;

    process::start(
        "kube-controller-manager",
        Command::new(tools.kube("kube-controller-manager"))
            .args(kubeconfig_flags(
                &state.join("controller-manager.kubeconfig"),
            ))
            .args([
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                "--use-service-account-credentials=true".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--controllers=*".into(),
                "--v=1".into(),
            ]),
    )?;
    // The service-account controller makes `default` in every namespace: proof the
    // controllers run and can write.
    process::wait_for(
        "kube-controller-manager",
        "kube-controller-manager",
        Duration::from_secs(60),
        || run::quietly(kubectl().args(["-n", "default", "get", "serviceaccount", "default"])),
    )
}

/// The controller-manager and the scheduler use one identity for the API and for
/// checking who calls their own health and metrics endpoints.
fn kubeconfig_flags(kubeconfig: &Path) -> [String; 3] {
    [
        "kubeconfig",
        "authentication-kubeconfig",
        "authorization-kubeconfig",
    ]
    .map(|flag| format!("--{flag}={}", kubeconfig.display()))
}

fn start_node(tools: &Tools, state: &Path) -> Result<()> {
    process::start(
        "kube-scheduler",
        Command::new(tools.kube("kube-scheduler"))
            .args(kubeconfig_flags(&state.join("scheduler.kubeconfig")))
            .args(["--leader-elect=false", "--bind-address=127.0.0.1"]),
    )?;

    for dir in ["cni/net.d", "cni/ipam", "containerd", "kubelet"] {
        fs::create_dir_all(state.join(dir))?;
    }
    fs::create_dir_all(paths::run_dir().join("containerd"))?;
    write_if_changed(state.join("containerd.toml"), config::containerd(state))?;
    write_if_changed(
        state.join("cni/net.d/10-trellis.conflist"),
        config::cni(state),
    )?;
    process::start(
        "containerd",
        Command::new("containerd")
            .arg("--config")
            .arg(state.join("containerd.toml")),
    )?;
    process::wait_for("containerd", "containerd", Duration::from_secs(30), || {
        run::quietly(images::ctr().args(["version"]))
    })?;
    images::ensure_pause()?;

    write_if_changed(state.join("kubelet.yaml"), config::kubelet(state))?;
    write_if_changed(state.join("resolv.conf"), config::resolv_conf())?;
    process::start(
        "kubelet",
        Command::new(tools.kube("kubelet")).args([
            format!("--config={}", state.join("kubelet.yaml").display()),
            format!(
                "--kubeconfig={}",
                state.join("kubelet.kubeconfig").display()
            ),
            format!("--root-dir={}", state.join("kubelet").display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            "--v=1".into(),
        ]),
    )?;

    write_if_changed(state.join("kube-proxy.yaml"), config::kube_proxy(state))?;
    process::start(
        "kube-proxy",
        Command::new(tools.kube("kube-proxy")).arg(format!(
            "--config={}",
            state.join("kube-proxy.yaml").display()
        )),
    )?;

    let rbac = state.join("coredns-rbac.yaml");
    write_if_changed(&rbac, config::COREDNS_RBAC)?;
    run::output(tools.kubectl().args(["apply", "-f"]).arg(&rbac))?;
    write_if_changed(state.join("Corefile"), config::corefile(state))?;
    process::start(
        "coredns",
        Command::new(tools.coredns())
            .arg("-conf")
            .arg(state.join("Corefile")),
    )?;

    process::wait_for(
        "the node to be Ready",
        "kubelet",
        Duration::from_secs(120),
        || {
            run::output(tools.kubectl().args([
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]))
            .is_ok_and(|s| s.trim() == "True")
        },
    )?;
    process::wait_for("cluster DNS", "coredns", Duration::from_secs(60), || {
        dns::resolves(NODE_IP, "kubernetes.default.svc.cluster.local")
    })
}

/// Writes a component's configuration only when it differs from what is there:
/// kube-proxy exits when its configuration file is written while it runs, so
/// `up` on a partly running cluster (or `restart`) must leave unchanged files alone.
fn write_if_changed(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> Result<()> {
    let (path, contents) = (path.as_ref(), contents.as_ref());
    if fs::read(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Restarts one component of a running cluster: stops it (SIGTERM, then SIGKILL)
/// and starts it again through [`up`], with the same flags, waiting until it is
/// ready again. Fault-injection tests (tests/tests/control_plane_faults.rs) use
/// it to restart the apiserver under the operator.
pub fn restart(name: &str) -> Result<()> {
    let Some(mode) = running_mode() else {
        bail!("the local cluster is not running: cargo xtask cluster up");
    };
    if !components(mode).contains(&name) {
        bail!(
            "no component {name:?} in the running cluster; one of: {}",
            components(mode).join(", ")
        );
    }
    eprintln!("==> restarting {name}");
    process::stop(name, Duration::from_secs(10))?;
    up(mode)
}

/// Stops every component and removes everything the cluster added. Idempotent.
pub fn down() -> Result<()> {
    let state = paths::state_dir();
    // The shop's PostgreSQL listens on the bridge removed below.
    crate::postgres::down()?;
    eprintln!("==> stopping the local cluster");
    for name in ["coredns", "kube-proxy", "kubelet", "kube-scheduler"] {
        process::stop(name, Duration::from_secs(10))?;
    }
    if process::running("containerd").is_some() {
        images::kill_all_containers();
    }
    process::stop("containerd", Duration::from_secs(10))?;
    // Shims of a containerd that died on its own still hold their containers.
    for pid in process::pids_of("containerd-shim-runc-v2") {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&paths::run_dir().display().to_string()) {
            process::signal(pid, "KILL");
        }
    }
    for name in ["kube-controller-manager", "kube-apiserver", "etcd"] {
        process::stop(name, Duration::from_secs(10))?;
    }
    unmount_under(&[&state, &paths::run_dir(), Path::new("/run/netns")])?;
    network::down(&state)?;
    remove_cgroups();
    for dir in [&state, &paths::run_dir()] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    let left = leftovers();
    if !left.is_empty() {
        bail!("cluster down left these behind:\n  {}", left.join("\n  "));
    }
    eprintln!("==> stopped; nothing of the cluster is left on this machine");
    Ok(())
}

/// What of the cluster is still on the host: processes, chains, mounts, namespaces, routes, links.
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    for name in components(Mode::Node) {
        if let Some(pid) = process::running(name) {
            left.push(format!("process {name} (pid {pid})"));
        }
    }
    left.extend(network::leftover_chains().unwrap_or_default());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let state = paths::state_dir().display().to_string();
    let run_dir = paths::run_dir().display().to_string();
    for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(4)) {
        if m.starts_with(&state) || m.starts_with(&run_dir) || m.starts_with("/run/netns/cni-") {
            left.push(format!("mount {m}"));
        }
    }
    if run::quietly(Command::new("ip").args(["link", "show", network::BRIDGE])) {
        left.push(format!("link {}", network::BRIDGE));
    }
    if network::blackholes_in_place().unwrap_or(false) {
        left.push("blackhole routes".into());
    }
    left
}

/// Unmounts every mount point under the given folders, deepest first.
fn unmount_under(roots: &[&Path]) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| {
            roots.iter().any(|r| {
                Path::new(m).starts_with(r) && Path::new(m) != *r
                    || m.starts_with("/run/netns/cni-")
            })
        })
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    points.dedup();
    for point in points {
        if !run::quietly(Command::new("umount").arg(point)) {
            run::quietly(Command::new("umount").arg("-l").arg(point));
        }
    }
    Ok(())
}

/// Removes the kubelet's pod cgroups (`kubepods`) from every v1 hierarchy, deepest first.
fn remove_cgroups() {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let root = h.path().join("kubepods");
        if root.exists() {
            let mut dirs = Vec::new();
            collect_dirs(&root, &mut dirs);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = fs::remove_dir(d);
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Prints which components run.
pub fn status() -> Result<()> {
    for name in components(Mode::Node) {
        match process::running(name) {
            Some(pid) => println!("{name:<24} running (pid {pid})"),
            None => println!("{name:<24} stopped"),
        }
    }
    println!("kubeconfig: {}", paths::admin_kubeconfig().display());
    println!("logs:       {}", paths::log_dir().display());
    Ok(())
}

/// A plain HTTP GET on loopback; the body if the answer was 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let status_line = body.lines().next()?;
    status_line.contains(" 200 ").then_some(body)
}
