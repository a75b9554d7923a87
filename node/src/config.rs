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
    /// The home store: users, tokens and conversation membership, plus every shard no
    /// `[[shard_group]]` claims.
    pub storage: StorageConfig,
    /// The Redis recent-history cache of the shards no `[[shard_group]]` claims (and its limits,
    /// which every group shares).
    pub redis: RedisConfig,
    /// Groups of shards with their own store and/or Redis, so that one deployment can spread
    /// its conversations over several databases. Shards not in any group use `[storage]` and
    /// `[redis]`.
    #[serde(rename = "shard_group")]
    pub shard_groups: Vec<ShardGroupConfig>,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    /// Web Push notifications to users who are offline (`node/src/push.rs`).
    pub push: PushConfig,
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
    /// `host:port` cluster addresses a node dials to join when the other nodes do not list it:
    /// a node started with `parley node --name NEW --http .. --cluster ..` contacts the seeds and
    /// learns the rest of the cluster from them by gossip. Nodes listed in `[[node]]` are dialled
    /// anyway; seeds are for the ones that are not.
    pub seeds: Vec<String>,
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
    /// Postgres connections per node for reads and accounts (the group commits have their own,
    /// `commit_slots` more, and the leases theirs: `parley_storage::pg::LEASE_POOL_SIZE` more plus
    /// one for the session locks, so that reads can never hold up a lease's renewal).
    pub pool_size: usize,
    /// Postgres group commits a node keeps in flight (1..=pool_size), each on a connection of its
    /// own (so a node opens at most `pool_size + commit_slots + 3`). Fewer make larger groups and cost
    /// the database less CPU per message; see `parley_storage::DEFAULT_COMMIT_SLOTS`.
    pub commit_slots: usize,
}

/// The optional Redis cache of each shard's most recent messages (see
/// `parley_storage::cache`). Redis is never the source of truth: without it, or while it is down,
/// reads go to the store and give the same answers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db` of the shards outside every group; none = no cache. Prefer
    /// `PARLEY_REDIS_URL` when the URL carries a password.
    pub url: Option<String>,
    /// Most recent messages kept per conversation (a page of history inside them is a hit);
    /// 1..=1000.
    pub capacity: u32,
    /// Every cached key expires after this long without writes, which bounds Redis memory to the
    /// conversations active within it. At least 60 s (a fill must never outlive its guard key).
    pub ttl_ms: u64,
    /// Longest a cache operation may take before the node gives up on it (and reads the store).
    pub op_timeout_ms: u64,
}

/// A group of shards with its own store and/or Redis.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardGroupConfig {
    /// Names the group in logs and `parley status`, and in its environment overrides
    /// (`PARLEY_DATABASE_URL_<NAME>`, `PARLEY_REDIS_URL_<NAME>`, upper-cased).
    pub name: String,
    /// First and last shard of the group, inclusive.
    pub shards: [u16; 2],
    /// The group's store; omitted = the home store (`[storage]`).
    #[serde(default)]
    pub storage: Option<StorageConfig>,
    /// The group's Redis cache; omitted = no cache for these shards.
    #[serde(default)]
    pub redis_url: Option<String>,
}

impl ShardGroupConfig {
    pub fn contains(&self, shard: u16) -> bool {
        (self.shards[0]..=self.shards[1]).contains(&shard)
    }

    /// The group's name as used in environment variable names.
    fn env_suffix(&self) -> String {
        self.name.to_ascii_uppercase().replace('-', "_")
    }
}

/// The shortest `limits.idle_timeout_ms`: the server pings every third of it.
pub const MIN_IDLE_TIMEOUT_MS: u64 = 300;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// WebSocket connections a node accepts at once; more are refused with 503. The default sits
    /// under the 20,000 open files a process may have on our machines.
    pub max_connections: usize,
    /// Frames queued for one client before it counts as a slow consumer and is disconnected
    /// (chat messages are never dropped to make room; typing/presence may be).
    pub outbox_frames: usize,
    /// Frames of one connection the node holds at once: read but not yet handled, or sends
    /// waiting for their commit. At the limit the node stops reading that socket until one is
    /// answered, so TCP pushes back on a client that sends faster than the cluster stores, instead
    /// of the node buffering without bound (and starving its own control plane — heartbeats,
    /// lease renewals — behind the backlog). Nothing is refused.
    pub max_in_flight_per_connection: usize,
    /// A connection must authenticate (`hello`) within this time.
    pub hello_timeout_ms: u64,
    /// A connection that sends nothing (not even a ping) for this long is closed. The server pings
    /// every third of it, so a live browser always answers in time. At least
    /// [`MIN_IDLE_TIMEOUT_MS`]: a third of 0 is no ping interval at all.
    pub idle_timeout_ms: u64,
    /// How long a client may take to read its reconnect sync. The sync waits for the client instead
    /// of filling its outbox (`Outbox::push_paced`), and the session handles nothing else meanwhile
    /// (events for it wait in its mailbox): past this, the client is closed as a slow consumer
    /// (4008) and resumes from its delivered cursor when it reconnects.
    pub sync_timeout_ms: u64,
    /// How long a session waits for a shard to answer before telling the client `unavailable`
    /// (outcome unknown: retry with the same client_msg_id).
    pub shard_call_timeout_ms: u64,
    /// Largest batch one store transaction commits. Bounds transaction time and memory.
    pub max_batch: usize,
    /// Bytes of uploads one user may have stored at once (`DEFAULT_MEDIA_QUOTA_BYTES`, 1 GiB).
    /// An upload past it is refused (`413 media_quota_exceeded`) before its body is read when the
    /// declared length already does not fit, and atomically at the store otherwise; deleting
    /// uploads frees room. 0 turns uploads off. Nodes sharing a store should agree on it (each
    /// checks its own).
    pub media_quota_bytes: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lifetime of a bearer token.
    pub token_ttl_secs: u64,
}

/// Web Push notifications (RFC 8030) for users who are offline everywhere in the cluster.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Off: nothing is sent and `/v1/push/*` answers `not_found` (`PARLEY_PUSH_ENABLED`).
    pub enabled: bool,
    /// How push services can reach the operator: the VAPID `sub` claim, a `mailto:` or `https:`
    /// URL. Some push services refuse traffic without a reachable one; set it in production.
    pub contact: String,
    /// The push services this node will send to, as origins (`https://fcm.googleapis.com`) or
    /// `https://*.suffix` for any host under a domain. A subscription to any other endpoint is
    /// refused at registration: the node POSTs to whatever URL a subscription names, so an open
    /// list would let any user aim the node's requests into its own network. The default covers
    /// Chrome/Edge/Opera (FCM), Firefox (Mozilla), Safari (Apple) and Windows (WNS);
    /// `PARLEY_PUSH_ALLOWED_ENDPOINTS` (comma-separated) replaces it.
    pub allowed_endpoints: Vec<String>,
    /// How long a push service keeps a notification for a device that is off (`TTL`), seconds.
    pub ttl_secs: u64,
    /// Put the start of the message text in notifications (encrypted end to end; the push service
    /// cannot read it). Off: only who wrote, in which chat (`PARLEY_PUSH_PREVIEW`).
    pub preview: bool,
    /// Conversations with a notification waiting, per node (one entry per user and conversation,
    /// however many messages it stands for). Past it, notifications are dropped and counted.
    pub queue_max: usize,
    /// Requests to push services a node has in flight at once.
    pub concurrency: usize,
    /// Longest a request to a push service may take.
    pub request_timeout_ms: u64,
    /// The VAPID private key (a P-256 scalar, base64url), only from `PARLEY_PUSH_VAPID_KEY` or the
    /// file named by `PARLEY_PUSH_VAPID_KEY_FILE`. Unset: the cluster's own key, generated by the
    /// first node and kept in the directory. Every node must sign with the same key (browsers
    /// subscribe to one), so set it on all or none.
    #[serde(skip)]
    pub vapid_private_key: Option<String>,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            contact: "mailto:parley@localhost".into(),
            allowed_endpoints: vec![
                "https://fcm.googleapis.com".into(),
                "https://updates.push.services.mozilla.com".into(),
                "https://*.push.apple.com".into(),
                "https://*.notify.windows.com".into(),
            ],
            ttl_secs: 24 * 3600,
            preview: true,
            queue_max: 100_000,
            concurrency: 32,
            request_timeout_ms: 10_000,
            vapid_private_key: None,
        }
    }
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
    /// `host:port` where browsers and tools reach this node's HTTP, when it differs from `http`:
    /// a node listening on `0.0.0.0`, or in a container whose port is published as another one.
    /// `/v1/cluster` lists it for every member, and the browser UI fails over to it. Defaults to
    /// the address `http` is bound to.
    #[serde(default)]
    pub advertise_http: Option<String>,
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
            redis: RedisConfig::default(),
            shard_groups: Vec::new(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            push: PushConfig::default(),
            ui_dir: PathBuf::from("ui"),
            nodes: vec![NodeEntry {
                name: "n1".into(),
                http: "127.0.0.1:8080".parse().expect("literal address"),
                cluster: "127.0.0.1:9080".parse().expect("literal address"),
                advertise: None,
                advertise_http: None,
            }],
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            shard_count: 64,
            lease_ttl_ms: 3_000,
            renew_interval_ms: 1_000,
            seeds: Vec::new(),
            cookie: None,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::Embedded,
            dir: PathBuf::from("data"),
            postgres_url: None,
            pool_size: 16,
            commit_slots: parley_storage::DEFAULT_COMMIT_SLOTS,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig { url: None, capacity: 200, ttl_ms: 3_600_000, op_timeout_ms: 250 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 19_000,
            outbox_frames: 1_024,
            max_in_flight_per_connection: 64,
            hello_timeout_ms: 10_000,
            idle_timeout_ms: 90_000,
            sync_timeout_ms: 60_000,
            shard_call_timeout_ms: 10_000,
            max_batch: 1_000,
            media_quota_bytes: parley_protocol::limits::DEFAULT_MEDIA_QUOTA_BYTES,
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
        if let Some(v) = get("PARLEY_SEEDS") {
            self.cluster.seeds = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
        if let Some(v) = get("PARLEY_REDIS_URL") {
            self.redis.url = Some(v);
        }
        for group in &mut self.shard_groups {
            let suffix = group.env_suffix();
            if let Some(v) = get(&format!("PARLEY_DATABASE_URL_{suffix}")) {
                let storage =
                    group.storage.get_or_insert_with(|| StorageConfig { dir: PathBuf::new(), ..Default::default() });
                storage.kind = StorageKind::Postgres;
                storage.postgres_url = Some(v);
            }
            if let Some(v) = get(&format!("PARLEY_REDIS_URL_{suffix}")) {
                group.redis_url = Some(v);
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
        if let Some(v) = get("PARLEY_MAX_IN_FLIGHT_PER_CONNECTION") {
            self.limits.max_in_flight_per_connection = parse("PARLEY_MAX_IN_FLIGHT_PER_CONNECTION", v)?;
        }
        if let Some(v) = get("PARLEY_UI_DIR") {
            self.ui_dir = PathBuf::from(v);
        }
        if let Some(v) = get("PARLEY_PUSH_ENABLED") {
            self.push.enabled = parse("PARLEY_PUSH_ENABLED", v)?;
        }
        if let Some(v) = get("PARLEY_PUSH_PREVIEW") {
            self.push.preview = parse("PARLEY_PUSH_PREVIEW", v)?;
        }
        if let Some(v) = get("PARLEY_PUSH_ALLOWED_ENDPOINTS") {
            self.push.allowed_endpoints =
                v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
        if let Some(v) = get("PARLEY_PUSH_VAPID_KEY") {
            self.push.vapid_private_key = Some(v.trim().to_string());
        } else if let Some(path) = get("PARLEY_PUSH_VAPID_KEY_FILE") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::Env { name: "PARLEY_PUSH_VAPID_KEY_FILE", reason: e.to_string() })?;
            self.push.vapid_private_key = Some(text.trim().to_string());
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
        for group in &mut self.shard_groups {
            if let Some(storage) = group.storage.as_mut().filter(|s| s.dir.is_relative()) {
                storage.dir = base.join(&storage.dir);
            }
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
        if self.limits.idle_timeout_ms < MIN_IDLE_TIMEOUT_MS {
            return bad(&format!(
                "limits.idle_timeout_ms must be at least {MIN_IDLE_TIMEOUT_MS} (the server pings every third of it)"
            ));
        }
        if self.limits.sync_timeout_ms == 0 {
            return bad("limits.sync_timeout_ms must be positive");
        }
        if self.limits.outbox_frames < 16 {
            return bad("limits.outbox_frames must be at least 16");
        }
        if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&self.limits.max_in_flight_per_connection) {
            return bad("limits.max_in_flight_per_connection must be positive");
        }
        if self.limits.max_batch == 0 {
            return bad("limits.max_batch must be positive");
        }
        if self.push.enabled {
            if self.push.queue_max == 0 || self.push.concurrency == 0 || self.push.request_timeout_ms == 0 {
                return bad("push.queue_max, push.concurrency and push.request_timeout_ms must be positive");
            }
            if self.push.ttl_secs > 28 * 24 * 3600 {
                return bad("push.ttl_secs must be at most 28 days (what push services keep)");
            }
            if !(self.push.contact.starts_with("mailto:") || self.push.contact.starts_with("https://")) {
                return bad("push.contact must be a mailto: or https: URL");
            }
            for allowed in &self.push.allowed_endpoints {
                let origin = allowed.trim_end_matches('/').replace("://*.", "://");
                if parley_protocol::push::endpoint_origin(&origin).ok().as_deref()
                    != Some(origin.to_ascii_lowercase().as_str())
                {
                    return Err(ConfigError::Invalid(format!(
                        "push.allowed_endpoints: `{allowed}` is not an origin (`https://host[:port]` or `https://*.domain`)"
                    )));
                }
            }
        }
        let stores = std::iter::once(&self.storage).chain(self.shard_groups.iter().filter_map(|g| g.storage.as_ref()));
        for s in stores {
            if s.pool_size == 0 || !(1..=s.pool_size).contains(&s.commit_slots) {
                return bad("storage.pool_size must be positive and storage.commit_slots in 1..=pool_size");
            }
        }
        if self.storage.kind == StorageKind::Postgres && self.storage.postgres_url.is_none() {
            return bad("storage.kind = postgres needs PARLEY_DATABASE_URL (or storage.postgres_url)");
        }
        if !(1..=1000).contains(&self.redis.capacity) || self.redis.ttl_ms < 60_000 || self.redis.op_timeout_ms == 0 {
            return bad(
                "redis.capacity must be in 1..=1000, redis.ttl_ms at least 60000, redis.op_timeout_ms positive",
            );
        }
        self.validate_groups()?;
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort();
        names.dedup();
        if names.len() != self.nodes.len() {
            return bad("node names must be unique");
        }
        if names.iter().any(|n| n.is_empty() || n.contains(['#', '@'])) {
            return bad("node names must be non-empty, without '#' or '@' (they name ractor_cluster peers)");
        }
        Ok(())
    }

    /// Groups must name real, disjoint shard ranges and complete stores: a shard claimed twice
    /// would have two homes, and its lease (the fencing token) would exist twice.
    fn validate_groups(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut names: Vec<&str> = Vec::new();
        for (i, g) in self.shard_groups.iter().enumerate() {
            let [first, last] = g.shards;
            if g.name.is_empty() || !g.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return bad(format!("shard_group name `{}` must be non-empty ASCII letters, digits, - or _", g.name));
            }
            if names.contains(&g.name.as_str()) {
                return bad(format!("shard_group `{}` is defined twice", g.name));
            }
            names.push(&g.name);
            if first > last || last >= self.cluster.shard_count {
                return bad(format!(
                    "shard_group `{}`: shards = [{first}, {last}] must be a range within 0..{}",
                    g.name, self.cluster.shard_count
                ));
            }
            if let Some(other) = self.shard_groups[..i].iter().find(|o| o.shards[0] <= last && first <= o.shards[1]) {
                return bad(format!("shard_groups `{}` and `{}` overlap", other.name, g.name));
            }
            if let Some(s) = &g.storage {
                if s.kind == StorageKind::Postgres && s.postgres_url.is_none() {
                    return bad(format!(
                        "shard_group `{}`: a postgres store needs PARLEY_DATABASE_URL_{} (or storage.postgres_url)",
                        g.name,
                        g.env_suffix()
                    ));
                }
                if s.kind == StorageKind::Embedded && s.postgres_url.is_some() {
                    return bad(format!("shard_group `{}`: postgres_url given but storage.kind is embedded", g.name));
                }
            }
        }
        Ok(())
    }

    /// Whether this node is part of a cluster (more than one node listed, or seeds to join).
    pub fn is_clustered(&self) -> bool {
        self.nodes.len() > 1 || !self.cluster.seeds.is_empty()
    }

    /// The group a shard belongs to, if any.
    pub fn group_of(&self, shard: u16) -> Option<&ShardGroupConfig> {
        self.shard_groups.iter().find(|g| g.contains(shard))
    }

    /// The entry this process runs as `name`, with command-line overrides applied. A name the
    /// config does not list is added (it joins through `cluster.seeds`), which needs both
    /// addresses and at least one seed.
    pub fn join_as(
        &mut self,
        name: &str,
        http: Option<SocketAddr>,
        cluster: Option<SocketAddr>,
        advertise: Option<String>,
        advertise_http: Option<String>,
    ) -> Result<NodeEntry, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        match self.nodes.iter_mut().find(|n| n.name == name) {
            Some(entry) => {
                entry.http = http.unwrap_or(entry.http);
                entry.cluster = cluster.unwrap_or(entry.cluster);
                entry.advertise = advertise.or(entry.advertise.take());
                entry.advertise_http = advertise_http.or(entry.advertise_http.take());
                Ok(entry.clone())
            }
            None => {
                let (Some(http), Some(cluster)) = (http, cluster) else {
                    return bad(format!("no [[node]] named `{name}` in the config (to join through cluster.seeds, give --http and --cluster)"));
                };
                if self.cluster.seeds.is_empty() {
                    return bad(format!(
                        "node `{name}` is not in the config and cluster.seeds is empty: nothing to join"
                    ));
                }
                if name.is_empty() || name.contains(['#', '@']) {
                    return bad(format!("node name `{name}` must be non-empty without '#' or '@'"));
                }
                let entry = NodeEntry { name: name.to_string(), http, cluster, advertise, advertise_http };
                self.nodes.push(entry.clone());
                Ok(entry)
            }
        }
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
    fn shard_groups_are_validated_and_take_env_overrides() {
        let two = "[cluster]\nshard_count = 8\n\n[[shard_group]]\nname = \"east\"\nshards = [0, 3]\nredis_url = \"redis://127.0.0.1:6379\"\n\n[[shard_group]]\nname = \"west-2\"\nshards = [4, 7]\nstorage = { kind = \"embedded\", dir = \"west\" }\n";
        let c = Config::from_toml(two).unwrap();
        assert_eq!(c.group_of(2).map(|g| g.name.as_str()), Some("east"));
        assert_eq!(c.group_of(7).map(|g| g.name.as_str()), Some("west-2"));
        assert!(c.group_of(2).unwrap().storage.is_none(), "east uses the home store");

        let mut c = c;
        let env = |k: &str| match k {
            "PARLEY_DATABASE_URL_WEST_2" => Some("postgres://x@127.0.0.1/west".to_string()),
            "PARLEY_REDIS_URL_EAST" => Some("redis://:secret@127.0.0.1:6380".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        let west = c.group_of(5).unwrap().storage.clone().unwrap();
        assert_eq!(
            (west.kind, west.postgres_url.as_deref()),
            (StorageKind::Postgres, Some("postgres://x@127.0.0.1/west"))
        );
        assert_eq!(c.group_of(0).unwrap().redis_url.as_deref(), Some("redis://:secret@127.0.0.1:6380"));
        c.validate().unwrap();

        let group = |name: &str, a: u16, b: u16| format!("[[shard_group]]\nname = \"{name}\"\nshards = [{a}, {b}]\n");
        let base = "[cluster]\nshard_count = 8\n";
        assert!(Config::from_toml(&format!("{base}{}{}", group("a", 0, 4), group("b", 4, 7))).is_err(), "overlap");
        assert!(Config::from_toml(&format!("{base}{}", group("a", 0, 8))).is_err(), "past shard_count");
        assert!(Config::from_toml(&format!("{base}{}", group("a", 5, 2))).is_err(), "reversed");
        assert!(Config::from_toml(&format!("{base}{}{}", group("a", 0, 1), group("a", 2, 3))).is_err(), "same name");
        assert!(Config::from_toml(&format!("{base}{}", group("no spaces", 0, 1))).is_err(), "bad name");
        let pg_without_url = format!("{base}{}storage = {{ kind = \"postgres\" }}\n", group("a", 0, 1));
        assert!(Config::from_toml(&pg_without_url).is_err(), "postgres group without a URL");
    }

    #[test]
    fn push_settings_come_from_the_file_and_the_environment_and_are_checked() {
        let c = Config::from_toml("[push]\nallowed_endpoints = [\"https://*.example.org\", \"http://127.0.0.1:9\"]\n")
            .unwrap();
        assert_eq!(c.push.allowed_endpoints.len(), 2);
        assert!(c.push.enabled && c.push.preview && c.push.vapid_private_key.is_none());
        for bad in [
            "[push]\nallowed_endpoints = [\"fcm.googleapis.com\"]\n",
            "[push]\nallowed_endpoints = [\"https://fcm.googleapis.com/fcm/send\"]\n",
            "[push]\ncontact = \"ops@example.org\"\n",
            "[push]\nqueue_max = 0\n",
            "[push]\nttl_secs = 99999999\n",
            "[push]\nvapid_private_key = \"in the file\"\n",
        ] {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
        let mut c = Config::default();
        let env = |name: &str| match name {
            "PARLEY_PUSH_ENABLED" => Some("false".to_string()),
            "PARLEY_PUSH_PREVIEW" => Some("false".to_string()),
            "PARLEY_PUSH_ALLOWED_ENDPOINTS" => Some("https://a.example, https://b.example".to_string()),
            "PARLEY_PUSH_VAPID_KEY" => Some(" secret ".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        assert!(!c.push.enabled && !c.push.preview);
        assert_eq!(c.push.allowed_endpoints, ["https://a.example", "https://b.example"]);
        assert_eq!(c.push.vapid_private_key.as_deref(), Some("secret"));
        assert!(Config::default().apply_env(|n| (n == "PARLEY_PUSH_ENABLED").then(|| "maybe".into())).is_err());
    }

    #[test]
    fn connection_limits_that_would_break_the_pump_are_refused() {
        for bad in
            ["[limits]\nidle_timeout_ms = 0\n", "[limits]\nidle_timeout_ms = 299\n", "[limits]\noutbox_frames = 15\n"]
        {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
        assert_eq!(Config::from_toml("[limits]\nidle_timeout_ms = 300\n").unwrap().limits.idle_timeout_ms, 300);
    }

    #[test]
    fn committed_cluster_toml_parses() {
        let text = include_str!("../../cluster.toml");
        let c = Config::from_toml(text).unwrap();
        assert!(c.nodes.len() >= 3);
        assert!(c.cluster.cookie.is_none());
    }
}
