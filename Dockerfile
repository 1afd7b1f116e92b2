# Multi-stage build of a small static image running as non-root.
# (No Docker engine on the development machines: kept correct by review, not built in CI.)
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs && echo 'fn main() {}' > benches/verify.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl --bin apitoken-operator || true
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl --bin apitoken-operator \
 && cp target/x86_64-unknown-linux-musl/release/apitoken-operator /apitoken-operator

# distroless static: no shell, no package manager; uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /apitoken-operator /usr/local/bin/apitoken-operator
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/apitoken-operator"]
CMD ["run"]
