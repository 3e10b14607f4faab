//! `cargo xtask demo`: the README's first command. From a fresh clone on a
//! fresh machine it builds what is missing, starts everything, deploys the
//! shop and runs a short narrated scenario; it leaves the cluster running.
//!
//! 1. the pinned tools (Kubernetes, etcd, CoreDNS, Helm), built once into the cache;
//! 2. the local cluster (`cluster up`);
//! 3. the images (`images`: cargo rebuilds only what changed, then they are imported);
//! 4. the shop's PostgreSQL on the node (`postgres up`);
//! 5. the scenario: `trellis-shop` from the tests crate, the same steps as the
//!    end-to-end suite (tests/tests/shop.rs) from the same module
//!    (tests/src/shop.rs): chart, shop, orders, an outage, a live policy change,
//!    and what the MicroServices and the sidecars say, ending with `trellis stat`
//!    (the `trellis` CLI is built beside it, for the reader to explore with).
//!
//! Running it again reuses everything and runs the scenario again.

use std::{process::Command, time::Instant};

use anyhow::{Context, Result};

use crate::{cluster, images, paths, postgres, run, tools::Tools};

fn step<T>(n: usize, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("\n======== [{n}/5] {what} ========");
    let started = Instant::now();
    let short = what.split([':', '(']).next().unwrap_or(what).trim();
    let value = {
        let _ticker = run::Ticker::start(format!("[{n}/5] {short}"));
        f().with_context(|| format!("step {n} ({what}) failed"))
    }?;
    eprintln!("    [{n}/5] done in {:.0?}", started.elapsed());
    Ok(value)
}

/// Runs the demo.
pub fn run() -> Result<()> {
    let started = Instant::now();
    let tools = step(
        1,
        "tools: Kubernetes, etcd, CoreDNS, Helm (first time: ~10 min on two cores)",
        Tools::ensure,
    )?;
    step(
        2,
        "the local cluster (a real single-node Kubernetes)",
        || cluster::up(cluster::Mode::Node),
    )?;
    step(
        3,
        "images: operator, sidecar, the shop's services (first time: ~8 min)",
        || images::build(true),
    )?;
    step(
        4,
        "PostgreSQL for the shop on 10.244.0.1:5432",
        postgres::up,
    )?;
    step(5, "the shop scenario", || {
        // The `image` profile: the images just built most of what these
        // need. One cargo run builds the scenario and the CLI the reader
        // explores with, side by side.
        run::status(
            run::cargo()
                .current_dir(paths::workspace())
                .args(["build", "--quiet", "--profile", "image"])
                .args(["-p", "trellis-tests", "--bin", "trellis-shop"])
                .args(["-p", "trellis-cli", "--bin", "trellis"]),
        )?;
        run::status(
            Command::new(paths::target_dir().join("image/trellis-shop"))
                .current_dir(paths::workspace())
                // Where it finds the chart and examples/ (`shop::workspace`).
                .env("CARGO_MANIFEST_DIR", paths::workspace().join("tests"))
                .env("KUBECONFIG", paths::admin_kubeconfig())
                .env_remove("TRELLIS_E2E_KIND"),
        )
    })?;

    let kubectl = tools.kube("kubectl");
    let helm = tools.helm();
    println!(
        r#"
The demo took {elapsed:.0?}. The cluster, the operator and the shop keep running.

Explore:
  export KUBECONFIG={kubeconfig}
  alias kubectl={kubectl} helm={helm} trellis={trellis}
  trellis check -n shop                             # is the mesh healthy? each check ✓ or ✗ with the fix
  trellis stat -n shop --watch                      # rates, success, latency per service and dependency
  kubectl get microservices -n shop                 # or: kubectl get ms -A
  kubectl describe microservice order -n shop
  kubectl get pods -n shop -o wide
  kubectl get gateway shop -n shop                  # the shop's edge (examples/shop/gateway.yaml)
  EDGE=$(kubectl get gateway shop -n shop -o jsonpath='{{.status.addresses[0].value}}')
  curl -s "http://$EDGE/api/v1/orders?user_id=1"    # the API through the gateway, as a client outside the cluster
  POD=$(kubectl get pods -n shop -l app.kubernetes.io/name=order -o jsonpath='{{.items[0].status.podIP}}')
  curl -s http://$POD:15020/metrics | grep ^trellis_  # this machine is the node: pod IPs answer; /status, /healthz too
  kubectl patch microservice product -n shop --type merge -p '{{"spec":{{"replicas":3}}}}'

Again:  cargo xtask demo          (reuses everything; the scenario runs again)
Stop:   cargo xtask cluster down  (stops the cluster and PostgreSQL, removes what they added)
"#,
        elapsed = started.elapsed(),
        kubeconfig = paths::admin_kubeconfig().display(),
        kubectl = kubectl.display(),
        helm = helm.display(),
        trellis = paths::target_dir().join("image/trellis").display(),
    );
    Ok(())
}
