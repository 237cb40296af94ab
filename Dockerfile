# syntax=docker/dockerfile:1
#
# sidekey container image: a static-ish Rust binary on distroless.
#
#   docker build -t sidekey:latest .
#   docker run --rm sidekey:latest --version
#   docker run --rm -v ./secrets:/etc/sidekey/secrets:ro -v sidekey-store:/var/lib/sidekey \
#       -p 8443:8443 sidekey:latest
#
# The runtime image has no shell, so there is no HEALTHCHECK here: probe
# GET https://<pod>:8443/healthz (liveness) and /readyz (readiness) from the
# orchestrator instead (see deploy/kubernetes/sidekey-sidecar.yaml and
# docs/operations.md). The admin listener stays on 127.0.0.1:8444.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build

# ring (TLS, Ed25519) needs only a C compiler, which the slim image has
# (gcc, libc6-dev); no cmake, no perl, no Go: aws-lc-rs is not in the graph.
WORKDIR /src

# Release binary without the debug info the release profile keeps
# (debug = 1 in Cargo.toml): symbols stay, so panics still name functions.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

COPY . .

# Cache mounts keep the registry and build tree between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin sidekey \
 && install -D -m 0755 target/release/sidekey /out/usr/local/bin/sidekey \
 && /out/usr/local/bin/sidekey --version

# Layout of the runtime filesystem, owned by distroless' nonroot user
# (65532): the store volume's mount point, and the secrets mount point.
RUN install -d -m 0700 -o 65532 -g 65532 /out/var/lib/sidekey \
 && install -d -m 0755 /out/etc/sidekey/secrets \
 && install -m 0644 deploy/config.production.toml /out/etc/sidekey/config.toml

# ---------------------------------------------------------------------------
# glibc, libgcc_s, CA certificates and /etc/passwd with nonroot; no shell.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="sidekey" \
      org.opencontainers.image.description="Per-user credential vault and tool-call proxy for ElevenLabs voice agents" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /out/ /

USER 65532:65532
WORKDIR /var/lib/sidekey

# sidekey's subcommands default to this config (rotate-key, backup, ...).
# MALLOC_ARENA_MAX=2: glibc otherwise gives each busy thread its own heap
# arena; under sustained load that alone took peak RSS from ~95 to ~130 MiB.
ENV SIDEKEY_CONFIG=/etc/sidekey/config.toml \
    SIDEKEY_LOG=info \
    MALLOC_ARENA_MAX=2

# Persistent state: the sled store (single writer: one container at a time).
VOLUME ["/var/lib/sidekey"]

# 8443: agent-facing HTTPS (ElevenLabs webhooks, OAuth callbacks, probes).
# 8444: admin API, bound to 127.0.0.1 in the shipped config: reachable only
#       from containers sharing this network namespace (the main app).
EXPOSE 8443 8444

# SIGTERM: stop accepting, drain for [server] shutdown_grace_secs, flush, exit 0.
STOPSIGNAL SIGTERM

# `docker run IMAGE` serves; `docker run IMAGE check-config --config ...`
# (or any other subcommand) replaces the arguments.
ENTRYPOINT ["/usr/local/bin/sidekey"]
CMD ["serve", "--config", "/etc/sidekey/config.toml", "--log-format", "json"]
