//! The node's one configuration struct: read from `cluster.toml`, then overridden from the
//! environment (`PARLEY_*`), then checked. Secrets (the cluster cookie, database passwords) come
//! only from the environment or a file named by it, never from the committed TOML.
//!
//! Every field has a default so that an empty file (or none) gives a working single node on the
//! embedded store; `Config::for_test()` gives the same with test-friendly values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything a node (and the `up`/`drill`/`status` tools) needs to know.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub cluster: ClusterConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    /// Directory of the browser UI served at `/`. Relative paths are resolved against the config
    /// file's directory.
    pub ui_dir: PathBuf,
    /// The nodes of the cluster. `parley node --name X` runs the entry named X.
    #[serde(rename = "node")]
    pub nodes: Vec<NodeEntry>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Number of logical shards. Fixed for the life of a deployment: changing it moves every
    /// conversation. 64 gives an even spread over up to ~16 nodes.
    pub shard_count: u16,
    /// How long a shard lease lasts without renewal. A frozen (SIGSTOPped) owner is replaced after
    /// at most this long; a killed one at once (its session lock is released by the OS/database).
    pub lease_ttl_ms: u64,
    /// How often leases are renewed. A third of the TTL leaves two retries before expiry.
    pub renew_interval_ms: u64,
    /// Shared secret nodes present to each other. Only from `PARLEY_COOKIE` or the file named by
    /// `PARLEY_COOKIE_FILE`; never written in the TOML.
    #[serde(skip)]
    pub cookie: Option<String>,
}

/// Which store backs the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// SQLite files under `storage.dir`; zero setup; shareable by the nodes of one machine.
    Embedded,
    /// Postgres at `PARLEY_DATABASE_URL` (or `storage.postgres_url` without a password).
    Postgres,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub kind: StorageKind,
    /// Data directory of the embedded store (relative to the config file).
    pub dir: PathBuf,
    /// Postgres URL. Prefer `PARLEY_DATABASE_URL` so that passwords stay out of the file.
    pub postgres_url: Option<String>,
    /// Postgres connections per node. Each shard's writes are serial, so a handful of connections
    /// serve all shards of a node; reads use the rest.
    pub pool_size: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// WebSocket connections a node accepts at once; more are refused with 503. The default sits
    /// under the 20,000 open files a process may have on our machines.
    pub max_connections: usize,
    /// Frames queued for one client before it counts as a slow consumer and is disconnected
    /// (chat messages are never dropped to make room; typing/presence may be).
    pub outbox_frames: usize,
    /// A connection must authenticate (`hello`) within this time.
    pub hello_timeout_ms: u64,
    /// A connection that sends nothing (not even a ping) for this long is closed. The server pings
    /// every third of it, so a live browser always answers in time.
    pub idle_timeout_ms: u64,
    /// How long a session waits for a shard to answer before telling the client `unavailable`
    /// (outcome unknown: retry with the same client_msg_id).
    pub shard_call_timeout_ms: u64,
    /// Largest batch one store transaction commits. Bounds transaction time and memory.
    pub max_batch: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lifetime of a bearer token.
    pub token_ttl_secs: u64,
}

/// One node of the cluster.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub name: String,
    /// HTTP + WebSocket listen address.
    pub http: SocketAddr,
    /// Node-to-node (ractor_cluster) listen address. The node listens only here.
    pub cluster: SocketAddr,
    /// `host:port` peers dial to reach this node, when it differs from `cluster` (containers:
    /// listen on 0.0.0.0, advertise the service name). Defaults to `cluster`.
    #[serde(default)]
    pub advertise: Option<String>,
}

impl NodeEntry {
    /// Where peers dial this node.
    pub fn dial_address(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.cluster.to_string())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster: ClusterConfig::default(),
            storage: StorageConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            ui_dir: PathBuf::from("ui"),
            nodes: vec![NodeEntry {
                name: "n1".into(),
                http: "127.0.0.1:8080".parse().expect("literal address"),
                cluster: "127.0.0.1:9080".parse().expect("literal address"),
                advertise: None,
            }],
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { shard_count: 64, lease_ttl_ms: 3_000, renew_interval_ms: 1_000, cookie: None }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { kind: StorageKind::Embedded, dir: PathBuf::from("data"), postgres_url: None, pool_size: 16 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 19_000,
            outbox_frames: 1_024,
            hello_timeout_ms: 10_000,
            idle_timeout_ms: 90_000,
            shard_call_timeout_ms: 10_000,
            max_batch: 1_000,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { token_ttl_secs: 7 * 24 * 3600 }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("environment variable {name}: {reason}")]
    Env { name: &'static str, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Read `path` (missing file = defaults), apply `PARLEY_*` overrides, resolve relative paths
    /// against the file's directory, and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<Config>(&text)
                .map_err(|e| ConfigError::Parse { path: path.into(), source: Box::new(e) })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(ConfigError::Read { path: path.into(), source: e }),
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.apply_env(|name| std::env::var(name).ok())?;
        config.resolve_paths(&base);
        config.validate()?;
        Ok(config)
    }

    /// Parse from a TOML string without touching the environment (tests, tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: "<string>".into(), source: Box::new(e) })?;
        config.validate()?;
        Ok(config)
    }

    /// A single node on an embedded store in `dir`, with short timeouts for tests.
    pub fn for_test(dir: &Path) -> Config {
        let mut c = Config::default();
        c.storage.dir = dir.to_path_buf();
        c.limits.hello_timeout_ms = 2_000;
        c
    }

    /// Environment overrides. Documented in README.md ("Configuration").
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &'static str, v: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Env { name, reason: e.to_string() })
        }
        if let Some(v) = get("PARLEY_STORAGE") {
            self.storage.kind = match v.as_str() {
                "embedded" => StorageKind::Embedded,
                "postgres" => StorageKind::Postgres,
                other => {
                    return Err(ConfigError::Env {
                        name: "PARLEY_STORAGE",
                        reason: format!("`{other}` is neither `embedded` nor `postgres`"),
                    })
                }
            };
        }
        if let Some(v) = get("PARLEY_DATA_DIR") {
            self.storage.dir = PathBuf::from(v);
        }
        let url_from_file = match get("PARLEY_DATABASE_URL_FILE") {
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError::Env { name: "PARLEY_DATABASE_URL_FILE", reason: e.to_string() })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        if let Some(v) = get("PARLEY_DATABASE_URL").or(url_from_file) {
            self.storage.postgres_url = Some(v);
            if get("PARLEY_STORAGE").is_none() {
                self.storage.kind = StorageKind::Postgres;
            }
        }
        if let Some(v) = get("PARLEY_SHARD_COUNT") {
            self.cluster.shard_count = parse("PARLEY_SHARD_COUNT", v)?;
        }
        if let Some(v) = get("PARLEY_LEASE_TTL_MS") {
            self.cluster.lease_ttl_ms = parse("PARLEY_LEASE_TTL_MS", v)?;
        }
        if let Some(v) = get("PARLEY_MAX_CONNECTIONS") {
            self.limits.max_connections = parse("PARLEY_MAX_CONNECTIONS", v)?;
        }
        if let Some(v) = get("PARLEY_UI_DIR") {
            self.ui_dir = PathBuf::from(v);
        }
        if let Some(v) = get("PARLEY_COOKIE") {
            self.cluster.cookie = Some(v);
        } else if let Some(path) = get("PARLEY_COOKIE_FILE") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::Env { name: "PARLEY_COOKIE_FILE", reason: e.to_string() })?;
            self.cluster.cookie = Some(text.trim().to_string());
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.storage.dir.is_relative() {
            self.storage.dir = base.join(&self.storage.dir);
        }
        if self.ui_dir.is_relative() {
            self.ui_dir = base.join(&self.ui_dir);
        }
    }

    /// Reject values that would make the node misbehave rather than fail.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.cluster.shard_count == 0 || self.cluster.shard_count > 4096 {
            return bad("cluster.shard_count must be in 1..=4096");
        }
        if self.cluster.renew_interval_ms == 0 || self.cluster.renew_interval_ms * 2 > self.cluster.lease_ttl_ms {
            return bad("cluster.renew_interval_ms must be positive and at most half of lease_ttl_ms");
        }
        if self.limits.outbox_frames < 16 {
            return bad("limits.outbox_frames must be at least 16");
        }
        if self.limits.max_batch == 0 {
            return bad("limits.max_batch must be positive");
        }
        if self.storage.kind == StorageKind::Postgres && self.storage.postgres_url.is_none() {
            return bad("storage.kind = postgres needs PARLEY_DATABASE_URL (or storage.postgres_url)");
        }
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort();
        names.dedup();
        if names.len() != self.nodes.len() {
            return bad("node names must be unique");
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_and_validation() {
        let mut c = Config::default();
        let env = |k: &str| match k {
            "PARLEY_DATABASE_URL" => Some("postgres://x@127.0.0.1/db".to_string()),
            "PARLEY_SHARD_COUNT" => Some("8".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        assert_eq!(c.storage.kind, StorageKind::Postgres);
        assert_eq!(c.cluster.shard_count, 8);
        c.validate().unwrap();

        let mut c = Config::default();
        let err = c.apply_env(|k| (k == "PARLEY_SHARD_COUNT").then(|| "lots".to_string()));
        assert!(err.is_err());

        assert!(Config::from_toml("[cluster]\nshard_count = 0\n").is_err());
        assert!(Config::from_toml("[cluster]\nbogus = 1\n").is_err());
        assert!(Config::from_toml("[storage]\nkind = \"postgres\"\n").is_err());
    }

    #[test]
    fn committed_cluster_toml_parses() {
        let text = include_str!("../../cluster.toml");
        let c = Config::from_toml(text).unwrap();
        assert!(c.nodes.len() >= 3);
        assert!(c.cluster.cookie.is_none());
    }
}
