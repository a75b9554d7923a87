//! The `parley` binary: choose the allocator, parse the command line, set up logging, hand over to
//! `parley_node::cli`.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's malloc. Why: a node allocates on one runtime thread and frees on
/// another all the time (a frame read here, handled there; a message stored by a shard, freed by
/// the sessions it was pushed to), which glibc serves through locked per-arena free lists. In
/// interleaved A/B runs of the durable benchmark, jemalloc took node CPU per message from
/// 116-126 µs to 101-108 µs (+8-10% msg/s) for ≈1.2 KB more RSS per idle session (20.7 → 21.9
/// KB); mimalloc saved as much CPU but cost ≈2 KB per session. BENCHMARKS.md, session 9.
/// (`--features system-alloc` leaves it out, for heap profilers that hook malloc.)
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
