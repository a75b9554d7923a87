//! The `parley` binary: parse the command line, set up logging, hand over to `parley_node::cli`.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    parley_node::cli::dispatch(parley_node::cli::Cli::parse()).await
}
