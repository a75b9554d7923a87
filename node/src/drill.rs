//! `parley drill` (being written).

/// Options of `parley drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Cluster configuration whose nodes the drill starts.
    #[arg(long, default_value = "cluster.toml")]
    pub config: std::path::PathBuf,
}

pub async fn run(_args: DrillArgs) -> anyhow::Result<()> {
    anyhow::bail!("parley drill is not implemented yet")
}
