//! `cargo xtask e2e [--kind]`: the end-to-end suite (tests/tests/shop.rs) on its own.
//!
//! - Without `--kind`, on the local node: `cluster up`, `images`, `postgres up`,
//!   then the suite (also part of `cargo xtask test`'s full-node tier).
//! - With `--kind`, for users with Docker (and GitHub Actions,
//!   `.github/workflows/e2e.yml`): the same suite, not a copy, against a kind
//!   cluster. Images are built with the root Dockerfile and loaded with
//!   `kind load docker-image`; the shop's PostgreSQL is a `postgres:15`
//!   container on kind's Docker network, whose address the suite writes into
//!   the shop's `postgres` EndpointSlice (`TRELLIS_E2E_POSTGRES`); the suite
//!   reaches Services and sidecars through the apiserver's proxy, since the
//!   host is not on kind's pod network (`TRELLIS_E2E_KIND=1`). kubectl, helm,
//!   kind and docker come from `PATH`. The cluster and the container are
//!   deleted afterwards unless `--keep`.
//!
//! The kind path cannot run on this project's own machines (no Docker engine);
//! everything it does differently is in this file and in `Target` (tests/src/shop.rs).

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{cluster, images, paths, postgres, run};

/// The Dockerfile target of each image the suite needs (kind brings its own pause image).
const KIND_IMAGES: &[(&str, &str)] = &[
    ("trellis/operator", "operator"),
    ("trellis/sidecar", "sidecar"),
    ("trellis/smoke", "smoke"),
    ("trellis/user-service", "user"),
    ("trellis/product-service", "product"),
    ("trellis/order-service", "order"),
];
/// The PostgreSQL container on kind's network.
const PG_CONTAINER: &str = "trellis-e2e-postgres";
const PG_IMAGE: &str = "docker.io/library/postgres:15";

/// Options of `cargo xtask e2e`.
#[derive(clap::Args, Debug)]
pub struct E2e {
    /// Run on a kind cluster (needs docker, kind, kubectl and helm on PATH).
    #[arg(long)]
    pub kind: bool,
    /// The kind cluster's name (created when missing).
    #[arg(long, default_value = "trellis-e2e")]
    pub kind_name: String,
    /// Keep the kind cluster and the PostgreSQL container afterwards.
    #[arg(long)]
    pub keep: bool,
}

fn cargo_test() -> Command {
    let mut cmd = crate::run::cargo();
    cmd.current_dir(paths::workspace()).args([
        "test",
        "-p",
        "trellis-tests",
        "--test",
        "shop",
        "--",
        "--include-ignored",
        "--nocapture",
    ]);
    cmd
}

/// Runs the suite.
pub fn run(opts: &E2e) -> Result<()> {
    if !opts.kind {
        cluster::up(cluster::Mode::Node)?;
        images::build(true)?;
        postgres::up()?;
        return run::status(cargo_test().env("KUBECONFIG", paths::admin_kubeconfig()));
    }
    let missing: Vec<&str> = ["docker", "kind", "kubectl", "helm"]
        .into_iter()
        .filter(|tool| {
            !run::quietly(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "cargo xtask e2e --kind needs {} on PATH (see README, \"kind\")",
            missing.join(", ")
        );
    }
    let name = &opts.kind_name;
    let result = kind_suite(name);
    if opts.keep {
        eprintln!(
            "==> kept: kind cluster {name} (kind delete cluster --name {name}), container {PG_CONTAINER} (docker rm -f {PG_CONTAINER})"
        );
    } else {
        eprintln!("==> deleting kind cluster {name} and {PG_CONTAINER}");
        run::quietly(Command::new("kind").args(["delete", "cluster", "--name", name]));
        run::quietly(Command::new("docker").args(["rm", "-f", PG_CONTAINER]));
    }
    result
}

fn kind_suite(name: &str) -> Result<()> {
    let clusters = run::output(Command::new("kind").args(["get", "clusters"]))?;
    if clusters.lines().any(|c| c.trim() == name) {
        eprintln!("==> kind cluster {name} exists; using it");
    } else {
        eprintln!("==> creating kind cluster {name}");
        run::status(
            Command::new("kind").args(["create", "cluster", "--name", name, "--wait", "180s"]),
        )?;
    }
    let dir = paths::workspace().join("target/kind");
    std::fs::create_dir_all(&dir)?;
    let kubeconfig: PathBuf = dir.join(format!("{name}.kubeconfig"));
    let config = run::output(Command::new("kind").args(["get", "kubeconfig", "--name", name]))?;
    std::fs::write(&kubeconfig, config)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;

    for (image, target) in KIND_IMAGES {
        let tag = format!("{image}:{}", images::TAG);
        eprintln!("==> docker build --target {target} -t {tag}");
        run::status(
            Command::new("docker")
                .current_dir(paths::workspace())
                .args(["build", "--target", target, "-t", &tag, "."]),
        )?;
        run::status(Command::new("kind").args(["load", "docker-image", &tag, "--name", name]))?;
    }

    let postgres = kind_postgres()?;
    eprintln!("==> the suite, on kind, PostgreSQL at {postgres}");
    run::status(
        cargo_test()
            .env("KUBECONFIG", &kubeconfig)
            .env("TRELLIS_E2E_KIND", "1")
            .env("TRELLIS_E2E_POSTGRES", &postgres),
    )
}

/// Starts (or reuses) PostgreSQL 15 in a container on kind's Docker network,
/// with the shop's role and databases; returns its address there.
fn kind_postgres() -> Result<String> {
    let running = run::output(Command::new("docker").args([
        "ps",
        "-q",
        "--filter",
        &format!("name=^{PG_CONTAINER}$"),
    ]))?;
    if running.trim().is_empty() {
        run::quietly(Command::new("docker").args(["rm", "-f", PG_CONTAINER]));
        eprintln!("==> starting {PG_IMAGE} as {PG_CONTAINER} on kind's network");
        run::output(Command::new("docker").args([
            "run",
            "-d",
            "--name",
            PG_CONTAINER,
            "--network",
            "kind",
            "-e",
            "POSTGRES_USER=shop",
            "-e",
            "POSTGRES_PASSWORD=shop",
            "-e",
            &format!("POSTGRES_DB={}", postgres::DATABASES[0]),
            PG_IMAGE,
        ]))?;
    }
    let ready = || {
        run::quietly(Command::new("docker").args([
            "exec",
            PG_CONTAINER,
            "pg_isready",
            "-U",
            "shop",
            "-d",
            postgres::DATABASES[0],
        ]))
    };
    let started = std::time::Instant::now();
    while !ready() {
        if started.elapsed() > Duration::from_secs(90) {
            bail!(
                "{PG_CONTAINER} did not accept connections within 90 s (docker logs {PG_CONTAINER})"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    for db in &postgres::DATABASES[1..] {
        let exists = run::output(Command::new("docker").args([
            "exec",
            PG_CONTAINER,
            "psql",
            "-U",
            "shop",
            "-d",
            postgres::DATABASES[0],
            "-tAc",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{db}'"),
        ]))?;
        if exists.trim() != "1" {
            run::output(Command::new("docker").args([
                "exec",
                PG_CONTAINER,
                "createdb",
                "-U",
                "shop",
                db,
            ]))?;
        }
    }
    let ip = run::output(Command::new("docker").args([
        "inspect",
        "-f",
        "{{(index .NetworkSettings.Networks \"kind\").IPAddress}}",
        PG_CONTAINER,
    ]))?;
    let ip = ip.trim().to_owned();
    if ip.is_empty() {
        bail!("{PG_CONTAINER} has no address on the kind network");
    }
    Ok(ip)
}
