//! `crdgen`: writes the CRDs generated from the Rust types: MicroService
//! to `crds/microservice.yaml` and `charts/trellis/crds/microservice.yaml`,
//! EdgePolicy to `crds/edgepolicy.yaml` and
//! `charts/trellis/crds/edgepolicy.yaml`.
//!
//! `crdgen --check` writes nothing and exits 1 when any committed file
//! differs from what the types generate (CI runs it).

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

/// Generate (or check) the CRD YAML.
#[derive(Debug, Parser)]
#[command(name = "crdgen", about)]
struct Args {
    /// Check that the committed files are up to date instead of writing them.
    #[arg(long)]
    check: bool,
    /// Print the CRDs to stdout (as one YAML stream) instead of writing files.
    #[arg(long, conflicts_with = "check")]
    stdout: bool,
    /// The repository root; the workspace root of this crate when unset.
    #[arg(long)]
    root: Option<PathBuf>,
}

/// One CRD and where it goes.
struct Crd {
    kind: &'static str,
    /// Where its types are.
    types: &'static str,
    yaml: String,
    /// Relative to the repository root.
    targets: [&'static str; 2],
}

fn crds() -> [Crd; 2] {
    [
        Crd {
            kind: "MicroService",
            types: "operator/src/crd.rs",
            yaml: trellis_operator::crd::crd_yaml(),
            targets: [
                "crds/microservice.yaml",
                "charts/trellis/crds/microservice.yaml",
            ],
        },
        Crd {
            kind: "EdgePolicy",
            types: "operator/src/gateway/edge_policy.rs",
            yaml: trellis_operator::gateway::edge_policy::crd_yaml(),
            targets: [
                "crds/edgepolicy.yaml",
                "charts/trellis/crds/edgepolicy.yaml",
            ],
        },
    ]
}

fn main() -> ExitCode {
    let args = Args::parse();
    let crds = crds();
    if args.stdout {
        let all: Vec<&str> = crds.iter().map(|c| c.yaml.as_str()).collect();
        print!("{}", all.join("---\n"));
        return ExitCode::SUCCESS;
    }
    let root = args
        .root
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let mut stale = Vec::new();
    let mut checked = Vec::new();
    for Crd {
        kind,
        types,
        yaml,
        targets,
    } in &crds
    {
        for target in targets {
            checked.push(*target);
            let path = root.join(target);
            let current = std::fs::read_to_string(&path).ok();
            if current.as_deref() == Some(yaml.as_str()) {
                continue;
            }
            if args.check {
                stale.push(format!("{target} (the {kind} types in {types})"));
                continue;
            }
            if let Some(dir) = path.parent()
                && let Err(e) = std::fs::create_dir_all(dir)
            {
                eprintln!("crdgen: cannot create {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
            if let Err(e) = std::fs::write(&path, yaml) {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("crdgen: wrote {target}");
        }
    }
    if !stale.is_empty() {
        eprintln!(
            "crdgen: out of date: {}.\n\
             Run `cargo run -p trellis-operator --bin crdgen` and commit the result.",
            stale.join(", ")
        );
        return ExitCode::FAILURE;
    }
    if args.check {
        eprintln!("crdgen: {} up to date", checked.join(", "));
    }
    ExitCode::SUCCESS
}
