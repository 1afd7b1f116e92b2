# syntax=docker/dockerfile:1
# Multi-stage build of a small static image running as non-root, for amd64 and arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/apitoken-operator:TAG --push .
# Each platform compiles natively (under QEMU emulation when it is not the builder's own), so no
# cross linker is needed; a plain `docker build .` builds for the builder's architecture.
# (No Docker engine on the development machines: kept correct by review, not built in CI;
# `make image` (hack/image) builds an image that starts the same way into an OCI archive without
# one: same entrypoint, command, user, working directory, environment and CA bundle, with a
# static glibc binary because the musl target cannot be installed there.)
FROM rust:1.95-bookworm AS build
# Set by BuildKit for the platform being built; empty with the legacy builder (then: this machine).
ARG TARGETARCH
RUN set -eu; \
    arch="${TARGETARCH:-$(dpkg --print-architecture)}"; \
    case "$arch" in \
      amd64) target=x86_64-unknown-linux-musl ;; \
      arm64) target=aarch64-unknown-linux-musl ;; \
      *) echo "unsupported architecture '$arch': build for linux/amd64 or linux/arm64" >&2; exit 1 ;; \
    esac; \
    echo "$target" > /rust-target; \
    apt-get update; \
    apt-get install -y --no-install-recommends musl-tools; \
    rm -rf /var/lib/apt/lists/*; \
    rustup target add "$target"
WORKDIR /src
# Dependencies first, so source edits do not rebuild them: compile them against stub targets.
# Every target Cargo.toml names needs a stub here, or cargo refuses the manifest and this step
# fails (loudly: a missing stub must not silently turn into an uncached build).
COPY Cargo.toml Cargo.lock ./
RUN set -eu; \
    mkdir -p src/bin benches; \
    echo 'fn main() {}' > src/main.rs; \
    : > src/lib.rs; \
    echo 'fn main() {}' > src/bin/kubectl-apitoken.rs; \
    echo 'fn main() {}' > benches/verify.rs; \
    echo 'fn main() {}' > benches/scale.rs; \
    cargo build --release --locked --target "$(cat /rust-target)" --bin apitoken-operator; \
    rm -rf src benches
COPY src ./src
COPY benches ./benches
# touch: the stubs' build outputs are newer than the real sources' checkout times.
RUN set -eu; \
    touch src/main.rs src/lib.rs; \
    target="$(cat /rust-target)"; \
    cargo build --release --locked --target "$target" --bin apitoken-operator; \
    cp "target/$target/release/apitoken-operator" /apitoken-operator; \
    /apitoken-operator version

# distroless static: no shell, no package manager; uid/gid 65532 ("nonroot"). The chart drains
# through the binary on SIGTERM (--shutdown-delay), so no preStop hook needs a shell.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /apitoken-operator /usr/local/bin/apitoken-operator
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/apitoken-operator"]
CMD ["run"]
