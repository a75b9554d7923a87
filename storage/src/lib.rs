//! Parley persistence: the only crate that speaks SQL or Redis.
//!
//! Two traits split persistence by who writes it:
//! - [`Directory`] — cluster-wide facts written rarely: accounts, tokens, the user → conversation
//!   index. Any node may call it.
//! - [`ShardStore`] — one shard's messages, sequence counters, delivery cursors and its lease. Only
//!   that shard's store actor calls it, and every write names the lease epoch it was issued under;
//!   the store refuses it **in the same transaction** when the epoch is no longer current (fencing).
//!
//! Two backends implement both and pass one conformance suite (`tests/tests/storage_conformance.rs`):
//! [`sqlite`] (embedded, zero setup, shareable by several processes on one machine) and [`pg`]
//! (Postgres through deadpool). [`open`] picks one from a [`StoreConfig`]; [`open_layout`] opens a
//! [`Layout`] that spreads groups of shards over several stores.

pub mod cache;
pub mod error;
pub mod model;
pub mod pg;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use parley_protocol::cluster::{SyncReply, SyncRequest};
use parley_protocol::frames::{ConversationKind, MessageView};
use parley_protocol::http::UserView;
use parley_protocol::media::MediaRef;
use parley_protocol::privacy::PrivacySettings;
use parley_protocol::{ConversationId, Epoch, MediaId, Seq, ShardId, UserId};

pub use cache::{CacheOptions, CacheStats, RecentCache, ShardCache};
pub use error::StorageError;
pub use model::*;

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Cluster-wide, rarely written facts.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Create a user; `UsernameTaken` if the name exists.
    async fn create_user(&self, user: &UserRecord) -> Result<()>;
    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>>;
    /// The subset of `ids` that exist, with their names.
    async fn users_by_id(&self, ids: &[UserId]) -> Result<Vec<UserView>>;
    /// Users ordered by username, at most `limit`.
    async fn list_users(&self, limit: u32) -> Result<Vec<UserView>>;
    /// Store a token (by its hash, see [`token_hash`]) for `user` until `expires_at_ms`.
    async fn insert_token(&self, token_hash: &str, user: UserId, expires_at_ms: i64) -> Result<()>;
    /// The user of a token that exists and has not expired at `now_ms`, and its expiry.
    async fn token_user(&self, token_hash: &str, now_ms: i64) -> Result<Option<TokenGrant>>;
    /// Delete a token, and the push subscriptions registered with it (a signed-out browser gets
    /// no more notifications).
    async fn delete_token(&self, token_hash: &str) -> Result<()>;
    /// Record a conversation and index it under each member. Idempotent.
    async fn add_conversation(
        &self,
        conversation: ConversationId,
        kind: ConversationKind,
        members: &[UserId],
        now_ms: i64,
    ) -> Result<()>;
    /// Record a new group (`kind` Group, `version` 0, `name` and `owner` set, members sorted) and
    /// index it under each member.
    async fn create_group(&self, group: &ConversationRecord, now_ms: i64) -> Result<()>;
    /// Replace a group's name, owner and members with `next`'s — only if its version is still
    /// `expected_version` (then it becomes `expected_version + 1`). Members of `removed` lose the
    /// group from their index; `next.members` gain it. `false`: someone changed it meanwhile (or it
    /// is gone), nothing was written; read it again and redo the change.
    async fn update_group(&self, expected_version: u64, next: &ConversationRecord, removed: &[UserId]) -> Result<bool>;
    /// The conversations `user` belongs to.
    async fn user_conversations(&self, user: UserId) -> Result<Vec<ConversationRecord>>;
    async fn conversation(&self, conversation: ConversationId) -> Result<Option<ConversationRecord>>;
    /// Record when users were last seen online (milliseconds since the epoch). A user's time only
    /// moves forward: an older time than the stored one is ignored, so writers that race (every
    /// node that saw a peer die records its users) cannot move it back. Unknown users are skipped.
    async fn record_last_seen(&self, seen: &[(UserId, i64)]) -> Result<()>;
    /// The subset of `ids` that exist (each once), with what `watcher` may learn of their
    /// presence: last seen, privacy settings, rules version and whether `watcher` is their
    /// contact. Also what a group add needs to know of each user to add (their `groups`
    /// setting, and whether the adder is their contact).
    async fn presence_view(&self, watcher: UserId, ids: &[UserId]) -> Result<Vec<PresenceRecord>>;
    /// A user's privacy settings and rules version (`None`: no such user).
    async fn privacy(&self, user: UserId) -> Result<Option<(PrivacySettings, u64)>>;
    /// Store a user's privacy settings and bump their rules version; the new version (`None`: no
    /// such user). Changes of one user, from any node, are serialized and numbered in order.
    async fn set_privacy(&self, user: UserId, settings: PrivacySettings) -> Result<Option<u64>>;
    /// `owner`'s contacts, by username.
    async fn contacts(&self, owner: UserId) -> Result<Vec<UserView>>;
    /// Add `contact` to `owner`'s contact list (`is_contact`), or remove it, bumping `owner`'s
    /// rules version when something changed. An addition that would make the list longer than
    /// `max` is refused. Serialized per owner with [`Directory::set_privacy`].
    async fn set_contact(&self, owner: UserId, contact: UserId, is_contact: bool, max: usize) -> Result<ContactChange>;
    /// Store an upload's bytes under its (new, random) id, unless its owner's stored uploads
    /// would then pass `quota_bytes` ([`StorageError::MediaQuotaExceeded`], nothing stored). The
    /// check and the insert are one step per owner, on every node sharing the store: concurrent
    /// uploads cannot pass the quota together. The id is never reused: storing it twice is an
    /// error. Its thumbnail, if it has one, is stored with it (and does not count for the quota).
    async fn put_media(
        &self,
        record: &MediaRecord,
        bytes: &[u8],
        thumbnail: Option<&Thumbnail>,
        quota_bytes: u64,
    ) -> Result<()>;
    /// How many uploads `owner` has stored, and their total size.
    async fn media_totals(&self, owner: UserId) -> Result<MediaTotals>;
    /// Up to `limit` of `owner`'s uploads, newest first (by upload time, then id), starting after
    /// `before` (an upload's `(created_at_ms, id)`, exclusive; `None`: from the newest).
    async fn media_list(&self, owner: UserId, before: Option<(i64, MediaId)>, limit: u32) -> Result<Vec<MediaRecord>>;
    /// Delete an upload (description and bytes) if it is `owner`'s. Messages that carried it keep
    /// its description; fetching it answers unknown from then on.
    async fn delete_media(&self, id: MediaId, owner: UserId) -> Result<MediaDeletion>;
    /// An upload's description, without its bytes (what a send with `media_id` needs).
    async fn media(&self, id: MediaId) -> Result<Option<MediaRecord>>;
    /// An upload's description and bytes.
    async fn media_bytes(&self, id: MediaId) -> Result<Option<(MediaRecord, Vec<u8>)>>;
    /// An upload's description and its thumbnail (`None` inside: it has none; outside: no such
    /// upload).
    async fn media_thumbnail(&self, id: MediaId) -> Result<Option<(MediaRecord, Option<Thumbnail>)>>;
    /// The value stored under `key`, storing `init` first if there is none. Every node that calls
    /// it for a key gets the same value, whoever stored it first (the cluster's VAPID key).
    async fn setting_or_init(&self, key: &str, init: &str) -> Result<String>;
    /// Register a push subscription (replacing one with the same endpoint, whoever had it), then
    /// forget the user's oldest ones beyond `keep` (newest kept).
    async fn put_push_subscription(&self, record: &PushSubscriptionRecord, keep: usize) -> Result<()>;
    /// A user's push subscriptions whose token is still valid at `now_ms`, newest first.
    async fn push_subscriptions(&self, user: UserId, now_ms: i64) -> Result<Vec<PushSubscriptionRecord>>;
    /// Mute (`Some(until)`) or unmute (`None`) `user`'s notifications of a conversation they are
    /// indexed under. `false`: they are not (not a member), nothing changed.
    async fn set_muted(&self, user: UserId, conversation: ConversationId, until_ms: Option<i64>) -> Result<bool>;
    /// The conversations `user` has muted past `now_ms`, with until when.
    async fn muted(&self, user: UserId, now_ms: i64) -> Result<Vec<(ConversationId, i64)>>;
    /// Forget a push subscription: only if it is `user`'s when a user is given (a client
    /// unsubscribing), whoever's otherwise (its push service said it is gone). Whether one was
    /// forgotten.
    async fn delete_push_subscription(&self, endpoint: &str, user: Option<UserId>) -> Result<bool>;
}

/// One shard's persistence. Only the shard's store actor calls the writing methods.
#[async_trait]
pub trait ShardStore: Send + Sync + 'static {
    fn shard(&self) -> ShardId;

    /// Try to take the shard's lease for `owner` (a node's boot identity) for `ttl_ms`.
    /// Succeeds when the lease is free, expired, already `owner`'s, or when this process obtains the
    /// shard's session lock (a lock the database or kernel drops the instant its holder dies — the
    /// fast path after a crash). On success the epoch is bumped. `Ok(None)`: someone else holds it.
    async fn acquire_lease(&self, owner: &str, ttl_ms: u64) -> Result<Option<LeaseGrant>>;
    /// Extend the lease; `StaleEpoch` if `epoch` is no longer current or `owner` no longer holds it.
    async fn renew_lease(&self, owner: &str, epoch: Epoch, ttl_ms: u64) -> Result<LeaseGrant>;
    /// Give the lease up (hand-off or shutdown): it becomes free immediately.
    async fn release_lease(&self, owner: &str, epoch: Epoch) -> Result<()>;
    async fn lease_info(&self) -> Result<LeaseInfo>;

    /// Commit a batch in one transaction, under `epoch`. Messages get the next seqs of their
    /// conversations in batch order; an idempotency key (conversation, sender, client_msg_id)
    /// seen before is answered with the original; cursors only move forward. `StaleEpoch`: nothing was written.
    async fn commit(&self, epoch: Epoch, batch: &WriteBatch) -> Result<Committed>;

    /// Up to `limit` messages before `before_seq` (exclusive; `None` = from the end), returned in
    /// ascending seq, and whether older ones exist.
    async fn history(
        &self,
        conversation: ConversationId,
        before_seq: Option<Seq>,
        limit: u32,
    ) -> Result<(Vec<MessageView>, bool)>;
    /// Messages of each conversation after the device's delivery cursor.
    async fn sync(&self, request: &SyncRequest) -> Result<SyncReply>;
    /// Last message, last seq, the user's read seq and unread count per conversation.
    async fn summaries(&self, user: UserId, conversations: &[ConversationId]) -> Result<Vec<ShardSummary>>;
    /// For each group, the lowest member-level cursor among the users listed with it, a user
    /// without one counting as (0, 0): how far every one of them has got ([`GroupFloor`]). Groups
    /// listed without users are left out.
    async fn group_floors(&self, groups: &[(ConversationId, Vec<UserId>)]) -> Result<Vec<GroupFloor>>;
    /// The member-level cursor of `user` (max over devices): (delivered_seq, read_seq).
    async fn member_cursor(&self, conversation: ConversationId, user: UserId) -> Result<(Seq, Seq)>;
    /// Audit: (seq, lease epoch it was written under) of every message of a conversation, in seq
    /// order. A fenced store never shows an epoch lower than an earlier seq's (`parley drill`).
    async fn epochs(&self, conversation: ConversationId) -> Result<Vec<(Seq, Epoch)>>;
}

/// Which backend, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// Embedded SQLite files under this directory (one per shard plus `directory.db`).
    Embedded { dir: std::path::PathBuf },
    /// Postgres at this URL (`postgres://user:pass@host:port/db`); `pool_size` connections for
    /// reads, leases and accounts, plus `commit_slots` connections of the group committer's own,
    /// each running one group commit at a time (see [`DEFAULT_COMMIT_SLOTS`]).
    Postgres { url: String, pool_size: usize, commit_slots: usize },
}

/// Group commits one Postgres backend (one node's pool) keeps in flight by default. Few on purpose:
/// batches that arrive while every slot is busy wait and form the next group, so fewer slots make
/// larger groups, and a statement's fixed cost is shared by more messages. On the benchmark's
/// 2-core box (3 nodes, one Postgres) the durable closed loop cost Postgres ≈37 µs of CPU per
/// message with 1 slot per node, ≈42 with 2 and ≈52 with 4 (BENCHMARKS.md, session 10). Raise it
/// for a database with many cores when commits queue behind one another.
pub const DEFAULT_COMMIT_SLOTS: usize = 1;

impl StoreConfig {
    /// The backend's name, for logs, `/api/shards` and tool summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Embedded { .. } => "embedded",
            StoreConfig::Postgres { .. } => "postgres",
        }
    }
}

/// Where every shard's data lives: a home store (the [`Directory`], and every shard no group
/// claims) and any number of groups of shards with their own store. Two entries naming the same
/// store share one backend (one pool, one set of files).
#[derive(Clone, Debug)]
pub struct Layout {
    pub home: StoreConfig,
    /// Redis history cache of the shards no group claims; none = no cache.
    pub home_redis: Option<String>,
    pub groups: Vec<GroupLayout>,
    /// How every cache behaves.
    pub cache: CacheOptions,
}

/// One group of shards and its store.
#[derive(Clone, Debug)]
pub struct GroupLayout {
    pub name: String,
    /// First and last shard, inclusive.
    pub first: u16,
    pub last: u16,
    pub store: StoreConfig,
    /// The group's Redis history cache; none = no cache for these shards.
    pub redis: Option<String>,
}

impl From<StoreConfig> for Layout {
    fn from(home: StoreConfig) -> Self {
        Layout { home, home_redis: None, groups: Vec::new(), cache: CacheOptions::default() }
    }
}

/// An opened layout: the directory plus, per shard, the backend that stores it.
#[derive(Clone)]
pub struct Stores {
    pub directory: Arc<dyn Directory>,
    home: Backend,
    home_kind: &'static str,
    home_cache: Option<RecentCache>,
    groups: Vec<OpenGroup>,
}

/// An opened group of shards (ranges are disjoint).
#[derive(Clone)]
struct OpenGroup {
    first: u16,
    last: u16,
    name: String,
    backend: Backend,
    cache: Option<RecentCache>,
}

#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::SqliteBackend),
    Pg(pg::PgBackend),
}

impl Backend {
    async fn open(config: &StoreConfig) -> Result<Backend> {
        Ok(match config {
            StoreConfig::Embedded { dir } => Backend::Sqlite(sqlite::SqliteBackend::open(dir).await?),
            StoreConfig::Postgres { url, pool_size, commit_slots } => {
                Backend::Pg(pg::PgBackend::open(url, *pool_size, *commit_slots).await?)
            }
        })
    }
}

impl Stores {
    fn group(&self, shard: ShardId) -> Option<&OpenGroup> {
        self.groups.iter().find(|g| (g.first..=g.last).contains(&shard.0))
    }

    fn backend(&self, shard: ShardId) -> &Backend {
        self.group(shard).map_or(&self.home, |g| &g.backend)
    }

    /// The store of one shard (in its group's backend). Cheap; opens files/locks lazily for
    /// SQLite, shares the pool for Postgres.
    pub async fn shard(&self, shard: ShardId) -> Result<Arc<dyn ShardStore>> {
        match self.backend(shard) {
            Backend::Sqlite(b) => Ok(Arc::new(b.shard(shard).await?)),
            Backend::Pg(b) => Ok(Arc::new(b.shard(shard))),
        }
    }

    /// The Redis history cache of `shard`'s group, if it has one.
    pub fn cache(&self, shard: ShardId) -> Option<&RecentCache> {
        match self.group(shard) {
            Some(g) => g.cache.as_ref(),
            None => self.home_cache.as_ref(),
        }
    }

    /// The name of the group that stores `shard` ("home" when no group claims it).
    pub fn group_name(&self, shard: ShardId) -> &str {
        self.group(shard).map_or("home", |g| g.name.as_str())
    }

    /// Human-readable backend name of the home store, for logs and `/api/shards`.
    pub fn kind(&self) -> &'static str {
        self.home_kind
    }
}

/// Open (and migrate) a single store that holds everything.
pub async fn open(config: &StoreConfig) -> Result<Stores> {
    open_layout(&Layout::from(config.clone())).await
}

/// Open (and migrate) every store of a layout, each distinct one once.
pub async fn open_layout(layout: &Layout) -> Result<Stores> {
    let home = Backend::open(&layout.home).await?;
    let directory: Arc<dyn Directory> = match &home {
        Backend::Sqlite(b) => Arc::new(b.directory()),
        Backend::Pg(b) => Arc::new(b.directory()),
    };
    let mut opened: Vec<(StoreConfig, Backend)> = vec![(layout.home.clone(), home.clone())];
    let mut caches: Vec<(String, RecentCache)> = Vec::new();
    let mut cache_for = |url: &Option<String>| -> Result<Option<RecentCache>> {
        let Some(url) = url else { return Ok(None) };
        if let Some((_, c)) = caches.iter().find(|(u, _)| u == url) {
            return Ok(Some(c.clone()));
        }
        let c = RecentCache::new(url, layout.cache.clone())?;
        caches.push((url.clone(), c.clone()));
        Ok(Some(c))
    };
    let home_cache = cache_for(&layout.home_redis)?;
    let mut groups = Vec::new();
    for g in &layout.groups {
        let backend = match opened.iter().find(|(c, _)| *c == g.store) {
            Some((_, b)) => b.clone(),
            None => {
                let b = Backend::open(&g.store).await?;
                opened.push((g.store.clone(), b.clone()));
                b
            }
        };
        let cache = cache_for(&g.redis)?;
        groups.push(OpenGroup { first: g.first, last: g.last, name: g.name.clone(), backend, cache });
    }
    Ok(Stores { directory, home, home_kind: layout.home.kind(), home_cache, groups })
}

/// A message's `media` column (JSON of [`MediaRef`], NULL without media), as both backends store it.
pub(crate) fn media_to_json(media: &Option<MediaRef>) -> Option<String> {
    media.as_ref().map(|m| serde_json::to_string(m).expect("a MediaRef always serializes"))
}

/// The inverse of [`media_to_json`].
pub(crate) fn media_from_json(column: Option<String>) -> Result<Option<MediaRef>> {
    column
        .map(|text| serde_json::from_str(&text).map_err(|e| StorageError::Corrupt(format!("message media: {e}"))))
        .transpose()
}

/// How both stores keep [`PrivacySettings`]: (last seen, online, groups) as small codes, and
/// read receipts as a flag.
pub(crate) fn privacy_codes(settings: PrivacySettings) -> (i16, i16, i16, bool) {
    use parley_protocol::privacy::{Audience as L, OnlineAudience as O};
    let audience = |a: L| match a {
        L::Everyone => 0,
        L::Contacts => 1,
        L::Nobody => 2,
    };
    let online = match settings.online {
        O::Everyone => 0,
        O::SameAsLastSeen => 1,
    };
    (audience(settings.last_seen), online, audience(settings.groups), settings.read_receipts)
}

/// The inverse of [`privacy_codes`]; an unknown code is corruption, not a default.
pub(crate) fn privacy_from_codes(
    last_seen: i16,
    online: i16,
    groups: i16,
    read_receipts: bool,
) -> Result<PrivacySettings> {
    use parley_protocol::privacy::{Audience as L, OnlineAudience as O};
    let audience = |code: i16, what: &str| match code {
        0 => Ok(L::Everyone),
        1 => Ok(L::Contacts),
        2 => Ok(L::Nobody),
        other => Err(StorageError::Corrupt(format!("{what} audience {other}"))),
    };
    let (last_seen, groups) = (audience(last_seen, "last seen")?, audience(groups, "groups")?);
    let online = match online {
        0 => O::Everyone,
        1 => O::SameAsLastSeen,
        other => return Err(StorageError::Corrupt(format!("online audience {other}"))),
    };
    Ok(PrivacySettings { last_seen, online, groups, read_receipts })
}

/// A stored rules version (never negative).
pub(crate) fn version_of(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("rules version {v}")))
}

/// Lower-case hex SHA-256 of an upload's bytes (what `MediaRef::sha256` carries).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Tokens are stored only as their SHA-256, so a leaked table does not leak live sessions.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}
