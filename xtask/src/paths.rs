//! Where things live: the workspace, the build cache and the cluster's state.
//!
//! Everything the cluster writes is under [`state_dir`] (data, certificates,
//! logs, kubeconfigs) or [`run_dir`] (sockets, pid files), so `cluster down`
//! can remove it all. Built tools are cached under [`cache_dir`], outside the
//! clone, keyed by version, so a fresh clone reuses them.

use std::path::PathBuf;

/// The workspace root (the parent of `xtask/` and of `bench/`).
///
/// `cargo run` says where xtask's manifest is at run time; that is preferred
/// to the path compiled in, which names the clone that built the binary
/// when clones share a target directory (as CI's cache does).
pub fn workspace() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The cache of built tools: `$TRELLIS_CACHE`, else `$XDG_CACHE_HOME/trellis`, else `~/.cache/trellis`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRELLIS_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache"));
    base.join("trellis")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

/// The cluster's persistent state: `$TRELLIS_CLUSTER_DIR`, else `/var/lib/trellis/cluster`.
pub fn state_dir() -> PathBuf {
    std::env::var_os("TRELLIS_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/trellis/cluster".into())
}

/// Sockets and pid files: `/run/trellis`.
pub fn run_dir() -> PathBuf {
    "/run/trellis".into()
}

/// The component logs.
pub fn log_dir() -> PathBuf {
    state_dir().join("logs")
}

/// The admin kubeconfig, written by `cluster up`.
pub fn admin_kubeconfig() -> PathBuf {
    state_dir().join("admin.kubeconfig")
}

/// containerd's socket.
pub fn containerd_socket() -> PathBuf {
    run_dir().join("containerd/containerd.sock")
}
