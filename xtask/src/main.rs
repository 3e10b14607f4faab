//! `cargo xtask`: the project's automation, in Rust so it runs wherever cargo does.
//!
//! - `cluster up|down|restart|kubeconfig|status`: a real single-node Kubernetes built from
//!   source (see [`cluster`]);
//! - `tools`: build the pinned Go tools (Kubernetes, etcd, CoreDNS, Helm, the Collector) into the cache;
//! - `images`: OCI images of the workspace's binaries, imported into the cluster;
//! - `demo`: the README's first command: everything up, the shop, a narrated scenario;
//! - `e2e [--kind]`: the end-to-end suite alone, on the local node or on kind;
//! - `test`: the README's test command, every tier in order;
//! - `conformance`: the Gateway API conformance suite against the `trellis`
//!   GatewayClass (opt-in; not part of `test`);
//! - `postgres up|down|status`: the example shop's database on the node;
//! - `bench sidecar|gateway|operator`: the sidecar and the gateway against
//!   HAProxy and nginx, the operator against the API's own cost.

mod bench;
mod cluster;
mod demo;
mod e2e;
mod fuzz;
mod gateway_api;
mod images;
mod link_order;
mod postgres;
mod prerequisites;
mod test;
mod tools;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{paths, run};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Trellis development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The local Kubernetes cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Build the pinned Go tools into the cache (done on demand by `cluster up`) and print their paths.
    Tools,
    /// Build the workspace's binaries into OCI images and import them into the cluster.
    Images {
        /// Only write the OCI archives under target/images; do not import them.
        #[arg(long)]
        no_import: bool,
        /// Only these images (e.g. `smoke pause`); all when none are named.
        names: Vec<String>,
    },
    /// The README's first command: build what is missing, start the cluster, deploy the
    /// shop and run a narrated scenario; leaves it all running.
    Demo,
    /// The end-to-end suite (tests/tests/shop.rs) alone: on the local node, or on kind.
    E2e(e2e::E2e),
    /// Run every test tier: unit, control plane, full node.
    Test {
        /// Skip the full-node tier (pods, images).
        #[arg(long)]
        no_node: bool,
        /// The long runs: a 30-minute soak through the shop and 30 minutes of
        /// fuzzing per target (CI runs a minute of each).
        #[arg(long)]
        long: bool,
    },
    /// The Gateway API conformance suite of the pinned release against the
    /// `trellis` GatewayClass (opt-in: not part of `test`); the report goes to docs/conformance/.
    Conformance(gateway_api::conformance::Conformance),
    /// The example shop's PostgreSQL on the node's bridge address (10.244.0.1:5432).
    Postgres {
        #[command(subcommand)]
        command: PostgresCommand,
    },
    /// Fuzz the policy parser and the request routing (cargo fuzz, nightly):
    /// 60 s per target, 30 min with --long.
    Fuzz {
        /// The long run, for a release or after touching a parser.
        #[arg(long)]
        long: bool,
    },
    /// Rewrite sidecar/link-order.txt, the order the sidecar's code is laid
    /// out in, from callgrind runs of its release and image builds (~20 min).
    LinkOrder,
    /// Benchmarks (`bench sidecar`, `bench gateway`, `bench operator`; `bench --help` for their
    /// options): print numbers, assert nothing about speed. They run from a
    /// release build of bench/, made first.
    #[command(disable_help_flag = true)]
    Bench {
        /// What `trellis-bench` takes: `sidecar [...]`, `gateway [...]` or `operator [...]`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PostgresCommand {
    /// Start it (creating its cluster, role and databases when missing); idempotent.
    Up,
    /// Stop it and delete its data (`cluster down` does this too).
    Down,
    /// Say whether it runs.
    Status,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Start the cluster (idempotent: a running cluster is left as it is).
    Up {
        /// Only etcd, kube-apiserver and kube-controller-manager: an envtest in seconds.
        #[arg(long)]
        control_plane_only: bool,
    },
    /// Stop every process the cluster started and remove everything it added.
    Down,
    /// Print the admin kubeconfig's path.
    Kubeconfig,
    /// Say what runs.
    Status,
    /// Stop one component of the running cluster and start it again (fault injection).
    Restart {
        /// The component, as `status` names it (e.g. `kube-apiserver`).
        component: String,
    },
}

/// Runs the command; an error is one line (the cause chain, no backtrace)
/// and exit status 1.
fn main() -> std::process::ExitCode {
    match run_command(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_command(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Cluster { command } => match command {
            ClusterCommand::Up { control_plane_only } => {
                let mode = if control_plane_only {
                    cluster::Mode::ControlPlane
                } else {
                    cluster::Mode::Node
                };
                cluster::up(mode)
            }
            ClusterCommand::Down => cluster::down(),
            ClusterCommand::Kubeconfig => {
                println!("{}", paths::admin_kubeconfig().display());
                Ok(())
            }
            ClusterCommand::Status => cluster::status(),
            ClusterCommand::Restart { component } => cluster::restart(&component),
        },
        Command::Tools => tools::Tools::ensure().and_then(|t| {
            t.print();
            println!("otelcol:    {}", tools::collector()?.display());
            Ok(())
        }),
        Command::Images { no_import, names } => images::build_named(&names, !no_import),
        Command::Demo => prerequisites::ensure().and_then(|()| demo::run()),
        Command::E2e(opts) => e2e::run(&opts),
        Command::Test { no_node, long } => {
            prerequisites::ensure().and_then(|()| test::run(!no_node, long))
        }
        Command::Conformance(opts) => gateway_api::conformance::run(&opts),
        Command::Postgres { command } => match command {
            PostgresCommand::Up => postgres::up(),
            PostgresCommand::Down => postgres::down(),
            PostgresCommand::Status => postgres::status(),
        },
        Command::Fuzz { long } => fuzz::run(if long { fuzz::LONG } else { fuzz::SHORT }),
        Command::Bench { args } => bench::run(&args),
        Command::LinkOrder => link_order::regenerate(),
    }
}
