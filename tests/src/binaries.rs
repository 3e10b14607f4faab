//! The workspace's own binaries, for tests that run them as processes.

use std::{path::PathBuf, process::Stdio};

/// Builds a workspace binary with cargo (a no-op when it is fresh) and
/// returns its path as cargo reports it, so `CARGO_TARGET_DIR` is honoured.
pub fn built(package: &str, bin: &str) -> PathBuf {
    let workspace = crate::shop::workspace();
    let out = crate::cargo()
        .current_dir(&workspace)
        .args([
            "build",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo build");
    assert!(out.status.success(), "cargo build -p {package} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo built no executable {bin}"))
}
