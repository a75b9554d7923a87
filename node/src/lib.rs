//! Parley node: the actors, the HTTP/WebSocket API, and the `parley` command line.
//!
//! Entry point: [`run`] starts one node (stores → actor tree → HTTP) and drains it when the
//! shutdown future resolves. `main.rs` only parses arguments and calls into [`cli`].
//! The map of the whole system is in `ARCHITECTURE.md` at the repository root.

pub mod actors;
pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod context;
pub mod drill;
pub mod error;
pub mod hub;
pub mod launcher;
pub mod routing;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parley_storage::StoreConfig;
use ractor::Actor;

use crate::actors::root::{RootActor, RootArgs, RootMsg};
use crate::config::{Config, StorageKind};
use crate::context::{call, NodeContext};

/// How long the whole drain (sessions, shards) may take before the process exits regardless.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);

/// Which node to run and where it listens (the config's entry, possibly overridden on the CLI).
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub http: SocketAddr,
    /// Node-to-node listen address.
    pub cluster: SocketAddr,
}

/// The store configuration a node config describes.
pub fn store_config(config: &Config) -> anyhow::Result<StoreConfig> {
    Ok(match config.storage.kind {
        StorageKind::Embedded => StoreConfig::Embedded { dir: config.storage.dir.clone() },
        StorageKind::Postgres => StoreConfig::Postgres {
            url: config.storage.postgres_url.clone().context("postgres storage needs PARLEY_DATABASE_URL")?,
            pool_size: config.storage.pool_size,
        },
    })
}

/// Run one node until `shutdown` resolves (or the actor tree fails), then drain: stop accepting,
/// close sessions, drain shards and release their leases, close the stores.
pub async fn run(config: Config, spec: NodeSpec, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let stores = parley_storage::open(&store_config(&config)?).await.context("opening the store")?;
    tracing::info!(node = %spec.name, store = stores.kind(), shards = config.cluster.shard_count, "starting node");
    let ctx = NodeContext::new(config, spec.name.clone(), stores);

    let listener = tokio::net::TcpListener::bind(spec.http).await.with_context(|| format!("binding {}", spec.http))?;
    let bound = listener.local_addr()?;
    ctx.set_http_addr(bound);
    let root_args = RootArgs { ctx: ctx.clone(), cluster_listen: spec.cluster };
    let (root, root_handle) = Actor::spawn(None, RootActor, root_args).await.context("starting the actor tree")?;
    let (agent, sessions) =
        call(&root, |reply| RootMsg::Children { reply }, Duration::from_secs(5), "root children").await?;

    let connections = Arc::new(api::ws::ConnectionCounter::default());
    let routes = api::routes(ctx.clone(), sessions, agent, connections);
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        warp::serve(routes)
            .incoming(listener)
            .graceful(async move {
                let _ = http_stopped.await;
            })
            .run(),
    );
    // Tests and `parley up` read this line to learn the address.
    tracing::info!(node = %spec.name, http = %bound, "listening");

    let mut root_handle = root_handle;
    let failed = tokio::select! {
        _ = shutdown => false,
        _ = &mut root_handle => true,
    };
    if failed {
        let _ = stop_http.send(());
        anyhow::bail!("the actor tree stopped unexpectedly");
    }
    tracing::info!("shutting down: draining sessions and shards");
    let drained = call(&root, |reply| RootMsg::Shutdown { reply }, DRAIN_DEADLINE, "drain").await;
    if let Err(e) = drained {
        tracing::warn!(error = %e, "drain did not complete");
    }
    let _ = stop_http.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), root_handle).await;
    drop(ctx);
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
