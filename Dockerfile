# One image with every flashsale binary; each Deployment (infra/k8s) runs
# one of them by its command. Not built in this project's CI (no registry
# for base images here): crates/testkit/tests/k8s.rs checks that it copies
# exactly the binaries `cargo build --release` makes and that the runtime
# stage has every library they link.
#
#   docker build -t flashsale:latest .

FROM rust:1.95-bookworm AS build
# librdkafka is built from source by rdkafka-sys (cmake); zlib for its gzip.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out/bin /out/lib \
 && cp target/release/gateway target/release/shop-worker \
       target/release/order-worker target/release/payment-stub \
       target/release/flashsale /out/bin/ \
 && cp "/lib/$(gcc -print-multiarch)/libz.so.1" /out/lib/

# glibc, libgcc and libm, no shell, no package manager; uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lib/ /usr/lib/
COPY --from=build /out/bin/ /usr/local/bin/
USER 65532:65532
# Each Deployment names its binary; alone, the image is the CLI.
ENTRYPOINT ["/usr/local/bin/flashsale"]
