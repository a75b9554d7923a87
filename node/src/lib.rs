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
pub mod conversation_cache;
pub mod drill;
pub mod error;
pub mod hub;
pub mod launcher;
pub mod outbound;
pub mod outbox;
pub mod presence;
pub mod push;
pub mod routing;
pub mod thumbnail;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parley_storage::{CacheOptions, GroupLayout, Layout, StoreConfig};
use ractor::Actor;

use crate::actors::root::{RootActor, RootArgs, RootMsg};
use crate::config::{Config, StorageConfig, StorageKind};
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

/// The store a `[storage]` table describes.
pub fn store_config(storage: &StorageConfig) -> anyhow::Result<StoreConfig> {
    Ok(match storage.kind {
        StorageKind::Embedded => StoreConfig::Embedded { dir: storage.dir.clone() },
        StorageKind::Postgres => StoreConfig::Postgres {
            url: storage.postgres_url.clone().context("postgres storage needs PARLEY_DATABASE_URL")?,
            pool_size: storage.pool_size,
            commit_slots: storage.commit_slots,
        },
    })
}

/// Where a node config puts every shard: the home `[storage]`, and each `[[shard_group]]` that
/// names its own store.
pub fn store_layout(config: &Config) -> anyhow::Result<Layout> {
    let mut layout = Layout::from(store_config(&config.storage)?);
    layout.home_redis = config.redis.url.clone();
    layout.cache = CacheOptions {
        capacity: config.redis.capacity,
        ttl_ms: config.redis.ttl_ms,
        op_timeout: Duration::from_millis(config.redis.op_timeout_ms),
        ..CacheOptions::default()
    };
    for g in &config.shard_groups {
        let store = match &g.storage {
            Some(s) => store_config(s).with_context(|| format!("shard_group `{}`", g.name))?,
            None => layout.home.clone(),
        };
        layout.groups.push(GroupLayout {
            name: g.name.clone(),
            first: g.shards[0],
            last: g.shards[1],
            store,
            redis: g.redis_url.clone(),
        });
    }
    Ok(layout)
}

/// "embedded", "postgres", or e.g. "embedded+postgres (3 stores)" when shard groups spread the
/// shards over several stores.
pub fn store_summary(layout: &Layout) -> String {
    let mut stores: Vec<&StoreConfig> = vec![&layout.home];
    for g in &layout.groups {
        if !stores.contains(&&g.store) {
            stores.push(&g.store);
        }
    }
    let mut kinds: Vec<&str> = stores.iter().map(|s| s.kind()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    match stores.len() {
        1 => kinds[0].to_string(),
        n => format!("{} ({n} stores)", kinds.join("+")),
    }
}

/// Run one node until `shutdown` resolves (or the actor tree fails), then drain: stop accepting,
/// close sessions, drain shards and release their leases, close the stores.
pub async fn run(config: Config, spec: NodeSpec, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let stores = parley_storage::open_layout(&store_layout(&config)?).await.context("opening the stores")?;
    tracing::info!(node = %spec.name, store = stores.kind(), shards = config.cluster.shard_count, "starting node");
    let ctx = NodeContext::new(config, spec.name.clone(), stores);
    ctx.push.init(&*ctx.stores.directory).await.context("loading the push notification key")?;
    let pusher = tokio::spawn(push::run(ctx.clone()));
    let presence_writer = {
        let (ctx, directory) = (ctx.clone(), ctx.stores.directory.clone());
        tokio::spawn(async move { ctx.presence.run_writer(directory).await })
    };
    let presence_refresher = {
        let (ctx, directory) = (ctx.clone(), ctx.stores.directory.clone());
        tokio::spawn(async move { ctx.presence.run_refresher(directory).await })
    };

    let listener = bind_http(spec.http).with_context(|| format!("binding {}", spec.http))?;
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
    // The sessions are gone: record when their users were last seen before the stores close.
    presence_writer.abort();
    presence_refresher.abort();
    pusher.abort();
    match tokio::time::timeout(Duration::from_secs(5), ctx.presence.write_pending(&*ctx.stores.directory)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "last-seen times not recorded at shutdown"),
        Err(_) => tracing::warn!("recording last-seen times at shutdown timed out"),
    }
    drop(ctx);
    tracing::info!("stopped");
    Ok(())
}

/// Backlog of the HTTP listener: a reconnect storm after a node dies (thousands of clients at
/// once) must queue, not be refused.
const HTTP_BACKLOG: u32 = 4096;

/// The HTTP/WebSocket listener, with TCP_NODELAY set on it. warp 0.4 gives no hook on accepted
/// sockets, but Linux copies TCP_NODELAY from a listening socket to the sockets it accepts; without
/// it, Nagle's algorithm holds small frames (acks, pushes) back for a round trip.
pub fn bind_http(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_BACKLOG)
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

#[cfg(test)]
mod tests {
    /// The accepted sockets inherit TCP_NODELAY from the listener (what `bind_http` relies on).
    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        let listener = super::bind_http("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "accepted socket must have TCP_NODELAY");
        assert!(!client.nodelay().unwrap(), "a plain client socket has it off (the check can fail)");
    }
}
