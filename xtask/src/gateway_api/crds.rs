//! The Gateway API's standard-channel CRDs, installed into the local cluster
//! by `cargo xtask cluster up` from the pinned module's config/crd/standard.
//!
//! Every file of that folder is applied, none skipped: the CRDs (GatewayClass,
//! Gateway, HTTPRoute, GRPCRoute, ReferenceGrant, BackendTLSPolicy,
//! ListenerSet, TCPRoute, TLSRoute, UDPRoute) and the ValidatingAdmissionPolicy
//! `safe-upgrades.gateway.networking.k8s.io` with its binding, which refuses
//! experimental-channel or pre-v1.5 Gateway API CRDs over these.
//! ValidatingAdmissionPolicy is `admissionregistration.k8s.io/v1` since
//! Kubernetes 1.30 and the local cluster runs a newer release, so it applies
//! as it is.
//!
//! Server-side apply under one field manager makes a second `up` a no-op and
//! an upgraded pin an in-place update. Helm users install the same files from
//! the release's standard-install.yaml (README, "Gateway API"); the chart does
//! not ship them.

use std::{fs, path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};

use super::Release;
use crate::{run, tools::Tools};

/// The field manager that owns what xtask applies.
const FIELD_MANAGER: &str = "trellis-xtask";

/// Applies the pinned release's standard-channel files and waits until every
/// CRD among them is Established.
pub fn ensure(tools: &Tools) -> Result<()> {
    let release = Release::resolve()?;
    let files = standard_files(&release)?;
    let started = Instant::now();
    let mut apply = tools.kubectl();
    apply.args([
        "apply",
        "--server-side",
        "--field-manager",
        FIELD_MANAGER,
        // The local cluster is xtask's: a field another manager set (a
        // client-side `kubectl apply` of the same files) is taken over, not a failure.
        "--force-conflicts",
    ]);
    for file in &files {
        apply.arg("-f").arg(file);
    }
    run::output(&mut apply).context("applying the Gateway API CRDs")?;

    // A CRD's API is served only once it is Established; the suite and the
    // operator list Gateways right away.
    let crds: Vec<_> = files
        .iter()
        .filter(|f| {
            fs::read_to_string(f).is_ok_and(|t| t.contains("kind: CustomResourceDefinition"))
        })
        .collect();
    let mut wait = tools.kubectl();
    wait.args(["wait", "--for=condition=Established", "--timeout=60s"]);
    for file in &crds {
        wait.arg("-f").arg(file);
    }
    run::output(&mut wait).context("waiting for the Gateway API CRDs to be Established")?;
    eprintln!(
        "==> Gateway API {} standard channel: {} CRDs Established, {} files applied ({:.1?})",
        release.version,
        crds.len(),
        files.len(),
        started.elapsed()
    );
    Ok(())
}

/// Every YAML file of config/crd/standard, in name order.
fn standard_files(release: &Release) -> Result<Vec<PathBuf>> {
    let dir = release.api_dir.join("config/crd/standard");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    if files.is_empty() {
        bail!("{} holds no YAML: is the module complete?", dir.display());
    }
    Ok(files)
}
