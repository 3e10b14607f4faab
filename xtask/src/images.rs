//! OCI images of the workspace's binaries, built without a registry or a Docker engine.
//!
//! Each image is one layer: the binary at `/usr/local/bin/<name>`, the shared
//! libraries it links (from the build host, found with `ldd`), and a minimal
//! `/etc` with the `nonroot` user (65532). The archive is an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/`), written deterministically (fixed
//! mtimes and owners), then imported into the cluster's containerd. The
//! Dockerfiles beside each crate build the equivalent image on a distroless base
//! for users with Docker: same binary, same user, same entrypoint.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{paths, run};

/// The tag every image gets, the workspace's version.
pub const TAG: &str = env!("CARGO_PKG_VERSION");

/// One image: which binary of which package, under which name.
pub struct Image {
    /// The repository, e.g. `trellis/sidecar` (docker.io is implied, as Kubernetes does).
    pub name: &'static str,
    /// The cargo package that builds the binary.
    pub package: &'static str,
    /// The binary, which is also the entrypoint.
    pub binary: &'static str,
}

/// The sandbox image every pod runs first; containerd is configured to use it.
pub const PAUSE: Image = Image {
    name: "trellis/pause",
    package: "xtask",
    binary: "trellis-pause",
};

/// Every image of the workspace.
pub const ALL: &[Image] = &[
    PAUSE,
    Image {
        name: "trellis/sidecar",
        package: "trellis-sidecar",
        binary: "trellis-sidecar",
    },
    Image {
        name: "trellis/operator",
        package: "trellis-operator",
        binary: "trellis-operator",
    },
    Image {
        name: "trellis/smoke",
        package: "trellis-tests",
        binary: "trellis-smoke",
    },
    Image {
        name: "trellis/user-service",
        package: "user-service",
        binary: "user-service",
    },
    Image {
        name: "trellis/product-service",
        package: "product-service",
        binary: "product-service",
    },
    Image {
        name: "trellis/order-service",
        package: "order-service",
        binary: "order-service",
    },
];

/// `ctr` against the cluster's containerd, in the namespace the kubelet uses.
pub fn ctr() -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address")
        .arg(paths::containerd_socket())
        .args(["--namespace", "k8s.io"]);
    cmd
}

/// Builds every image; with `import`, loads them into the running cluster.
pub fn build(import: bool) -> Result<()> {
    build_named(&[], import)
}

/// Builds the images named (`sidecar`, `trellis/sidecar`, ...), or all when `names` is empty.
pub fn build_named(names: &[String], import: bool) -> Result<()> {
    if import && crate::cluster::process::running("containerd").is_none() {
        bail!(
            "the cluster's containerd is not running: `cargo xtask cluster up` first, or pass --no-import"
        );
    }
    let chosen: Vec<&Image> = ALL
        .iter()
        .filter(|i| {
            names.is_empty()
                || names
                    .iter()
                    .any(|n| n == i.name || i.name.strip_prefix("trellis/") == Some(n.as_str()))
        })
        .collect();
    if chosen.len() < names.len().max(1) && !names.is_empty() {
        let known: Vec<_> = ALL.iter().map(|i| i.name).collect();
        bail!("unknown image in {names:?}; known: {}", known.join(", "));
    }
    let binaries = compile(&chosen)?;
    // Only the build of every image has the symbol names the list was made for.
    if names.is_empty()
        && let Some((_, sidecar)) = chosen
            .iter()
            .zip(&binaries)
            .find(|(i, _)| i.binary == "trellis-sidecar")
    {
        crate::link_order::check(sidecar)?;
    }
    for (image, binary) in chosen.into_iter().zip(binaries) {
        let archive = write_archive(image, &binary)?;
        if import {
            import_archive(&archive)?;
        }
        eprintln!("    {}:{TAG} → {}", image.name, archive.display());
    }
    Ok(())
}

/// Makes sure the pause image is in containerd (the kubelet cannot start a pod without it).
pub fn ensure_pause() -> Result<()> {
    if imported(&format!("docker.io/{}:{TAG}", PAUSE.name))? {
        return Ok(());
    }
    eprintln!("==> building the pause image");
    let binary = compile(&[&PAUSE])?.remove(0);
    let archive = write_archive(&PAUSE, &binary)?;
    import_archive(&archive)
}

/// Whether the cluster's containerd has an image under `reference`
/// (`registry/repository:tag`, as `ctr images ls` names it).
pub fn imported(reference: &str) -> Result<bool> {
    let present = run::output(ctr().args(["images", "ls", "-q"]))?;
    Ok(present.lines().any(|l| l.trim() == reference))
}

/// The manifest digest of the image the cluster's containerd has under
/// `reference`, if any.
pub fn imported_digest(reference: &str) -> Result<Option<String>> {
    // Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS.
    let listing = run::output(ctr().args(["images", "ls"]))?;
    Ok(listing.lines().find_map(|line| {
        let mut columns = line.split_whitespace();
        (columns.next() == Some(reference))
            .then(|| columns.nth(1).map(str::to_owned))
            .flatten()
    }))
}

/// Kills and removes every container of the cluster's containerd (before stopping it).
pub fn kill_all_containers() {
    let Ok(tasks) = run::output(ctr().args(["tasks", "ls", "-q"])) else {
        return;
    };
    for id in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
        run::quietly(ctr().args(["tasks", "kill", "-s", "SIGKILL", id]));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    for id in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
        run::quietly(ctr().args(["tasks", "delete", "-f", id]));
    }
    if let Ok(containers) = run::output(ctr().args(["containers", "ls", "-q"])) {
        for id in containers.lines().map(str::trim).filter(|l| !l.is_empty()) {
            run::quietly(ctr().args(["containers", "delete", id]));
        }
    }
}

/// The sidecar's image build, made with every image's binaries in one
/// build as `cargo xtask images` makes it: the features cargo unifies
/// across the packages built together decide its symbol names.
pub fn sidecar_build() -> Result<PathBuf> {
    let all: Vec<&Image> = ALL.iter().collect();
    let binaries = compile(&all)?;
    all.iter()
        .zip(binaries)
        .find(|(i, _)| i.binary == "trellis-sidecar")
        .map(|(_, path)| path)
        .ok_or_else(|| anyhow::anyhow!("no image holds trellis-sidecar"))
}

/// Builds the binaries with the `image` profile (release without LTO, for build time).
fn compile(images: &[&Image]) -> Result<Vec<PathBuf>> {
    let mut cmd = crate::run::cargo();
    cmd.current_dir(paths::workspace())
        .args(["build", "--profile", "image"]);
    let packages: BTreeSet<_> = images.iter().map(|i| i.package).collect();
    for p in packages {
        cmd.args(["-p", p]);
    }
    for i in images {
        cmd.args(["--bin", i.binary]);
    }
    eprintln!("==> compiling {} binaries for images", images.len());
    run::status(&mut cmd)?;
    let target = paths::target_dir();
    Ok(images
        .iter()
        .map(|i| target.join("image").join(i.binary))
        .collect())
}

/// The shared libraries `binary` needs, with the dynamic loader, as absolute
/// paths; none for a static executable (a Go binary built with `CGO_ENABLED=0`).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let ldd = Command::new("ldd")
        .arg(binary)
        .output()
        .context("could not start `ldd`")?;
    let said = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    if !ldd.status.success() {
        // glibc's ldd exits 1 on a static executable, saying so.
        if (said(&ldd.stdout) + &said(&ldd.stderr)).contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "`ldd {}` failed ({}): {}",
            binary.display(),
            ldd.status,
            said(&ldd.stderr).trim()
        );
    }
    let out = said(&ldd.stdout);
    let mut libs = Vec::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// A deterministic tar of the image's file system, with `binary` as
/// `/usr/local/bin/<name>`.
fn layer(name: &str, binary: &Path) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    let dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(0);
        tar.append_data(&mut h, path, std::io::empty())?;
        Ok(())
    };
    let file =
        |tar: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32| -> Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(0);
            tar.append_data(&mut h, path, data)?;
            Ok(())
        };
    for d in [
        "etc",
        "tmp",
        "usr",
        "usr/local",
        "usr/local/bin",
        "home",
        "home/nonroot",
    ] {
        dir(&mut tar, d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    file(
        &mut tar,
        "etc/passwd",
        b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        0o644,
    )?;
    file(
        &mut tar,
        "etc/group",
        b"root:x:0:\nnonroot:x:65532:\n",
        0o644,
    )?;
    file(&mut tar, "etc/nsswitch.conf", b"hosts: files dns\n", 0o644)?;
    let bytes = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    file(&mut tar, &format!("usr/local/bin/{name}"), &bytes, 0o755)?;
    let mut made = BTreeSet::new();
    for lib in shared_libraries(binary)? {
        let canonical = fs::canonicalize(&lib)?;
        let rel = lib.strip_prefix("/")?;
        let mut parent = PathBuf::new();
        for part in rel.parent().into_iter().flat_map(|p| p.components()) {
            parent.push(part);
            if made.insert(parent.clone())
                && !["usr", "etc", "tmp"].contains(&parent.to_str().unwrap_or(""))
            {
                dir(&mut tar, parent.to_str().unwrap_or_default(), 0o755)?;
            }
        }
        file(
            &mut tar,
            rel.to_str().unwrap_or_default(),
            &fs::read(&canonical)?,
            0o755,
        )?;
    }
    Ok(tar.into_inner()?)
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes `target/images/<name>.oci.tar` and returns its path.
pub fn write_archive(image: &Image, binary: &Path) -> Result<PathBuf> {
    write_oci_archive(&Archive {
        file_name: image.name.replace('/', "-"),
        binary_name: image.binary,
        binary,
        user: NONROOT,
        references: vec![format!("docker.io/{}:{TAG}", image.name)],
    })
    .map(|written| written.path)
}

/// The `nonroot` user (and group) of every image's /etc/passwd.
pub const NONROOT: &str = "65532:65532";

/// One OCI archive: a binary, its entrypoint, and the names it is imported under.
pub struct Archive<'a> {
    /// The file under target/images, without `.oci.tar`.
    pub file_name: String,
    /// The binary's name under /usr/local/bin.
    pub binary_name: &'a str,
    /// The binary on the build host.
    pub binary: &'a Path,
    /// The user the entrypoint runs as, `uid:gid` ([`NONROOT`] unless the image needs root).
    pub user: &'a str,
    /// Full references (`registry/repository:tag`), one image each on import,
    /// all sharing the one manifest.
    pub references: Vec<String>,
}

/// An archive written by [`write_oci_archive`].
pub struct Written {
    /// `target/images/<file_name>.oci.tar`.
    pub path: PathBuf,
    /// The image manifest's digest (`sha256:…`), which `ctr images ls` shows
    /// for every name imported from the archive.
    pub manifest_digest: String,
}

/// Writes `target/images/<file_name>.oci.tar`.
pub fn write_oci_archive(archive: &Archive) -> Result<Written> {
    let layer = layer(archive.binary_name, archive.binary)?;
    let layer_digest = sha256(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": archive.user,
            "Entrypoint": [format!("/usr/local/bin/{}", archive.binary_name)],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/home/nonroot",
            "Labels": { "org.opencontainers.image.source": env!("CARGO_PKG_REPOSITORY") },
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = sha256(&manifest);
    // containerd names one image per entry of the index, from its annotation.
    let entries: Vec<_> = archive
        .references
        .iter()
        .map(|reference| {
            let tag = reference.rsplit_once(':').map_or("latest", |(_, t)| t);
            json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "platform": { "architecture": "amd64", "os": "linux" },
                "annotations": {
                    "io.containerd.image.name": reference,
                    "org.opencontainers.image.ref.name": tag,
                },
            })
        })
        .collect();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))?;

    let dir = paths::workspace().join("target/images");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.oci.tar", archive.file_name));
    let mut tar = tar::Builder::new(fs::File::create(&path)?);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut add = |name: String, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        tar.append_data(&mut h, name, data)?;
        Ok(())
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &index)?;
    for (digest, data) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        add(format!("blobs/sha256/{}", &digest["sha256:".len()..]), data)?;
    }
    tar.finish()?;
    Ok(Written {
        path,
        manifest_digest,
    })
}

/// Imports an archive written by [`write_oci_archive`] into the cluster's containerd.
pub fn import_archive(archive: &Path) -> Result<()> {
    run::output(ctr().args(["images", "import"]).arg(archive)).with_context(|| {
        format!(
            "importing {} into the cluster's containerd",
            archive.display()
        )
    })?;
    Ok(())
}
