//! The images the conformance suite's manifests run, built here and imported
//! into the cluster's containerd under the names the manifests give them, so
//! that the kubelet finds them and pulls nothing (this project's machines
//! reach no image registry).
//!
//! - The echo server (`registry.k8s.io/gateway-api/echo-basic`): every backend
//!   of the HTTP and gRPC tests. Built from the pinned conformance module's
//!   `echo-basic` package as a static binary (`CGO_ENABLED=0`), cached like the
//!   other Go tools. One image, imported under every tag the manifests of
//!   base/ and tests/ name (v1.5.1 and v1.6.0-dev.3 in base/manifests.yaml,
//!   v1.6.0-dev.2 in the TCPRoute and UDPRoute tests), since the suite's
//!   release is the source of all of them. It runs as `nonroot` (65532): it
//!   listens on 3000 (HTTP; gRPC with `GRPC_ECHO_SERVER`, raw TCP with
//!   `TCP_ECHO_SERVER`), 3001 (h2c) and 8443 (TLS, when `TLS_SERVER_CERT` and
//!   `TLS_SERVER_PRIVKEY` name files), none privileged, and reads the mounted
//!   Secret files, which are world-readable by default. It needs `POD_NAME`
//!   and `NAMESPACE`, which the manifests set.
//! - CoreDNS (`registry.k8s.io/coredns/coredns`): base/manifests.yaml runs one
//!   in gateway-conformance-infra for the UDPRoute tests, and the suite's
//!   setup waits for every pod of that namespace to be Ready, whatever the
//!   profiles. It is the cluster's own CoreDNS binary (tools/coredns, a newer
//!   patch release than the tag names) under the manifest's name. It runs as
//!   root: it binds port 53, and the manifest drops every capability but
//!   NET_BIND_SERVICE, which only takes effect for root (containerd grants no
//!   ambient capabilities, and the image carries no file capabilities).
//!   Its upstream `forward` to 8.8.8.8 cannot reach out here; only the
//!   UDPRoute tests query it.
//!
//! The mesh profiles' `echo-advanced` image is not built: Trellis does not run
//! the MESH profiles of this suite.

use std::{collections::BTreeSet, fs, path::Path, path::PathBuf};

use anyhow::{Context, Result, bail};

use super::{Release, tools_module};
use crate::{
    images::{self, Archive},
    tools::{self, Tools},
};

/// The echo server's repository in the suite's manifests.
const ECHO_REPOSITORY: &str = "registry.k8s.io/gateway-api/echo-basic";
/// CoreDNS's repository in the suite's manifests.
const COREDNS_REPOSITORY: &str = "registry.k8s.io/coredns/coredns";
/// The echo server's Go package.
const ECHO_PACKAGE: &str = "sigs.k8s.io/gateway-api/conformance/echo-basic";
/// Root: see the module's documentation on CoreDNS.
const ROOT: &str = "0:0";

/// Builds what is missing and imports both images under every name the
/// suite's manifests use; names already pointing at the same image are left alone.
pub fn ensure(release: &Release, tools: &Tools) -> Result<()> {
    let manifests = manifest_texts(release)?;
    let echo_references = references(&manifests, ECHO_REPOSITORY);
    let coredns_references = references(&manifests, COREDNS_REPOSITORY);
    if echo_references.is_empty() {
        bail!(
            "no {ECHO_REPOSITORY} image in {}'s manifests: has the suite renamed its backend?",
            release.conformance_dir.display()
        );
    }

    let echo = echo_basic(release)?;
    import(&Archive {
        file_name: "gateway-api-echo-basic".into(),
        binary_name: "echo-basic",
        binary: &echo,
        user: images::NONROOT,
        references: echo_references,
    })?;
    if !coredns_references.is_empty() {
        import(&Archive {
            file_name: "gateway-api-coredns".into(),
            binary_name: "coredns",
            binary: &tools.coredns(),
            user: ROOT,
            references: coredns_references,
        })?;
    }
    Ok(())
}

/// The echo server's static binary, built into the cache if missing.
fn echo_basic(release: &Release) -> Result<PathBuf> {
    const LDFLAGS: &str = "-s -w";
    let module = tools_module();
    let mut inputs = tools::module_inputs(&module)?;
    inputs.push(format!("CGO_ENABLED=0 {LDFLAGS}").into_bytes());
    let dir = tools::cached(
        "gateway-api-echo-basic",
        &release.version,
        &inputs,
        |partial| {
            eprintln!(
                "==> building the Gateway API {} echo server (static) from the Go module proxy",
                release.version
            );
            tools::go_build(
                &module,
                ECHO_PACKAGE,
                &partial.join("echo-basic"),
                LDFLAGS,
                &[("CGO_ENABLED", "0")],
            )
            .context("building the conformance suite's echo server from tools/gateway-api")
        },
    )?;
    Ok(dir.join("echo-basic"))
}

/// Writes the archive and imports it, unless every name already has its manifest.
fn import(archive: &Archive) -> Result<()> {
    let written = images::write_oci_archive(archive)?;
    let mut stale = Vec::new();
    for reference in &archive.references {
        if images::imported_digest(reference)?.as_deref() != Some(&written.manifest_digest) {
            stale.push(reference.as_str());
        }
    }
    if stale.is_empty() {
        return Ok(());
    }
    images::import_archive(&written.path)?;
    eprintln!(
        "==> imported {} as {}",
        archive.binary_name,
        archive.references.join(", ")
    );
    Ok(())
}

/// The YAML the suite applies to a Gateway implementation: base/ and tests/
/// (mesh/ is for the MESH profiles).
fn manifest_texts(release: &Release) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for dir in ["base", "tests"] {
        let dir = release.conformance_dir.join(dir);
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if is_yaml(&path) {
                texts.push(
                    fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                );
            }
        }
    }
    Ok(texts)
}

fn is_yaml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// Every `repository:tag` of `repository` the manifests' `image:` fields name, sorted.
fn references(manifests: &[String], repository: &str) -> Vec<String> {
    let prefix = format!("{repository}:");
    let found: BTreeSet<String> = manifests
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| line.trim().strip_prefix("image:"))
        .map(|image| image.trim().trim_matches(['"', '\'']))
        .filter(|image| image.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::references;

    #[test]
    fn finds_every_tag_of_a_repository_once() {
        let manifests = vec![
            "containers:\n  - image: registry.k8s.io/gateway-api/echo-basic:v1.5.1\n    name: a\n".to_owned(),
            "        image: \"registry.k8s.io/gateway-api/echo-basic:v1.6.0-dev.3\"\n        image: registry.k8s.io/gateway-api/echo-basic:v1.5.1\n        image: registry.k8s.io/gateway-api/echo-advanced:v1.5.1\n".to_owned(),
        ];
        assert_eq!(
            references(&manifests, "registry.k8s.io/gateway-api/echo-basic"),
            [
                "registry.k8s.io/gateway-api/echo-basic:v1.5.1",
                "registry.k8s.io/gateway-api/echo-basic:v1.6.0-dev.3"
            ]
        );
    }
}
