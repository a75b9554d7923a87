//! The `parley` binary: tune the allocator, parse the command line, set up logging, hand over to
//! `parley_node::cli`.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    parley_node::pin_mmap_threshold();
    run()
}

#[tokio::main]
async fn run() -> std::process::ExitCode {
    // Logs go to stderr: stdout carries data (`status --json`, `drill --json`, `bench --json`).
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match parley_node::cli::dispatch(parley_node::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parley: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
