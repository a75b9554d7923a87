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
        /// Which `[[node]]` entry of the config to run.
        #[arg(long, default_value = "n1")]
        name: String,
        /// Override the entry's HTTP listen address.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Override the embedded store's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Run the parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node { config, name, http, data_dir } => {
            let mut config = Config::load(&config).with_context(|| format!("loading {}", config.display()))?;
            if let Some(dir) = data_dir {
                config.storage.dir = dir;
            }
            let entry = config.node(&name).with_context(|| format!("no [[node]] named `{name}` in the config"))?;
            let spec = NodeSpec { name: name.clone(), http: http.unwrap_or(entry.http), cluster: entry.cluster };
            crate::run(config, spec, crate::shutdown_signal()).await
        }
    }
}
