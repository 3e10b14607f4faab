//! The Gateway API release Trellis implements, pinned by tools/gateway-api/go.mod:
//! its standard-channel CRDs ([`crds`]), the backends its conformance suite
//! deploys ([`backends`]) and the suite itself ([`conformance`]).
//!
//! Everything comes from the Go module proxy, the same way as Kubernetes: the
//! CRDs are in the `sigs.k8s.io/gateway-api` module (config/crd/standard), the
//! suite and the echo server's source in `sigs.k8s.io/gateway-api/conformance`.
//! Nothing is pulled from an image registry.

pub mod backends;
pub mod conformance;
pub mod crds;

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{run, tools};

/// The API module, which holds the CRDs.
const API_MODULE: &str = "sigs.k8s.io/gateway-api";
/// The conformance module: the suite, its manifests and the echo server.
const CONFORMANCE_MODULE: &str = "sigs.k8s.io/gateway-api/conformance";

/// The pinned release, with where its modules are in the Go module cache.
#[derive(Clone, Debug)]
pub struct Release {
    /// The release, e.g. `v1.6.3`: the API module's version in the build list.
    pub version: String,
    /// The API module's folder (read-only, in the module cache).
    pub api_dir: PathBuf,
    /// The conformance module's folder (read-only, in the module cache).
    pub conformance_dir: PathBuf,
}

impl Release {
    /// Resolves the pinned modules, downloading them into the module cache if
    /// missing (`go mod download`, checked against tools/gateway-api/go.sum).
    pub fn resolve() -> Result<Self> {
        let (version, api_dir) = download(API_MODULE)?;
        let (conformance_version, conformance_dir) = download(CONFORMANCE_MODULE)?;
        // The suite refuses CRDs of another release than its own, so a go.mod
        // that pins the two modules apart is a mistake worth naming here.
        if conformance_version != version {
            bail!(
                "tools/gateway-api pins {API_MODULE} {version} but {CONFORMANCE_MODULE} {conformance_version}: pin both to one release"
            );
        }
        Ok(Self {
            version,
            api_dir,
            conformance_dir,
        })
    }
}

/// tools/gateway-api: the Go module that pins the release.
pub fn tools_module() -> PathBuf {
    tools::tools_dir().join("gateway-api")
}

/// A `go` command in tools/gateway-api, with the local toolchain and go.sum read-only.
fn go() -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(tools_module())
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly");
    cmd
}

/// `go mod download -json <module>`: the version tools/gateway-api selects and its folder.
fn download(module: &str) -> Result<(String, PathBuf)> {
    let out = run::output(go().args(["mod", "download", "-json", module])).with_context(|| {
        format!("downloading {module}: check the Go proxy is reachable and tools/gateway-api/go.sum is current")
    })?;
    let info: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("reading `go mod download` of {module}"))?;
    let field = |name: &str| {
        info[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("`go mod download -json {module}` gave no {name}: {out}"))
    };
    Ok((field("Version")?, PathBuf::from(field("Dir")?)))
}
