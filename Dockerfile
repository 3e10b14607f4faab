# Every Trellis image, for users who build with Docker; pick one with --target:
#   docker build --target sidecar  -t trellis/sidecar:0.1.0 .
#   docker build --target operator -t trellis/operator:0.1.0 .
#   docker build --target smoke    -t trellis/smoke:0.1.0 .
#   docker build --target pause    -t trellis/pause:0.1.0 .
#   docker build --target user     -t trellis/user-service:0.1.0 .
#   docker build --target product  -t trellis/product-service:0.1.0 .
#   docker build --target order    -t trellis/order-service:0.1.0 .
# Each is the image `cargo xtask images` makes without Docker: the same binary
# (the `image` profile) on Debian 12's glibc, user 65532, the binary as the
# entrypoint, /home/nonroot as the working directory.
FROM docker.io/library/rust:1.95-bookworm AS build
# protoc generates the user service's gRPC code (user and order services).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --profile image \
      -p trellis-sidecar --bin trellis-sidecar \
      -p trellis-operator --bin trellis-operator \
      -p trellis-tests --bin trellis-smoke \
      -p xtask --bin trellis-pause \
      -p user-service --bin user-service \
      -p product-service --bin product-service \
      -p order-service --bin order-service

FROM gcr.io/distroless/cc-debian12:nonroot AS base
USER 65532:65532
WORKDIR /home/nonroot

FROM base AS sidecar
COPY --from=build /src/target/image/trellis-sidecar /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/trellis-sidecar"]

FROM base AS operator
COPY --from=build /src/target/image/trellis-operator /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/trellis-operator"]

FROM base AS smoke
COPY --from=build /src/target/image/trellis-smoke /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/trellis-smoke"]

FROM base AS pause
COPY --from=build /src/target/image/trellis-pause /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/trellis-pause"]

# The example shop's workloads (examples/shop). Their SQLite default is a file
# in the working directory, which the nonroot user owns.
FROM base AS user
COPY --from=build /src/target/image/user-service /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/user-service"]

FROM base AS product
COPY --from=build /src/target/image/product-service /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/product-service"]

FROM base AS order
COPY --from=build /src/target/image/order-service /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/order-service"]
