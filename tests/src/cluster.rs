//! A multi-node test cluster: separate `parley node` processes (through the product's own
//! `launcher`), a generated config with free loopback ports, a shared store and a cookie.

use std::time::Duration;

use anyhow::Context;
use parley_node::client::Client;
use parley_node::config::Config;
use parley_node::launcher::LocalCluster;

use crate::node::{parley_bin, Storage};
use crate::{free_port, TempDir};

/// A shard as one node's `/v1/cluster` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardEntry {
    pub shard: u16,
    pub owner: Option<String>,
    pub epoch: u64,
}

pub struct TestCluster {
    pub nodes: LocalCluster,
    pub config: Config,
    pub shard_count: u16,
    _dir: TempDir,
}

impl TestCluster {
    /// Write a config for `n` nodes (named n1..nN) and start the first `start` of them.
    pub async fn start(
        n: usize,
        start: usize,
        storage: &Storage,
        shard_count: u16,
        lease_ttl_ms: u64,
    ) -> anyhow::Result<TestCluster> {
        Self::start_with(n, start, storage, shard_count, lease_ttl_ms, "").await
    }

    /// [`TestCluster::start`] with `extra` TOML appended to the config (e.g. `[[shard_group]]`s).
    pub async fn start_with(
        n: usize,
        start: usize,
        storage: &Storage,
        shard_count: u16,
        lease_ttl_ms: u64,
        extra: &str,
    ) -> anyhow::Result<TestCluster> {
        let dir = TempDir::new("parley-cluster");
        let storage_toml = match storage {
            Storage::Embedded(path) => format!("kind = \"embedded\"\ndir = \"{}\"\n", path.display()),
            // Test databases have no password; a real deployment passes PARLEY_DATABASE_URL.
            Storage::Postgres(url) => format!("kind = \"postgres\"\npool_size = 4\npostgres_url = \"{url}\"\n"),
        };
        let mut text = format!(
            "[cluster]\nshard_count = {shard_count}\nlease_ttl_ms = {lease_ttl_ms}\nrenew_interval_ms = {}\n\n[storage]\n{storage_toml}\n",
            (lease_ttl_ms / 3).max(1)
        );
        text.push_str(extra);
        text.push('\n');
        for i in 1..=n {
            text.push_str(&format!(
                "[[node]]\nname = \"n{i}\"\nhttp = \"127.0.0.1:{}\"\ncluster = \"127.0.0.1:{}\"\n\n",
                free_port(),
                free_port()
            ));
        }
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, &text)?;
        let config = Config::from_toml(&text)?;
        let mut env = vec![
            ("PARLEY_COOKIE".to_string(), parley_node::launcher::random_cookie()),
            ("RUST_LOG".to_string(), "info,parley_node=debug".to_string()),
            ("PARLEY_BIN".to_string(), parley_bin()?.display().to_string()),
            ("PARLEY_UI_DIR".to_string(), crate::ui_dir().display().to_string()),
        ];
        if let Storage::Postgres(url) = storage {
            env.push(("PARLEY_DATABASE_URL".to_string(), url.clone()));
        }
        std::env::set_var("PARLEY_BIN", parley_bin()?);
        let mut nodes = LocalCluster::new(&path, &config, &dir.path().join("logs"), env)?;
        for i in 0..start {
            nodes.spawn(i)?;
        }
        for i in 0..start {
            nodes.nodes[i].wait_ready(parley_node::launcher::READY_TIMEOUT).await?;
        }
        let cluster = TestCluster { nodes, config, shard_count, _dir: dir };
        cluster
            .wait_converged(&(0..start).collect::<Vec<_>>(), Duration::from_secs(30))
            .await
            .context("cluster did not converge")?;
        Ok(cluster)
    }

    pub fn client(&self, i: usize) -> Client {
        self.nodes.nodes[i].client()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes.nodes[i].name
    }

    /// The shard map as node `via` sees it.
    pub async fn shard_map(&self, via: usize) -> anyhow::Result<Vec<ShardEntry>> {
        let (status, body) = self.client(via).raw("GET", "/v1/cluster", None, None).await?;
        anyhow::ensure!(status == 200, "GET /v1/cluster: {status}");
        Ok(body["shards"]
            .as_array()
            .context("shards")?
            .iter()
            .map(|s| ShardEntry {
                shard: s["shard_id"].as_u64().unwrap_or(0) as u16,
                owner: s["owner"].as_str().map(String::from),
                epoch: s["epoch"].as_u64().unwrap_or(0),
            })
            .collect())
    }

    /// Wait until every running node in `live` routes every shard to a node in `live`, and all
    /// agree. Returns the agreed map.
    pub async fn wait_converged(&self, live: &[usize], timeout: Duration) -> anyhow::Result<Vec<ShardEntry>> {
        let names: Vec<&str> = live.iter().map(|i| self.name(*i)).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut maps = Vec::new();
            for i in live {
                maps.push(self.shard_map(*i).await.unwrap_or_default());
            }
            let ok = maps.iter().all(|m| {
                m.len() == self.shard_count as usize
                    && m.iter().all(|s| s.owner.as_deref().is_some_and(|o| names.contains(&o)))
            }) && maps.windows(2).all(|w| w[0] == w[1]);
            if ok {
                return Ok(maps.remove(0));
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("not converged after {timeout:?}: {:?}", maps.first());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node index serving `shard` according to `map`.
    pub fn owner_index(&self, map: &[ShardEntry], shard: u16) -> Option<usize> {
        let owner = map.iter().find(|s| s.shard == shard)?.owner.clone()?;
        self.nodes.nodes.iter().position(|n| n.name == owner)
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes.nodes[i].log_path()).unwrap_or_default()
    }
}
