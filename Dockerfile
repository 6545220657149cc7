# syntax=docker/dockerfile:1
#
# raftgen, CPU build (candle on the CPU): one image for every node.
#
#   docker build -t raftgen:0.1.0 .
#   docker run --rm raftgen:0.1.0 node --help
#
# Two stages: `builder` compiles the release binary with the locked
# dependencies; `runtime` is Debian slim with the binary, a non-root user and
# the data volume. The CUDA variant is described in docs/deploy.md (the CUDA
# feature does not exist yet). tests/deploy.rs checks this file.

# The locked dependencies need rustc 1.88 or newer (icu_*, validit, zip).
ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Only what the build reads: the workspace manifest and lock, every workspace
# member (cargo refuses a workspace with a member or a declared bench missing),
# and the built-in model's files, which src/models/catalog.rs compiles in.
COPY Cargo.toml Cargo.lock ./
COPY raft raft
COPY storage storage
COPY chaos chaos
COPY src src
COPY benches benches
COPY models/tiny-sd models/tiny-sd
COPY models/shapes-sd models/shapes-sd
# BuildKit cache mounts keep the registry and target/ between builds. The
# release profile keeps line tables (debug = 1): the image drops them, and
# backtraces keep function names.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p raftgen \
 && mkdir -p /out \
 && cp target/release/raftgen /out/raftgen \
 && strip --strip-debug /out/raftgen \
 && /out/raftgen --version

FROM debian:bookworm-slim AS runtime
# ca-certificates for any future TLS endpoint; curl for health checks and the
# Kubernetes preStop hook (deploy/k8s/statefulset.yaml).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 raftgen \
 && useradd --system --uid 10001 --gid raftgen --home-dir /var/lib/raftgen --no-create-home \
      --shell /usr/sbin/nologin raftgen \
 && mkdir -p /var/lib/raftgen /models \
 && chown raftgen:raftgen /var/lib/raftgen \
 && chmod 0750 /var/lib/raftgen
COPY --from=builder /out/raftgen /usr/local/bin/raftgen
USER 10001:10001
WORKDIR /var/lib/raftgen
# --data: the node's sled log, snapshots and model-hash cache. Models go under
# /models (read-only) with --models-dir /models.
VOLUME ["/var/lib/raftgen"]
# One port per node: the public API, /metrics, /healthz, /readyz and the Raft RPCs.
EXPOSE 7001
ENTRYPOINT ["raftgen"]
CMD ["--help"]
