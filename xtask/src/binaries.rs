//! The workspace's built binaries: building one for release, and reading
//! its functions.

use std::{collections::HashMap, path::Path, path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::{paths, run};

/// A release binary of the workspace, built first unless `no_build`: the
/// build the benchmarks measure.
pub fn release(package: &str, bin: &str, no_build: bool) -> Result<PathBuf> {
    if !no_build {
        run::status(run::cargo().current_dir(paths::workspace()).args([
            "build",
            "--release",
            "-p",
            package,
            "--bin",
            bin,
        ]))?;
    }
    let path = paths::target_dir().join("release").join(bin);
    if !path.exists() {
        bail!("{} is not built", path.display());
    }
    Ok(path)
}

/// The functions of `binary` by symbol name, as the linker knows them,
/// with their sizes in bytes (`nm`).
pub fn functions(binary: &Path) -> Result<HashMap<String, u64>> {
    let out = run::output(
        Command::new("nm")
            .args(["--defined-only", "--print-size"])
            .arg(binary),
    )?;
    Ok(out
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (_, size, kind, name) =
                (words.next()?, words.next()?, words.next()?, words.next()?);
            matches!(kind, "t" | "T" | "w" | "W")
                .then(|| Some((name.to_owned(), u64::from_str_radix(size, 16).ok()?)))
                .flatten()
        })
        .collect())
}
