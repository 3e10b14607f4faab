# The same verbs as `cargo xtask`, for people who use just.

# List the recipes.
default:
    @just --list

# Run every test tier (the README's test command).
test:
    cargo xtask test

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
