//! The pinned Go tools: Kubernetes, etcd, CoreDNS, Helm and the OpenTelemetry
//! Collector, built from the Go module proxy. The cluster needs the first
//! four ([`Tools::ensure`]); only the tracing tests need the Collector
//! ([`collector`]), so the demo does not build it.
//!
//! Each tool has a Go module under `tools/` whose go.mod and go.sum pin it.
//! Binaries go to `~/.cache/trellis/bin/<tool>-<version>-<key>/`, where the key
//! hashes go.mod, go.sum, the Go version and the build flags: a tool is
//! rebuilt only when one of those changes, and a fresh clone reuses the cache.
//! The Gateway API conformance suite and its echo server (`gateway_api`) are
//! cached the same way, through [`cached`].

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{paths, run};

/// One Go module under tools/ and the binaries built from it.
struct Tool {
    /// The folder under tools/.
    dir: &'static str,
    /// The module whose required version names the cache entry.
    pinned: &'static str,
    /// (binary name, Go package) pairs.
    binaries: &'static [(&'static str, &'static str)],
}

const KUBERNETES: Tool = Tool {
    dir: "kubernetes",
    pinned: "k8s.io/kubernetes",
    binaries: &[
        ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
        (
            "kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
        ),
        ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
        ("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
        ("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
        ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
    ],
};

const ETCD: Tool = Tool {
    dir: "etcd",
    pinned: "go.etcd.io/etcd/server/v3",
    binaries: &[
        ("etcd", "go.etcd.io/etcd/server/v3"),
        ("etcdctl", "go.etcd.io/etcd/etcdctl/v3"),
    ],
};

const COREDNS: Tool = Tool {
    dir: "coredns",
    pinned: "github.com/coredns/coredns",
    binaries: &[("coredns", "github.com/coredns/coredns")],
};

const HELM: Tool = Tool {
    dir: "helm",
    pinned: "helm.sh/helm/v3",
    binaries: &[("helm", "helm.sh/helm/v3/cmd/helm")],
};

/// The OpenTelemetry Collector: the pinned builder (ocb) in tools/otelcol/go.mod
/// generates and compiles a distribution with the components builder-config.yaml pins.
const OTELCOL: Tool = Tool {
    dir: "otelcol",
    pinned: "go.opentelemetry.io/collector/cmd/builder",
    binaries: &[("otelcol", "")],
};

/// Paths of every built tool binary.
#[derive(Clone, Debug)]
pub struct Tools {
    kubernetes: PathBuf,
    etcd: PathBuf,
    coredns: PathBuf,
    helm: PathBuf,
    /// The Kubernetes release the cluster runs, e.g. `v1.34.4`.
    pub kubernetes_version: String,
}

impl Tools {
    /// Builds whatever the cluster needs and is missing from the cache,
    /// showing progress, and returns the paths.
    pub fn ensure() -> Result<Self> {
        let kubernetes_version = pinned_version(&KUBERNETES)?;
        let tools = Self {
            kubernetes: ensure_tool(&KUBERNETES)?,
            etcd: ensure_tool(&ETCD)?,
            coredns: ensure_tool(&COREDNS)?,
            helm: ensure_tool(&HELM)?,
            kubernetes_version,
        };
        Ok(tools)
    }

    /// The path of a Kubernetes binary (`kube-apiserver`, `kubectl`, ...).
    pub fn kube(&self, name: &str) -> PathBuf {
        self.kubernetes.join(name)
    }

    /// The etcd server.
    pub fn etcd(&self) -> PathBuf {
        self.etcd.join("etcd")
    }

    /// CoreDNS.
    pub fn coredns(&self) -> PathBuf {
        self.coredns.join("coredns")
    }

    /// Helm.
    pub fn helm(&self) -> PathBuf {
        self.helm.join("helm")
    }

    /// Prints where each tool is, for people who want them on their PATH.
    pub fn print(&self) {
        println!(
            "kubernetes {}: {}",
            self.kubernetes_version,
            self.kubernetes.display()
        );
        println!("etcd:       {}", self.etcd().display());
        println!("coredns:    {}", self.coredns().display());
        println!("helm:       {}", self.helm().display());
    }

    /// A `kubectl` command against the local cluster.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.kube("kubectl"));
        cmd.arg("--kubeconfig").arg(paths::admin_kubeconfig());
        cmd
    }
}

/// The OpenTelemetry Collector (OTLP receiver, file exporter) the tracing
/// tests run, built into the cache if missing; returns the binary's path.
pub fn collector() -> Result<PathBuf> {
    Ok(ensure_tool(&OTELCOL)?.join("otelcol"))
}

/// The version of the pinned module, read from the tool's go.mod.
fn pinned_version(tool: &Tool) -> Result<String> {
    let go_mod = tools_dir().join(tool.dir).join("go.mod");
    let text =
        fs::read_to_string(&go_mod).with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .map(str::trim)
        .map(|l| l.trim_start_matches("require").trim())
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(tool.pinned))
                .then(|| words.next().map(str::to_owned))
                .flatten()
        })
        .with_context(|| format!("{} does not require {}", go_mod.display(), tool.pinned))
}

/// The Go modules that pin the tools: `tools/` in the workspace.
pub fn tools_dir() -> PathBuf {
    paths::workspace().join("tools")
}

/// The linker flags: strip symbols and, for Kubernetes, stamp the release into the binaries
/// the way the release build does, so `kubectl version` and the Node's kubeletVersion are right.
fn ldflags(tool: &Tool, version: &str) -> String {
    let mut flags = String::from("-s -w");
    if tool.pinned == KUBERNETES.pinned {
        let v = version.trim_start_matches('v');
        let mut parts = v.split('.');
        let (major, minor) = (parts.next().unwrap_or("1"), parts.next().unwrap_or("0"));
        for pkg in [
            "k8s.io/component-base/version",
            "k8s.io/client-go/pkg/version",
        ] {
            flags.push_str(&format!(
                " -X {pkg}.gitVersion={version} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
            ));
        }
    }
    flags
}

/// `go version`, which is part of every cache key.
pub fn go_version() -> Result<String> {
    run::output(
        Command::new("go")
            .arg("version")
            .env("GOTOOLCHAIN", "local"),
    )
    .context(
        "Go is needed to build the pinned tools: install it (the CI script does) and try again",
    )
}

/// Returns the cache folder holding the tool's binaries, building them if needed.
fn ensure_tool(tool: &Tool) -> Result<PathBuf> {
    let version = pinned_version(tool)?;
    let module = tools_dir().join(tool.dir);
    let flags = ldflags(tool, &version);
    let mut inputs = module_inputs(&module)?;
    inputs.push(flags.clone().into_bytes());
    cached(tool.dir, &version, &inputs, |partial| {
        eprintln!(
            "==> building {} {version} ({} binaries) from the Go module proxy",
            tool.dir,
            tool.binaries.len(),
        );
        eprintln!("    the first build takes a while; later runs reuse the cache");
        let started = Instant::now();
        if tool.pinned == OTELCOL.pinned {
            build_collector(&module, partial, &flags)?;
            eprintln!("    [1/1] otelcol built ({:.0?})", started.elapsed());
        }
        for (i, (name, package)) in tool
            .binaries
            .iter()
            .filter(|(_, package)| !package.is_empty())
            .enumerate()
        {
            go_build(&module, package, &partial.join(name), &flags, &[]).with_context(|| {
                format!("building {name} from tools/{}: check the Go proxy is reachable and tools/{}/go.sum is current (`go mod tidy` there)", tool.dir, tool.dir)
            })?;
            eprintln!(
                "    [{}/{}] {name} built ({:.0?} so far)",
                i + 1,
                tool.binaries.len(),
                started.elapsed()
            );
        }
        Ok(())
    })
}

/// What names a build of the Go module in `module` (a folder under tools/):
/// its go.mod, its go.sum, its builder-config.yaml if any, and the Go version.
/// Callers add their build flags.
pub fn module_inputs(module: &Path) -> Result<Vec<Vec<u8>>> {
    let mut inputs = Vec::new();
    for file in ["go.mod", "go.sum", "builder-config.yaml"] {
        match fs::read(module.join(file)) {
            Ok(bytes) => inputs.push(bytes),
            Err(_) if file == "builder-config.yaml" => {}
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", module.join(file).display()));
            }
        }
    }
    inputs.push(go_version()?.into_bytes());
    Ok(inputs)
}

/// The cache entry `~/.cache/trellis/bin/<name>-<version>-<key>/`, where the
/// key hashes `inputs` (in order): when it is not complete, `build` fills a
/// partial folder, which then takes the entry's name. An interrupted build
/// leaves only the partial folder, removed by the next attempt.
pub fn cached(
    name: &str,
    version: &str,
    inputs: &[Vec<u8>],
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let mut key = Sha256::new();
    for input in inputs {
        key.update(input);
    }
    let key = hex::encode(key.finalize());
    let dest = paths::cache_dir()
        .join("bin")
        .join(format!("{name}-{version}-{}", &key[..12]));
    let marker = dest.join(".complete");
    if marker.exists() {
        return Ok(dest);
    }
    let partial = dest.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    build(&partial)?;
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&partial, &dest)?;
    fs::write(&marker, format!("{version}\n"))?;
    eprintln!("    cached in {}", dest.display());
    Ok(dest)
}

/// `go build -v` in `module` with `env` added, printing a progress line every
/// 100 packages compiled.
pub fn go_build(
    module: &Path,
    package: &str,
    out: &Path,
    ldflags: &str,
    env: &[(&str, &str)],
) -> Result<()> {
    let mut child = Command::new("go")
        .current_dir(module)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly")
        .envs(env.iter().copied())
        .args(["build", "-v", "-ldflags", ldflags, "-o"])
        .arg(out)
        .arg(package)
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start `go build`")?;
    let stderr = child.stderr.take().expect("piped");
    let mut compiled = 0usize;
    let mut tail = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        compiled += 1;
        if compiled.is_multiple_of(100) {
            eprintln!("      {package}: {compiled} packages compiled or checked");
        }
        tail.push(line);
        if tail.len() > 40 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("go build {package} failed ({status}):\n{}", tail.join("\n"));
    }
    Ok(())
}

/// Runs the pinned collector builder on builder-config.yaml with the output
/// folder moved under `partial`, then keeps only the binary.
fn build_collector(module: &Path, partial: &Path, ldflags: &str) -> Result<()> {
    let sources = partial.join("src");
    let config = fs::read_to_string(module.join("builder-config.yaml"))
        .context("reading tools/otelcol/builder-config.yaml")?;
    let config = config.replace(
        "output_path: ./out",
        &format!("output_path: {}", sources.display()),
    );
    let config_path = partial.join("builder-config.yaml");
    fs::write(&config_path, config)?;
    eprintln!("    generating and compiling the collector (about two minutes on two cores)");
    let out = Command::new("go")
        .current_dir(module)
        .env("GOTOOLCHAIN", "local")
        .env_remove("GOFLAGS")
        .args(["tool", "builder", "--config"])
        .arg(&config_path)
        .arg(format!("--ldflags={ldflags}"))
        .output()
        .context("could not start `go tool builder`")?;
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<_> = log.lines().rev().take(30).collect();
        bail!(
            "the collector builder failed ({}): check the Go proxy is reachable and tools/otelcol/builder-config.yaml names released versions\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    fs::rename(sources.join("otelcol"), partial.join("otelcol"))?;
    fs::remove_dir_all(&sources)?;
    fs::remove_file(&config_path)?;
    Ok(())
}
