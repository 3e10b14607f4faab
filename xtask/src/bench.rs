//! `cargo xtask bench …`: builds the benchmark runner (bench/, package
//! `trellis-bench`) in release and runs it with the same arguments.
//!
//! The runner is a separate package so that xtask does not compile kube,
//! tokio, hyper and the operator before it can print a word.

use anyhow::Result;

use crate::{images, paths, run};

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

/// `cargo xtask link-order`: rewrites `sidecar/link-order.txt`, the list
/// `sidecar/build.rs` lays the sidecar's code out by, from callgrind runs
/// of the two builds users run: the release build the benchmarks measure
/// and the image build, each built as it is built elsewhere (their symbol
/// names differ). About 20 minutes, most of it the release build's link.
pub fn link_order() -> Result<()> {
    eprintln!("==> building the release sidecar, as `cargo xtask bench` does");
    run::status(run::cargo().current_dir(paths::workspace()).args([
        "build",
        "--release",
        "-p",
        "trellis-sidecar",
        "--bin",
        "trellis-sidecar",
    ]))?;
    let release = paths::target_dir().join("release/trellis-sidecar");
    let image = images::sidecar_build()?;
    let out = paths::workspace().join("sidecar/link-order.txt");
    let mut args = vec!["link-order".to_owned()];
    for binary in [&release, &image] {
        args.push("--sidecar-binary".into());
        args.push(binary.display().to_string());
    }
    args.push("--out".into());
    args.push(out.display().to_string());
    run(&args)?;
    eprintln!(
        "==> rebuild to link by the new list (`cargo xtask bench sidecar` rebuilds the release sidecar)"
    );
    Ok(())
}
