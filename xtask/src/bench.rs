//! `cargo xtask bench …`: builds the benchmark runner (bench/, package
//! `trellis-bench`) in release and runs it with the same arguments.
//!
//! The runner is a separate package so that xtask does not compile kube,
//! tokio, hyper and the operator before it can print a word.

use anyhow::Result;

use crate::{paths, run};

/// Runs `trellis-bench <args>` from a release build.
pub fn run(args: &[String]) -> Result<()> {
    eprintln!("==> building the benchmark runner (release; the first time takes a few minutes)");
    run::status(
        run::cargo()
            .current_dir(paths::workspace())
            .args(["run", "--release", "-p", "trellis-bench", "--"])
            .args(args),
    )
}
