# One image for every node. Build: docker build -t parley .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p parley-node --bin parley

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/parley /usr/local/bin/parley
COPY ui /srv/parley/ui
COPY deploy/compose.cluster.toml /srv/parley/cluster.toml
WORKDIR /srv/parley
# Non-root: the server needs no privileges.
RUN useradd --system --home /srv/parley parley && mkdir -p /srv/parley/data && chown parley /srv/parley/data
USER parley
EXPOSE 8080 9080
ENTRYPOINT ["parley"]
CMD ["node", "--config", "/srv/parley/cluster.toml", "--name", "n1"]
