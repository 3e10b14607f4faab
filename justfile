# The same verbs as `cargo xtask`, for people who use just.

# List the recipes.
default:
    @just --list

# Build what is missing, start everything, deploy the shop, run the narrated scenario.
demo:
    cargo xtask demo

# The end-to-end suite (the shop) alone, on the local node.
e2e:
    cargo xtask e2e

# The same end-to-end suite on a kind cluster (needs docker, kind, kubectl, helm).
kind-e2e *ARGS:
    cargo xtask e2e --kind {{ARGS}}

# The shop's PostgreSQL on the node: up, down or status.
postgres CMD="up":
    cargo xtask postgres {{CMD}}

# Run every test tier (the README's test command).
test:
    cargo xtask test

# The Gateway API conformance suite against the trellis GatewayClass (opt-in, not part of `test`):
# `just conformance --run '^HTTPRoute'` for a subset, `just conformance -- --debug` for the suite's flags.
conformance *ARGS:
    cargo xtask conformance {{ARGS}}

# Start the local cluster; `just up --control-plane-only` for the control plane only.
up *ARGS:
    cargo xtask cluster up {{ARGS}}

# Stop the local cluster and remove everything it added.
down:
    cargo xtask cluster down

# Say what runs.
status:
    cargo xtask cluster status

# Print the admin kubeconfig's path: export KUBECONFIG=$(just kubeconfig)
kubeconfig:
    @cargo xtask cluster kubeconfig

# Build the images and import them into the cluster.
images *NAMES:
    cargo xtask images {{NAMES}}

# Build the pinned Go tools (Kubernetes, etcd, CoreDNS, Helm) and print their paths.
tools:
    cargo xtask tools

# Regenerate the CRD YAML from the Rust types.
crds:
    cargo run -p trellis-operator --bin crdgen

# What CI runs.
ci:
    bash .ci/run
