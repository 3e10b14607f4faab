//! `crdgen`: writes the MicroService CRD generated from the Rust types to
//! `crds/microservice.yaml` and `charts/trellis/crds/microservice.yaml`.
//!
//! `crdgen --check` writes nothing and exits 1 when either committed file
//! differs from what the types generate (CI runs it).

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

/// Generate (or check) the MicroService CRD YAML.
#[derive(Debug, Parser)]
#[command(name = "crdgen", about)]
struct Args {
    /// Check that the committed files are up to date instead of writing them.
    #[arg(long)]
    check: bool,
    /// Print the CRD to stdout instead of writing files.
    #[arg(long, conflicts_with = "check")]
    stdout: bool,
    /// The repository root; the workspace root of this crate when unset.
    #[arg(long)]
    root: Option<PathBuf>,
}

/// Where the CRD goes, relative to the repository root.
const TARGETS: [&str; 2] = [
    "crds/microservice.yaml",
    "charts/trellis/crds/microservice.yaml",
];

fn main() -> ExitCode {
    let args = Args::parse();
    let yaml = trellis_operator::crd::crd_yaml();
    if args.stdout {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    let root = args
        .root
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let mut stale = Vec::new();
    for target in TARGETS {
        let path = root.join(target);
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref() == Some(yaml.as_str()) {
            continue;
        }
        if args.check {
            stale.push(target);
            continue;
        }
        if let Some(dir) = path.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!("crdgen: cannot create {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        if let Err(e) = std::fs::write(&path, &yaml) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("crdgen: wrote {target}");
    }
    if !stale.is_empty() {
        eprintln!(
            "crdgen: {} out of date with the MicroService types in operator/src/crd.rs.\n\
             Run `cargo run -p trellis-operator --bin crdgen` and commit the result.",
            stale.join(" and ")
        );
        return ExitCode::FAILURE;
    }
    if args.check {
        eprintln!("crdgen: {} up to date", TARGETS.join(" and "));
    }
    ExitCode::SUCCESS
}
