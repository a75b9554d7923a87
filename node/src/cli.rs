//! The `parley` command line: argument definitions and dispatch to the subcommands.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::NodeSpec;

#[derive(Debug, Parser)]
#[command(name = "parley", version, about = "Parley: a clustered chat server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node.
    Node {
        /// Cluster configuration file (missing = defaults: one node, embedded store).
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        /// Which `[[node]]` entry of the config to run. A name the config does not list joins
        /// through `cluster.seeds` and needs `--http` and `--cluster`.
        #[arg(long, default_value = "n1")]
        name: String,
        /// Override the entry's HTTP listen address.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Override the entry's node-to-node listen address.
        #[arg(long)]
        cluster: Option<SocketAddr>,
        /// `host:port` peers dial to reach this node, when it differs from `--cluster`.
        #[arg(long)]
        advertise: Option<String>,
        /// `host:port` browsers and tools reach this node's HTTP at, when it differs from `--http`.
        #[arg(long)]
        advertise_http: Option<String>,
        /// Override the embedded store's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Start every `[[node]]` of the config as a local child process; Ctrl-C stops them all.
    Up {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        /// Where the nodes' logs go.
        #[arg(long, default_value = "data/logs")]
        log_dir: PathBuf,
    },
    /// Run simulated clients against a local cluster while killing and freezing nodes, then check
    /// that nothing acknowledged was lost, duplicated or reordered.
    Drill(crate::drill::DrillArgs),
    /// Benchmark a local cluster (throughput, latency, sessions, failover, history) against a
    /// bare WebSocket relay, from separate load processes; see BENCHMARKS.md.
    Bench(crate::bench::BenchArgs),
    /// One load process of `parley bench` (started by it).
    #[command(hide = true)]
    BenchLoad(crate::bench::LoadArgs),
    /// The bare WebSocket relay `parley bench` compares against (started by it).
    #[command(hide = true)]
    Relay(crate::bench::RelayArgs),
    /// Show a cluster's members and shard map (owner and epoch per shard).
    Status {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        /// Ask this node (http://host:port) instead of the config's nodes.
        #[arg(long)]
        node: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run the parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node { config, name, http, cluster, advertise, advertise_http, data_dir } => {
            let mut config = Config::load(&config).with_context(|| format!("loading {}", config.display()))?;
            if let Some(dir) = data_dir {
                config.storage.dir = dir;
            }
            let entry = config.join_as(&name, http, cluster, advertise, advertise_http)?;
            let spec = NodeSpec { name: name.clone(), http: entry.http, cluster: entry.cluster };
            crate::run(config, spec, crate::shutdown_signal()).await
        }
        Command::Up { config: path, log_dir } => up(&path, &log_dir).await,
        Command::Drill(args) => crate::drill::run(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::BenchLoad(args) => on_own_thread(move || crate::bench::run_load_blocking(args)).await,
        Command::Relay(args) => on_own_thread(move || crate::bench::run_relay_blocking(args)).await,
        Command::Status { config, node, json } => status(&config, node, json).await,
    }
}

/// Run `f` (which builds its own single-threaded runtime) on a plain thread: a runtime cannot be
/// started from a thread that already belongs to one.
async fn on_own_thread(f: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<()> {
    let thread = std::thread::spawn(f);
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the worker thread panicked"))?
}

async fn up(path: &std::path::Path, log_dir: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path).with_context(|| format!("loading {}", path.display()))?;
    let mut env = Vec::new();
    if config.cluster.cookie.is_none() {
        // A fresh secret per launch, handed to the children only through their environment.
        env.push(("PARLEY_COOKIE".to_string(), crate::launcher::random_cookie()));
    }
    let mut cluster = crate::launcher::LocalCluster::new(path, &config, log_dir, env)?;
    println!(
        "starting {} nodes ({} store); logs in {}",
        cluster.nodes.len(),
        crate::store_summary(&crate::store_layout(&config)?),
        log_dir.display()
    );
    cluster.start_all().await?;
    for n in &cluster.nodes {
        println!("  {:<6} http://{}/  (ws://{}/v1/ws)  pid {}", n.name, n.http, n.http, n.pid().unwrap_or(0));
    }
    println!("ready; Ctrl-C stops the cluster");
    crate::shutdown_signal().await;
    println!("stopping…");
    cluster.stop_all().await;
    Ok(())
}

async fn status(path: &std::path::Path, node: Option<String>, json: bool) -> anyhow::Result<()> {
    let urls: Vec<String> = match node {
        Some(u) => vec![u],
        None => {
            let config = Config::load(path).with_context(|| format!("loading {}", path.display()))?;
            config.nodes.iter().map(|n| format!("http://{}", n.http)).collect()
        }
    };
    let mut last_err = None;
    for url in &urls {
        match crate::client::Client::new(url.clone()).raw("GET", "/v1/cluster", None, None).await {
            Ok((200, body)) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&body)?);
                } else {
                    print_status(url, &body);
                }
                return Ok(());
            }
            Ok((code, body)) => last_err = Some(anyhow::anyhow!("{url}: HTTP {code}: {body}")),
            Err(e) => last_err = Some(anyhow::anyhow!("{url}: {e}")),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no node to ask")))
}

fn print_status(url: &str, body: &serde_json::Value) {
    println!("asked {url} (node {})", body["node"].as_str().unwrap_or("?"));
    println!("\nMEMBER  ALIVE  LAST SEEN  HTTP                 BOOT");
    for m in body["members"].as_array().into_iter().flatten() {
        println!(
            "{:<7} {:<6} {:>7}ms  {:<20} {}",
            m["node"].as_str().unwrap_or("?"),
            m["alive"].as_bool().unwrap_or(false),
            m["last_seen_ms_ago"].as_u64().unwrap_or(0),
            m["http"].as_str().unwrap_or(""),
            m["boot_id"].as_str().unwrap_or(""),
        );
    }
    let shards = body["shards"].as_array().cloned().unwrap_or_default();
    let served = shards.iter().filter(|s| s["status"] == "healthy").count();
    println!(
        "\nSHARDS  {served}/{} served   sessions here: {}   redirects here: {}",
        shards.len(),
        body["sessions"],
        body["redirects"]
    );
    println!("SHARD  OWNER   EPOCH  GROUP");
    for s in &shards {
        println!(
            "{:>5}  {:<7} {:>5}  {}",
            s["shard_id"],
            s["owner"].as_str().unwrap_or("-"),
            s["epoch"],
            s["group"].as_str().unwrap_or("home")
        );
    }
}
