# The campaign-stats server: a multi-stage build, a small non-root runtime image.
#   docker build -t campaign-stats:0.1.0 .
# The Helm chart (helm/campaign-stats) runs this image.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The protos compile with protox (pure Rust): no protoc is needed.
COPY . .
RUN cargo build --release --locked --bin campaign-stats \
 && strip target/release/campaign-stats

FROM debian:bookworm-slim
# ca-certificates: TLS to PostgreSQL; `sleep` (coreutils) serves the pod's preStop hook.
# Unpinned on purpose: the distribution's current certificates and security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 stats \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin stats
COPY --from=build /src/target/release/campaign-stats /usr/local/bin/campaign-stats
USER 10001:10001
# gRPC and Prometheus metrics (the chart passes both addresses explicitly).
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/campaign-stats"]
CMD ["serve"]
