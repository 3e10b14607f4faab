//! Running commands: echo what runs, fail with the command and its output.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs a command to completion, inheriting stdout and stderr; fails on a non-zero exit.
pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; on failure the error carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and says only whether it succeeded (for probes and idempotent clean-up).
pub fn quietly(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command as a person would type it.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo`, the one that runs xtask, without the variables cargo set for
/// xtask itself (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, `OUT_DIR`, ...).
///
/// Why: build scripts such as ring's declare `rerun-if-env-changed` on those
/// names, and cargo compares them with its own environment. A cargo started
/// from xtask (`CARGO_PKG_NAME=xtask`) and one started from a test
/// (`CARGO_PKG_NAME=trellis-tests`) then disagree, and each rebuilds ring,
/// rustls and kube: half a minute per integration test target.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_per_package_variable) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The variables cargo sets for the package it builds or runs.
fn is_per_package_variable(name: &str) -> bool {
    name == "OUT_DIR"
        || [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_CFG_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::is_per_package_variable;

    #[test]
    fn drops_what_cargo_sets_per_package_and_keeps_the_users_settings() {
        for dropped in [
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "OUT_DIR",
            "CARGO_BIN_EXE_x",
        ] {
            assert!(is_per_package_variable(dropped), "{dropped}");
        }
        for kept in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_INCREMENTAL",
            "PATH",
        ] {
            assert!(!is_per_package_variable(kept), "{kept}");
        }
    }
}
