//! What `cargo xtask demo` and `cargo xtask test` need from the machine,
//! checked in their first second and installed when missing, so a fresh
//! machine needs no other command. The list itself is `.ci/install` (CI runs
//! it too), which is idempotent and takes about a second when nothing is
//! missing.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{paths, run};

/// Installs what is missing (as root, with `.ci/install`), or says in one
/// sentence what to run when this process may not.
pub fn ensure() -> Result<()> {
    if !cfg!(target_os = "linux") {
        bail!(
            "the local cluster runs on Linux only (it is a real kubelet with containerd): use a Linux machine or VM"
        );
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        bail!(
            "the local cluster needs root (it runs containerd, a kubelet and iptables): run `sudo -E cargo xtask …`, or as root"
        );
    }
    if Command::new("dpkg-query")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!(
            "this machine has no dpkg: install containerd, runc, the CNI plugins, iptables, conntrack, protoc and PostgreSQL with your package manager (the list is in .ci/install)"
        );
    }
    eprintln!(
        "==> prerequisites (.ci/install: Debian packages, toolchains; installs only what is missing)"
    );
    run::status(
        Command::new("bash")
            .arg(paths::workspace().join(".ci/install"))
            .current_dir(paths::workspace()),
    )
}
