//! `cargo xtask fuzz [--long]`: the cargo-fuzz targets in fuzz/, each for a
//! bounded time (60 s; 30 min with `--long`). `cargo xtask test` runs the
//! short form as its own step.
//!
//! The build goes to a target directory in the tools cache, outside the
//! clone, so CI reuses it; new corpus entries go there too (the committed
//! seeds in fuzz/corpus/ are read, never written), so a run leaves the
//! working tree clean. A crash leaves its input in fuzz/artifacts/ and fails.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::Result;

use crate::{paths, run};

/// The fuzz targets (fuzz/fuzz_targets/*.rs).
const TARGETS: &[&str] = &["policy", "routing"];

/// How long each target runs in CI.
pub const SHORT: Duration = Duration::from_secs(60);
/// How long each target runs with `--long`.
pub const LONG: Duration = Duration::from_secs(30 * 60);

fn cargo_nightly() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .current_dir(paths::workspace().join("fuzz"))
        // The outer cargo's choices (stable cargo, its toolchain) must not leak in.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env("CARGO_TARGET_DIR", paths::cache_dir().join("fuzz-target"));
    cmd
}

/// Installs cargo-fuzz unless it is there already.
fn ensure_cargo_fuzz() -> Result<()> {
    let installed = cargo_nightly()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run::status(
            Command::new("cargo")
                .args(["install", "cargo-fuzz", "--locked"])
                .env_remove("CARGO")
                .env("CARGO_TARGET_DIR", paths::cache_dir().join("cargo-install")),
        )?;
    }
    Ok(())
}

/// Runs every target for `each`.
pub fn run(each: Duration) -> Result<()> {
    ensure_cargo_fuzz()?;
    for target in TARGETS {
        let found: PathBuf = paths::cache_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&found)?;
        let seeds = paths::workspace().join("fuzz/corpus").join(target);
        run::status(
            cargo_nightly()
                .args(["fuzz", "run", "-O", target])
                .arg(&found)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={}", each.as_secs()))
                .arg("-print_final_stats=1"),
        )?;
    }
    Ok(())
}
