//! The `trellis` command (also `kubectl trellis`): is the mesh healthy, and
//! what are its services doing.
//!
//! - [`check`]: the CRD, the operator (running, leading, ready, allowed
//!   what the chart grants), and every MicroService (children, Ready,
//!   sidecars on the policy and the image they were given); one line per
//!   check, and the exit status says whether all passed.
//! - [`stat`]: the golden metrics of each MicroService from its sidecars,
//!   read through the apiserver's pod proxy (no Prometheus needed).
//!
//! It reads the user's kubeconfig the way kubectl does (`KUBECONFIG`, then
//! `~/.kube/config`, or the in-cluster account).

pub mod check;
pub mod scrape;
pub mod sidecars;
pub mod stat;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// The Trellis service mesh: check its health and read its services' metrics.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Is the mesh healthy? One line per check; exits 1 when any fails.
    Check(check::Options),
    /// Requests per second, success rate and latency of each MicroService,
    /// inbound and per dependency, from its sidecars.
    Stat(stat::Options),
    /// This command's version, and the operator's and CRD's it expects.
    Version,
    /// Shell completions: `trellis completions bash > /etc/bash_completion.d/trellis`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Runs the command line in `std::env::args`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("trellis {}", env!("CARGO_PKG_VERSION"));
            println!(
                "expects the operator {} and the MicroService CRD {}",
                env!("CARGO_PKG_VERSION"),
                <trellis_operator::MicroService as kube::Resource>::api_version(&())
            );
            ExitCode::SUCCESS
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let name = cmd.get_name().to_owned();
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Check(opts) => run(check::run(opts)),
        Command::Stat(opts) => run(stat::run(opts)),
    }
}

/// Runs `work` on a runtime; an error is one line and exit status 2.
fn run(work: impl std::future::Future<Output = anyhow::Result<bool>>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(work) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("trellis: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A client from the user's kubeconfig, with a hint when there is none.
pub async fn client() -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    kube::Client::try_default()
        .await
        .context("no cluster to talk to: set KUBECONFIG (or ~/.kube/config) as for kubectl")
}
