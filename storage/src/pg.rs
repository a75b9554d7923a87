//! Postgres backend: every node of a cluster shares one database through a deadpool pool.
//!
//! Owns the Postgres schema (`pg/*.sql`, applied by [`PgBackend::open`]) and the Postgres
//! implementations of [`Directory`] ([`PgDirectory`]) and [`ShardStore`] ([`PgShard`]). `lib.rs`
//! constructs it from a [`crate::StoreConfig`]; the node's store actors are its only callers.
//!
//! Shape: all shards share the tables and shard-local rows carry a `shard` column, so adding a shard
//! is free and a single `pg_dump` backs everything up.
//!
//! Fencing: [`PgShard::commit`] (run by the group commit of [`commit`], which may combine the
//! batches of several shards in one statement, each fenced on its own) reads the shard's lease row
//! `FOR KEY SHARE` in the commit's own transaction and refuses the batch when the epoch moved. A
//! concurrent acquire takes the same row `FOR UPDATE`, which conflicts with it, so either the
//! acquire waits for the commit (and the commit's rows predate the new epoch) or the commit waits
//! for the acquire (and then sees the new epoch and writes nothing). A renewal only updates the
//! expiry (a `FOR NO KEY UPDATE` lock, which does not conflict with `KEY SHARE`): commits and
//! renewals never wait for each other. (Until session 10 commits locked `FOR SHARE`, and every
//! renewal waited for the shard's commit in flight and held up the next.)
//!
//! Session locks: besides the lease row, an acquire tries `pg_try_advisory_lock` on a dedicated
//! connection (one per [`PgBackend`], outside the pool so that a recycled pool connection can never
//! carry a lock away). Postgres drops that lock when the connection dies, so after a `kill -9` a
//! surviving node takes the shard at once instead of waiting for the lease to expire. The lock is a
//! fast path only; the lease row and its epoch stay the single source of truth.
//!
//! Query shapes: every lookup of a list of keys (`UNNEST` of array parameters) probes each key
//! with a `LATERAL (… LIMIT 1)` subquery instead of joining the table. Our statements are prepared,
//! and Postgres runs a prepared statement with a *generic plan* made at its first executions and
//! kept until the table is next analyzed. On a fresh database that plan is made while the tables
//! are empty, and for a join an empty table is best hash-joined over a sequential scan; the plan
//! then sticks while the table grows, and every commit reads the whole `messages` table (the
//! benchmark measured 176 M rows read in 25 s, Postgres at 2-3x the node's CPU per message). A
//! `LATERAL` subquery with `LIMIT 1` cannot be flattened into a join, so each key stays one index
//! probe whatever the statistics say. Range reads of `messages` (history, sync) filter on the
//! conversation only, not also on `shard`: a conversation's rows all carry its shard (the counter
//! upsert refuses another shard's conversation), and when one shard holds most rows the planner
//! estimates `shard = <another>` at about one row and picks a sequential scan of the whole table
//! (the benchmark, with one 10M-message conversation, read 1.9 G rows and every reconnect sync
//! took seconds). `tests/tests/pg_plans.rs` checks the hot paths with generic plans made on empty
//! tables; the skewed case was checked by hand with EXPLAIN on the benchmark's database.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use parley_protocol::cluster::{SyncReply, SyncRequest};
use parley_protocol::frames::{ConversationKind, MessageView};
use parley_protocol::http::UserView;
use parley_protocol::media::MediaRef;
use parley_protocol::privacy::PrivacySettings;
use parley_protocol::{ClientMsgId, ConversationId, Epoch, MediaId, MessageId, Seq, ShardId, UserId};
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use crate::model::*;
use crate::{privacy_codes, privacy_from_codes, version_of, Directory, Result, ShardStore, StorageError};

mod commit;

/// Schema migrations in order. A version, once released, is never edited: add a new file instead.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("pg/0001_init.sql")),
    (2, include_str!("pg/0002_groups.sql")),
    (3, include_str!("pg/0003_last_seen.sql")),
    (4, include_str!("pg/0004_media.sql")),
    (5, include_str!("pg/0005_push.sql")),
    (6, include_str!("pg/0006_mute.sql")),
    (7, include_str!("pg/0007_message_id_index.sql")),
    (8, include_str!("pg/0008_media_owner.sql")),
    (9, include_str!("pg/0009_privacy.sql")),
    (10, include_str!("pg/0010_thumbnails.sql")),
    (11, include_str!("pg/0011_group_adds.sql")),
    (12, include_str!("pg/0012_read_receipts.sql")),
];

/// Advisory-lock class ("parl") of the per-shard session locks; the second key is the shard number.
/// A fixed class keeps Parley's locks apart from any other application sharing the database.
const SESSION_LOCK_CLASS: i32 = 0x7061_726c;
/// Advisory-lock class ("parm") that serialises migrations of nodes starting at the same time.
const MIGRATION_LOCK_CLASS: i32 = 0x7061_726d;
/// Advisory-lock class ("parn") that serialises one owner's uploads (quota check, then insert);
/// the second key is 32 bits of the owner's id (two owners sharing it only wait for each other).
const MEDIA_LOCK_CLASS: i32 = 0x7061_726e;

/// Pages the store returns are clamped to this many rows whatever the caller asks: a bug or a
/// hostile limit upstream must not turn into an unbounded read.
pub(crate) const MAX_ROWS: u32 = 1_000;

/// Longest lease a caller can take. Leases are renewed every few seconds; a longer TTL would only
/// let a stalled owner (whose session lock is still alive) block its shards for longer.
const MAX_LEASE_TTL_MS: u64 = 10 * 60 * 1_000;

/// How long a caller waits for a pooled connection before failing with `Pool`. Queries here take
/// milliseconds; waiting longer only hides an overloaded or unreachable database from the caller.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections of a node's lease pool. Lease statements are single-row and short; a node renews
/// each of its shards about once a second, so two connections leave room for an acquire or a
/// release running beside the renewals.
pub const LEASE_POOL_SIZE: usize = 2;
/// How long opening one connection may take (TCP connect plus authentication).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on every statement of the session-lock connection (and on opening it). Lock calls answer
/// in microseconds; a stuck lock connection must not stall acquire, renew or release, whose callers
/// run against a lease deadline. On timeout the connection is dropped (and its locks with it).
const LOCK_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on unacknowledged data on every connection (TCP_USER_TIMEOUT), unless the URL sets one:
/// without it a query sent into a network partition waits for the kernel's default of minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

/// The columns of a message row in the order [`message_view`] reads them.
const MESSAGE_COLUMNS: &str =
    "m.message_id, m.conversation_id, m.seq, m.sender, m.client_msg_id, m.body, m.sent_at_ms, m.media";

/// A timestamptz as milliseconds since the Unix epoch (the unit of every `*_ms` field).
macro_rules! ms {
    ($e:literal) => {
        concat!("(extract(epoch FROM ", $e, ") * 1000)::bigint")
    };
}

/// An opened Postgres backend: the pool plus the session-lock connection. Cheap to clone; every
/// clone shares both.
#[derive(Clone)]
pub struct PgBackend {
    pool: Pool,
    /// Leases only (acquire, renew, release, read): the control plane never waits behind reads.
    /// On the shared pool, a burst of history reads, syncs or media downloads could hold every
    /// connection past a lease's renewal and cost the node its shards.
    lease_pool: Pool,
    locks: Arc<SessionLocks>,
    /// Every shard's commits go through here (group commit, see [`commit`]).
    committer: commit::Committer,
}

/// Accounts, tokens and the conversation index.
pub struct PgDirectory {
    pool: Pool,
}

/// One shard's messages, counters, cursors and lease.
pub struct PgShard {
    shard: ShardId,
    backend: PgBackend,
}

/// The connection settings of every pooled and lock connection: the URL's, plus our defaults for
/// what it leaves unset (timeouts, application name) and `jit=off`. Why no JIT: our statements
/// are short index probes, but a prepared statement's generic plan cannot see its `LIMIT` and
/// assumes a tenth of the table; with millions of rows that estimate crosses `jit_above_cost`,
/// and Postgres then spends seconds compiling LLVM code for a query that reads 100 rows (seen in
/// the benchmark: every reconnect sync took ~4 s and emptied the pool). A URL that sets `jit`
/// itself (in `options`) keeps its choice.
fn connection_config(url: &str) -> Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        // Shows in pg_stat_activity, which is where an operator looks for a stuck session.
        config.application_name("parley");
    }
    default_setting(&mut config, "jit", "off");
    Ok(config)
}

/// The group committer's connections: [`connection_config`] plus
/// `plan_cache_mode=force_generic_plan`. Why: under the default (`auto`) Postgres kept planning
/// the group-commit statement anew at every execution (a custom plan for each group's array
/// sizes looked cheaper than the generic one), and at light load, where a group carries one to
/// three messages, planning was ≈23% of Postgres's CPU (perf at 2,000 msg/s, BENCHMARKS.md
/// session 10). Generic plans cut Postgres's CPU per message there by ≈18-20% and changed
/// nothing measurable at full load. It is safe because the statement is an index probe whatever
/// the sizes: `tests/tests/pg_plans.rs` checks every hot path with generic plans made on empty
/// tables. Only the committer's connections: reads keep custom plans, which see a history
/// page's bounds. A URL that sets `plan_cache_mode` itself keeps its choice.
fn commit_connection_config(url: &str) -> Result<tokio_postgres::Config> {
    let mut config = connection_config(url)?;
    default_setting(&mut config, "plan_cache_mode", "force_generic_plan");
    Ok(config)
}

/// Add `-c name=value` to the connection's `options` unless they already set `name`.
fn default_setting(config: &mut tokio_postgres::Config, name: &str, value: &str) {
    let options = config.get_options().unwrap_or_default().to_string();
    if !options.contains(name) {
        config.options(format!("{options} -c {name}={value}").trim());
    }
}

/// A pool of at most `size` connections made with `config`.
fn pool(config: tokio_postgres::Config, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StorageError::Pool(e.to_string()))
}

impl PgBackend {
    /// Connect with up to `pool_size` pooled connections for reads and accounts, plus
    /// `commit_slots` connections of the group committer's own (at most that many groups in
    /// flight; their settings: [`commit_connection_config`]), [`LEASE_POOL_SIZE`] for leases and
    /// one for the session locks, and bring the schema up to date.
    pub async fn open(url: &str, pool_size: usize, commit_slots: usize) -> Result<Self> {
        let config = connection_config(url)?;
        let main = pool(config.clone(), pool_size)?;
        migrate(&main).await?;
        let slots = commit_slots.clamp(1, pool_size.max(1));
        let committer = commit::Committer::start(pool(commit_connection_config(url)?, slots)?, slots);
        let lease_pool = pool(config.clone(), LEASE_POOL_SIZE)?;
        let locks = SessionLocks { config, state: tokio::sync::Mutex::new(LockConn::default()) };
        Ok(PgBackend { pool: main, lease_pool, locks: Arc::new(locks), committer })
    }

    pub fn directory(&self) -> PgDirectory {
        PgDirectory { pool: self.pool.clone() }
    }

    /// The store of `shard`. Nothing is created until the first acquire or commit.
    pub fn shard(&self, shard: ShardId) -> PgShard {
        PgShard { shard, backend: self.clone() }
    }
}

/// Apply the migrations not applied yet, all in one transaction under an advisory lock, so that
/// nodes starting together apply each version exactly once and a failed migration leaves nothing.
async fn migrate(pool: &Pool) -> Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&MIGRATION_LOCK_CLASS]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS parley_migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied = tx
        .query("SELECT version FROM parley_migrations", &[])
        .await?
        .iter()
        .map(|r| r.try_get::<_, i32>(0))
        .collect::<std::result::Result<HashSet<i32>, _>>()?;
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO parley_migrations (version) VALUES ($1)", &[version]).await?;
        tracing::info!(version, "applied postgres migration");
    }
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Session locks
// ---------------------------------------------------------------------------------------------

/// The dedicated connection that holds this backend's advisory session locks.
struct SessionLocks {
    config: tokio_postgres::Config,
    /// A tokio mutex because lock queries await while holding it; only acquire, renew and release
    /// take it, which are rare.
    state: tokio::sync::Mutex<LockConn>,
}

#[derive(Default)]
struct LockConn {
    /// Connected lazily: a process that never acquires a shard never opens it.
    client: Option<tokio_postgres::Client>,
    /// Shards whose lock this session holds, with the owner it was taken for. Advisory locks are
    /// re-entrant, so taking one twice would need two unlocks; this set makes each lock single.
    held: HashMap<ShardId, String>,
}

/// Why a statement on the lock connection failed (logged, never returned: the lock is optional).
#[derive(Debug, thiserror::Error)]
enum LockConnError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no answer within {LOCK_QUERY_TIMEOUT:?}")]
    Timeout,
}

/// `fut`, bounded by [`LOCK_QUERY_TIMEOUT`].
async fn bounded<T>(
    fut: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<T, LockConnError> {
    match tokio::time::timeout(LOCK_QUERY_TIMEOUT, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(LockConnError::Timeout),
    }
}

/// The outcome of trying a shard's session lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionLock {
    /// Taken just now: whoever held it before has died (or released it).
    Obtained,
    /// This backend held it already (for an earlier acquire); it says nothing about other owners.
    AlreadyHeld,
    /// Another session holds it, or the lock connection is unavailable.
    Busy,
}

impl SessionLocks {
    /// Try `shard`'s lock for `owner`. Never fails: the lock is an optimisation, and an error on the
    /// lock connection only means the lease rules decide alone.
    async fn try_lock(&self, shard: ShardId, owner: &str) -> SessionLock {
        let mut state = self.state.lock().await;
        Self::try_lock_locked(&self.config, &mut state, shard, owner).await
    }

    /// Take `shard`'s lock for `owner` unless another call is using the lock connection right now
    /// (then skip: this is the opportunistic grab of a renew, which must not queue behind it).
    async fn try_lock_if_idle(&self, shard: ShardId, owner: &str) {
        if let Ok(mut state) = self.state.try_lock() {
            if !state.held.contains_key(&shard) {
                Self::try_lock_locked(&self.config, &mut state, shard, owner).await;
            }
        }
    }

    async fn try_lock_locked(
        config: &tokio_postgres::Config,
        state: &mut LockConn,
        shard: ShardId,
        owner: &str,
    ) -> SessionLock {
        if state.alive() && state.held.contains_key(&shard) {
            return SessionLock::AlreadyHeld;
        }
        match Self::try_lock_inner(config, state, shard).await {
            Ok(true) => {
                state.held.insert(shard, owner.to_string());
                SessionLock::Obtained
            }
            Ok(false) => SessionLock::Busy,
            Err(e) => {
                tracing::warn!(shard = %shard, error = %e, "session lock connection failed");
                state.forget();
                SessionLock::Busy
            }
        }
    }

    async fn try_lock_inner(
        config: &tokio_postgres::Config,
        state: &mut LockConn,
        shard: ShardId,
    ) -> std::result::Result<bool, LockConnError> {
        if !state.alive() {
            // Whatever the old session held died with it.
            state.forget();
            let (client, connection) = bounded(config.connect(NoTls)).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "session lock connection ended");
                }
            });
            state.client = Some(client);
        }
        let Some(client) = state.client.as_ref() else {
            return Ok(false);
        };
        let row = bounded(
            client.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&SESSION_LOCK_CLASS, &i32::from(shard.0)]),
        )
        .await?;
        Ok(row.try_get::<_, bool>(0)?)
    }

    /// Record that the lock this backend already holds now protects `owner`'s lease.
    async fn set_holder(&self, shard: ShardId, owner: &str) {
        if let Some(holder) = self.state.lock().await.held.get_mut(&shard) {
            owner.clone_into(holder);
        }
    }

    /// Give `shard`'s lock up if this backend holds it (for `owner`, when given).
    async fn unlock(&self, shard: ShardId, owner: Option<&str>) {
        let mut state = self.state.lock().await;
        match state.held.get(&shard) {
            Some(holder) if owner.is_none_or(|o| o == holder) => {}
            _ => return,
        }
        state.held.remove(&shard);
        let Some(client) = state.client.as_ref() else {
            return;
        };
        let unlocked =
            bounded(client.query_one("SELECT pg_advisory_unlock($1, $2)", &[&SESSION_LOCK_CLASS, &i32::from(shard.0)]))
                .await;
        if let Err(e) = unlocked {
            // Dropping the connection releases every lock it held, which is what we wanted.
            tracing::warn!(shard = %shard, error = %e, "session unlock failed; dropping lock connection");
            state.forget();
        }
    }
}

impl LockConn {
    /// Whether the connection is up (a closed one has lost every lock it held).
    fn alive(&self) -> bool {
        self.client.as_ref().is_some_and(|c| !c.is_closed())
    }

    /// Drop the connection and with it every lock it held.
    fn forget(&mut self) {
        self.client = None;
        self.held.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// A seq or epoch from the caller as a bigint. Values beyond `i64::MAX` cannot exist in the
/// database, so saturating keeps every comparison correct ("before the end", "not the epoch").
fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A bigint seq, epoch or count from the database as the protocol's unsigned type.
fn from_db(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("negative {what}: {v}")))
}

fn shard_db(shard: ShardId) -> i32 {
    i32::from(shard.0)
}

fn kind_code(kind: ConversationKind) -> i16 {
    match kind {
        ConversationKind::Direct => 0,
        ConversationKind::Group => 1,
    }
}

fn kind_of(code: i16) -> Result<ConversationKind> {
    match code {
        0 => Ok(ConversationKind::Direct),
        1 => Ok(ConversationKind::Group),
        other => Err(StorageError::Corrupt(format!("conversation kind {other}"))),
    }
}

fn client_msg_id(s: String) -> Result<ClientMsgId> {
    ClientMsgId::new(s).map_err(|e| StorageError::Corrupt(format!("client_msg_id: {e}")))
}

/// A message from [`MESSAGE_COLUMNS`] starting at column `at`.
fn message_view(row: &Row, at: usize) -> Result<MessageView> {
    Ok(MessageView {
        message_id: MessageId(row.try_get(at)?),
        conversation_id: ConversationId(row.try_get(at + 1)?),
        seq: from_db(row.try_get(at + 2)?, "seq")?,
        sender: UserId(row.try_get(at + 3)?),
        client_msg_id: client_msg_id(row.try_get(at + 4)?)?,
        body: row.try_get(at + 5)?,
        sent_at_ms: row.try_get(at + 6)?,
        media: crate::media_from_json(row.try_get(at + 7)?)?,
    })
}

/// An upload's description from `media_id, owner, mime, name, size, sha256, created_at_ms`.
fn media_record(row: &Row) -> Result<MediaRecord> {
    Ok(MediaRecord {
        media: MediaRef {
            media_id: MediaId(row.try_get(0)?),
            mime: row.try_get(2)?,
            name: row.try_get(3)?,
            size: from_db(row.try_get(4)?, "media size")?,
            sha256: row.try_get(5)?,
        },
        owner: UserId(row.try_get(1)?),
        created_at_ms: row.try_get(6)?,
    })
}

/// The columns [`conversation_record`] reads, in its order.
const CONVERSATION_COLUMNS: &str = "id, kind, members, name, owner, version";

fn conversation_record(row: &Row) -> Result<ConversationRecord> {
    let members: Vec<Uuid> = row.try_get(2)?;
    let owner: Option<Uuid> = row.try_get(4)?;
    Ok(ConversationRecord {
        id: ConversationId(row.try_get(0)?),
        kind: kind_of(row.try_get(1)?)?,
        members: members.into_iter().map(UserId).collect(),
        name: row.try_get(3)?,
        owner: owner.map(UserId),
        version: from_db(row.try_get(5)?, "version")?,
    })
}

/// Index `conversation` under each of `members` (present ones stay).
async fn index_members(
    tx: &deadpool_postgres::Transaction<'_>,
    conversation: ConversationId,
    members: &[Uuid],
) -> Result<()> {
    let index = tx
        .prepare_cached(
            "INSERT INTO user_conversations (user_id, conversation_id)
             SELECT u, $1 FROM UNNEST($2::uuid[]) AS u
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&index, &[&conversation.0, &members]).await?;
    Ok(())
}

fn user_view(row: &Row) -> Result<UserView> {
    Ok(UserView { id: UserId(row.try_get(0)?), username: row.try_get(1)? })
}

/// `items` without repeats, first occurrence kept, order preserved.
fn distinct<T: Copy + Eq + std::hash::Hash>(items: &[T]) -> Vec<T> {
    let mut seen = HashSet::with_capacity(items.len());
    items.iter().copied().filter(|x| seen.insert(*x)).collect()
}

// ---------------------------------------------------------------------------------------------
// Directory
// ---------------------------------------------------------------------------------------------

#[async_trait]
impl Directory for PgDirectory {
    async fn create_user(&self, user: &UserRecord) -> Result<()> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("INSERT INTO users (id, username, password_hash, created_at_ms) VALUES ($1, $2, $3, $4)")
            .await?;
        let inserted =
            client.execute(&stmt, &[&user.id.0, &user.username, &user.password_hash, &user.created_at_ms]).await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if e.as_db_error().and_then(|d| d.constraint()) == Some("users_username_key") => {
                Err(StorageError::UsernameTaken)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT id, username, password_hash, created_at_ms FROM users WHERE username = $1")
            .await?;
        let Some(row) = client.query_opt(&stmt, &[&username]).await? else {
            return Ok(None);
        };
        Ok(Some(UserRecord {
            id: UserId(row.try_get(0)?),
            username: row.try_get(1)?,
            password_hash: row.try_get(2)?,
            created_at_ms: row.try_get(3)?,
        }))
    }

    async fn users_by_id(&self, ids: &[UserId]) -> Result<Vec<UserView>> {
        let ids: Vec<Uuid> = distinct(ids).into_iter().map(|u| u.0).collect();
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT u.id, u.username FROM UNNEST($1::uuid[]) AS k(id)
                 CROSS JOIN LATERAL (SELECT id, username FROM users WHERE id = k.id LIMIT 1) u
                 ORDER BY u.username",
            )
            .await?;
        client.query(&stmt, &[&ids]).await?.iter().map(user_view).collect()
    }

    async fn record_last_seen(&self, seen: &[(UserId, i64)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // One keyed update per user (an index probe whatever the plan; batches are what one
        // writer wake-up collected, a handful in steady state). GREATEST keeps the latest time
        // whatever the order of writers.
        let stmt = tx
            .prepare_cached("UPDATE users SET last_seen_ms = GREATEST(COALESCE(last_seen_ms, 0), $2) WHERE id = $1")
            .await?;
        for (user, at) in seen {
            tx.execute(&stmt, &[&user.0, at]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn presence_view(&self, watcher: UserId, ids: &[UserId]) -> Result<Vec<PresenceRecord>> {
        let ids: Vec<Uuid> = distinct(ids).into_iter().map(|u| u.0).collect();
        let client = self.pool.get().await?;
        // One statement, so a user's version, settings and contact flag come from one snapshot.
        let stmt = client
            .prepare_cached(
                "SELECT u.id, u.last_seen_ms, u.last_seen_audience, u.online_audience, u.rules_version,
                        EXISTS (SELECT 1 FROM contacts c WHERE c.owner = u.id AND c.contact = $2), u.groups_audience,
                        u.read_receipts
                 FROM UNNEST($1::uuid[]) AS k(id)
                 CROSS JOIN LATERAL (SELECT id, last_seen_ms, last_seen_audience, online_audience, rules_version,
                                            groups_audience, read_receipts
                                     FROM users WHERE id = k.id LIMIT 1) u",
            )
            .await?;
        client
            .query(&stmt, &[&ids, &watcher.0])
            .await?
            .iter()
            .map(|r| {
                Ok(PresenceRecord {
                    user: UserId(r.try_get(0)?),
                    last_seen_ms: r.try_get(1)?,
                    settings: privacy_from_codes(r.try_get(2)?, r.try_get(3)?, r.try_get(6)?, r.try_get(7)?)?,
                    version: version_of(r.try_get(4)?)?,
                    watcher_is_contact: r.try_get(5)?,
                })
            })
            .collect()
    }

    async fn privacy(&self, user: UserId) -> Result<Option<(PrivacySettings, u64)>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT last_seen_audience, online_audience, rules_version, groups_audience, read_receipts
                 FROM users WHERE id = $1",
            )
            .await?;
        match client.query_opt(&stmt, &[&user.0]).await? {
            Some(r) => {
                let settings = privacy_from_codes(r.try_get(0)?, r.try_get(1)?, r.try_get(3)?, r.try_get(4)?)?;
                Ok(Some((settings, version_of(r.try_get(2)?)?)))
            }
            None => Ok(None),
        }
    }

    async fn set_privacy(&self, user: UserId, settings: PrivacySettings) -> Result<Option<u64>> {
        let (last_seen, online, groups, read_receipts) = privacy_codes(settings);
        let client = self.pool.get().await?;
        // The row lock orders this against the user's other rule changes on every node.
        let stmt = client
            .prepare_cached(
                "UPDATE users SET last_seen_audience = $2, online_audience = $3, groups_audience = $4,
                     read_receipts = $5, rules_version = rules_version + 1
                 WHERE id = $1 RETURNING rules_version",
            )
            .await?;
        match client.query_opt(&stmt, &[&user.0, &last_seen, &online, &groups, &read_receipts]).await? {
            Some(r) => Ok(Some(version_of(r.try_get(0)?)?)),
            None => Ok(None),
        }
    }

    async fn contacts(&self, owner: UserId) -> Result<Vec<UserView>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                // A keyed probe per contact, whatever plan empty tables suggested (see pg_plans).
                "SELECT u.id, u.username FROM contacts c
                 CROSS JOIN LATERAL (SELECT id, username FROM users WHERE id = c.contact LIMIT 1) u
                 WHERE c.owner = $1 ORDER BY u.username",
            )
            .await?;
        client.query(&stmt, &[&owner.0]).await?.iter().map(user_view).collect()
    }

    async fn set_contact(&self, owner: UserId, contact: UserId, is_contact: bool, max: usize) -> Result<ContactChange> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Locks the owner's row to the commit: two changes of one owner's list (any node) run one
        // after the other, so the count below cannot be passed by two additions together.
        let lock = tx.prepare_cached("SELECT 1 FROM users WHERE id = $1 FOR UPDATE").await?;
        if tx.query_opt(&lock, &[&owner.0]).await?.is_none() {
            return Ok(ContactChange::UnknownUser);
        }
        let changed = if is_contact {
            let exists = tx.prepare_cached("SELECT 1 FROM users WHERE id = $1").await?;
            if tx.query_opt(&exists, &[&contact.0]).await?.is_none() {
                return Ok(ContactChange::UnknownUser);
            }
            let present = tx.prepare_cached("SELECT 1 FROM contacts WHERE owner = $1 AND contact = $2").await?;
            if tx.query_opt(&present, &[&owner.0, &contact.0]).await?.is_some() {
                return Ok(ContactChange::Unchanged);
            }
            let count = tx.prepare_cached("SELECT count(*) FROM contacts WHERE owner = $1").await?;
            let n: i64 = tx.query_one(&count, &[&owner.0]).await?.try_get(0)?;
            if usize::try_from(n).unwrap_or(usize::MAX) >= max {
                return Ok(ContactChange::TooMany);
            }
            let insert =
                tx.prepare_cached("INSERT INTO contacts (owner, contact, added_at_ms) VALUES ($1, $2, $3)").await?;
            tx.execute(&insert, &[&owner.0, &contact.0, &crate::now_ms()]).await? > 0
        } else {
            let delete = tx.prepare_cached("DELETE FROM contacts WHERE owner = $1 AND contact = $2").await?;
            tx.execute(&delete, &[&owner.0, &contact.0]).await? > 0
        };
        if !changed {
            return Ok(ContactChange::Unchanged);
        }
        let bump = tx
            .prepare_cached("UPDATE users SET rules_version = rules_version + 1 WHERE id = $1 RETURNING rules_version")
            .await?;
        let version = version_of(tx.query_one(&bump, &[&owner.0]).await?.try_get(0)?)?;
        tx.commit().await?;
        Ok(ContactChange::Changed { version })
    }

    async fn put_media(
        &self,
        record: &MediaRecord,
        bytes: &[u8],
        thumbnail: Option<&Thumbnail>,
        quota_bytes: u64,
    ) -> Result<()> {
        let m = &record.media;
        let size = i64::try_from(m.size).map_err(|_| StorageError::Corrupt(format!("media size {}", m.size)))?;
        let owner_key = i32::from_be_bytes(record.owner.0.as_bytes()[..4].try_into().expect("4 bytes"));
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Held to the commit: another upload of the same owner (any node) waits here, then sees
        // this one in its sum.
        tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&MEDIA_LOCK_CLASS, &owner_key]).await?;
        let sum = tx.prepare_cached("SELECT COALESCE(sum(size), 0)::bigint FROM media WHERE owner = $1").await?;
        let used: i64 = tx.query_one(&sum, &[&record.owner.0]).await?.try_get(0)?;
        let used = u64::try_from(used).map_err(|_| StorageError::Corrupt(format!("media total {used}")))?;
        if used.saturating_add(m.size) > quota_bytes {
            return Err(StorageError::MediaQuotaExceeded { used, quota: quota_bytes });
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO media (media_id, owner, mime, name, size, sha256, bytes, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .await?;
        tx.execute(
            &stmt,
            &[&m.media_id.0, &record.owner.0, &m.mime, &m.name, &size, &m.sha256, &bytes, &record.created_at_ms],
        )
        .await?;
        if let Some(t) = thumbnail {
            let stmt =
                tx.prepare_cached("INSERT INTO media_thumbnails (media_id, mime, bytes) VALUES ($1, $2, $3)").await?;
            tx.execute(&stmt, &[&m.media_id.0, &t.mime, &t.bytes]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn media_totals(&self, owner: UserId) -> Result<MediaTotals> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT count(*), COALESCE(sum(size), 0)::bigint FROM media WHERE owner = $1")
            .await?;
        let row = client.query_one(&stmt, &[&owner.0]).await?;
        let (uploads, bytes): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        Ok(MediaTotals { uploads: from_db(uploads, "upload count")?, bytes: from_db(bytes, "media total")? })
    }

    async fn media_list(&self, owner: UserId, before: Option<(i64, MediaId)>, limit: u32) -> Result<Vec<MediaRecord>> {
        let (before_ms, before_id) = before.map_or((i64::MAX, Uuid::max()), |(ms, id)| (ms, id.0));
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT media_id, owner, mime, name, size, sha256, created_at_ms FROM media
                 WHERE owner = $1 AND (created_at_ms, media_id) < ($2, $3)
                 ORDER BY created_at_ms DESC, media_id DESC LIMIT $4",
            )
            .await?;
        let limit = i64::from(limit.clamp(1, MAX_ROWS));
        let rows = client.query(&stmt, &[&owner.0, &before_ms, &before_id, &limit]).await?;
        rows.iter().map(media_record).collect()
    }

    async fn delete_media(&self, id: MediaId, owner: UserId) -> Result<MediaDeletion> {
        let client = self.pool.get().await?;
        let delete = client.prepare_cached("DELETE FROM media WHERE media_id = $1 AND owner = $2").await?;
        if client.execute(&delete, &[&id.0, &owner.0]).await? > 0 {
            return Ok(MediaDeletion::Deleted);
        }
        let exists = client.prepare_cached("SELECT 1 FROM media WHERE media_id = $1").await?;
        Ok(match client.query_opt(&exists, &[&id.0]).await? {
            Some(_) => MediaDeletion::NotOwner,
            None => MediaDeletion::Unknown,
        })
    }

    async fn media(&self, id: MediaId) -> Result<Option<MediaRecord>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT media_id, owner, mime, name, size, sha256, created_at_ms FROM media WHERE media_id = $1",
            )
            .await?;
        client.query_opt(&stmt, &[&id.0]).await?.map(|r| media_record(&r)).transpose()
    }

    async fn media_bytes(&self, id: MediaId) -> Result<Option<(MediaRecord, Vec<u8>)>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT media_id, owner, mime, name, size, sha256, created_at_ms, bytes FROM media WHERE media_id = $1",
            )
            .await?;
        match client.query_opt(&stmt, &[&id.0]).await? {
            Some(r) => Ok(Some((media_record(&r)?, r.try_get(7)?))),
            None => Ok(None),
        }
    }

    async fn media_thumbnail(&self, id: MediaId) -> Result<Option<(MediaRecord, Option<Thumbnail>)>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT m.media_id, m.owner, m.mime, m.name, m.size, m.sha256, m.created_at_ms, t.mime, t.bytes
                 FROM media m LEFT JOIN media_thumbnails t ON t.media_id = m.media_id WHERE m.media_id = $1",
            )
            .await?;
        match client.query_opt(&stmt, &[&id.0]).await? {
            Some(r) => {
                let mime: Option<String> = r.try_get(7)?;
                let bytes: Option<Vec<u8>> = r.try_get(8)?;
                let thumbnail = mime.zip(bytes).map(|(mime, bytes)| Thumbnail { mime, bytes });
                Ok(Some((media_record(&r)?, thumbnail)))
            }
            None => Ok(None),
        }
    }

    async fn setting_or_init(&self, key: &str, init: &str) -> Result<String> {
        let client = self.pool.get().await?;
        let insert = client
            .prepare_cached("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .await?;
        client.execute(&insert, &[&key, &init]).await?;
        let select = client.prepare_cached("SELECT value FROM settings WHERE key = $1").await?;
        Ok(client.query_one(&select, &[&key]).await?.try_get(0)?)
    }

    async fn put_push_subscription(&self, record: &PushSubscriptionRecord, keep: usize) -> Result<()> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let upsert = tx
            .prepare_cached(
                "INSERT INTO push_subscriptions (endpoint, user_id, token_hash, p256dh, auth, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (endpoint) DO UPDATE SET user_id = EXCLUDED.user_id, token_hash = EXCLUDED.token_hash,
                     p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth, created_at_ms = EXCLUDED.created_at_ms",
            )
            .await?;
        let r = record;
        tx.execute(&upsert, &[&r.endpoint, &r.user.0, &r.token_hash, &r.p256dh, &r.auth, &r.created_at_ms]).await?;
        let trim = tx
            .prepare_cached(
                "DELETE FROM push_subscriptions WHERE endpoint IN (
                     SELECT endpoint FROM push_subscriptions WHERE user_id = $1
                     ORDER BY created_at_ms DESC, endpoint OFFSET $2)",
            )
            .await?;
        tx.execute(&trim, &[&r.user.0, &keep]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn push_subscriptions(&self, user: UserId, now_ms: i64) -> Result<Vec<PushSubscriptionRecord>> {
        let limit = i64::from(MAX_ROWS);
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT s.endpoint, s.user_id, s.token_hash, s.p256dh, s.auth, s.created_at_ms
                 FROM push_subscriptions s
                 CROSS JOIN LATERAL (SELECT 1 FROM tokens t
                                     WHERE t.token_hash = s.token_hash AND t.expires_at_ms > $2 LIMIT 1) live
                 WHERE s.user_id = $1 ORDER BY s.created_at_ms DESC LIMIT $3",
            )
            .await?;
        client
            .query(&stmt, &[&user.0, &now_ms, &limit])
            .await?
            .iter()
            .map(|r| {
                Ok(PushSubscriptionRecord {
                    endpoint: r.try_get(0)?,
                    user: UserId(r.try_get(1)?),
                    token_hash: r.try_get(2)?,
                    p256dh: r.try_get(3)?,
                    auth: r.try_get(4)?,
                    created_at_ms: r.try_get(5)?,
                })
            })
            .collect()
    }

    async fn set_muted(&self, user: UserId, conversation: ConversationId, until_ms: Option<i64>) -> Result<bool> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE user_conversations SET muted_until_ms = $3 WHERE user_id = $1 AND conversation_id = $2",
            )
            .await?;
        Ok(client.execute(&stmt, &[&user.0, &conversation.0, &until_ms]).await? > 0)
    }

    async fn muted(&self, user: UserId, now_ms: i64) -> Result<Vec<(ConversationId, i64)>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT conversation_id, muted_until_ms FROM user_conversations
                 WHERE user_id = $1 AND muted_until_ms > $2",
            )
            .await?;
        client
            .query(&stmt, &[&user.0, &now_ms])
            .await?
            .iter()
            .map(|r| Ok((ConversationId(r.try_get(0)?), r.try_get(1)?)))
            .collect()
    }

    async fn delete_push_subscription(&self, endpoint: &str, user: Option<UserId>) -> Result<bool> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("DELETE FROM push_subscriptions WHERE endpoint = $1 AND ($2::uuid IS NULL OR user_id = $2)")
            .await?;
        Ok(client.execute(&stmt, &[&endpoint, &user.map(|u| u.0)]).await? > 0)
    }

    async fn list_users(&self, limit: u32) -> Result<Vec<UserView>> {
        let limit = i64::from(limit.clamp(1, MAX_ROWS));
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached("SELECT id, username FROM users ORDER BY username LIMIT $1").await?;
        client.query(&stmt, &[&limit]).await?.iter().map(user_view).collect()
    }

    async fn insert_token(&self, token_hash: &str, user: UserId, expires_at_ms: i64) -> Result<()> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("INSERT INTO tokens (token_hash, user_id, expires_at_ms) VALUES ($1, $2, $3)")
            .await?;
        client.execute(&stmt, &[&token_hash, &user.0, &expires_at_ms]).await?;
        Ok(())
    }

    async fn token_user(&self, token_hash: &str, now_ms: i64) -> Result<Option<TokenGrant>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT u.id, u.username, t.expires_at_ms FROM tokens t JOIN users u ON u.id = t.user_id
                 WHERE t.token_hash = $1 AND t.expires_at_ms > $2",
            )
            .await?;
        let row = client.query_opt(&stmt, &[&token_hash, &now_ms]).await?;
        row.map(|r| Ok(TokenGrant { user: user_view(&r)?, expires_at_ms: r.try_get(2)? })).transpose()
    }

    async fn delete_token(&self, token_hash: &str) -> Result<()> {
        let client = self.pool.get().await?;
        // Subscriptions first: a failure between the two leaves a token without notifications,
        // never notifications without a token.
        let subs = client.prepare_cached("DELETE FROM push_subscriptions WHERE token_hash = $1").await?;
        client.execute(&subs, &[&token_hash]).await?;
        let stmt = client.prepare_cached("DELETE FROM tokens WHERE token_hash = $1").await?;
        client.execute(&stmt, &[&token_hash]).await?;
        Ok(())
    }

    /// The first call wins: a repeated call changes nothing, not even the member list.
    async fn add_conversation(
        &self,
        conversation: ConversationId,
        kind: ConversationKind,
        members: &[UserId],
        now_ms: i64,
    ) -> Result<()> {
        let mut members: Vec<Uuid> = members.iter().map(|m| m.0).collect();
        members.sort();
        members.dedup();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO conversations (id, kind, members, created_at_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        tx.execute(&insert, &[&conversation.0, &kind_code(kind), &members, &now_ms]).await?;
        index_members(&tx, conversation, &members).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn user_conversations(&self, user: UserId) -> Result<Vec<ConversationRecord>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT c.id, c.kind, c.members, c.name, c.owner, c.version FROM user_conversations uc
                 CROSS JOIN LATERAL (
                     SELECT id, kind, members, name, owner, version, created_at_ms FROM conversations
                     WHERE id = uc.conversation_id LIMIT 1
                 ) c
                 WHERE uc.user_id = $1 ORDER BY c.created_at_ms, c.id",
            )
            .await?;
        client.query(&stmt, &[&user.0]).await?.iter().map(conversation_record).collect()
    }

    async fn conversation(&self, conversation: ConversationId) -> Result<Option<ConversationRecord>> {
        let client = self.pool.get().await?;
        let stmt =
            client.prepare_cached(&format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1")).await?;
        client.query_opt(&stmt, &[&conversation.0]).await?.as_ref().map(conversation_record).transpose()
    }

    async fn create_group(&self, group: &ConversationRecord, now_ms: i64) -> Result<()> {
        let mut members: Vec<Uuid> = group.members.iter().map(|m| m.0).collect();
        members.sort();
        members.dedup();
        let owner = group.owner.map(|o| o.0);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO conversations (id, kind, members, created_at_ms, name, owner, version)
                 VALUES ($1, $2, $3, $4, $5, $6, 0)",
            )
            .await?;
        tx.execute(
            &insert,
            &[&group.id.0, &kind_code(ConversationKind::Group), &members, &now_ms, &group.name, &owner],
        )
        .await?;
        index_members(&tx, group.id, &members).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_group(&self, expected_version: u64, next: &ConversationRecord, removed: &[UserId]) -> Result<bool> {
        let mut members: Vec<Uuid> = next.members.iter().map(|m| m.0).collect();
        members.sort();
        members.dedup();
        let removed: Vec<Uuid> = removed.iter().map(|m| m.0).filter(|m| !members.contains(m)).collect();
        let owner = next.owner.map(|o| o.0);
        let expected = to_db(expected_version);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let update = tx
            .prepare_cached(
                "UPDATE conversations SET members = $3, name = $4, owner = $5, version = version + 1
                 WHERE id = $1 AND version = $2 AND kind = 1",
            )
            .await?;
        if tx.execute(&update, &[&next.id.0, &expected, &members, &next.name, &owner]).await? == 0 {
            return Ok(false);
        }
        index_members(&tx, next.id, &members).await?;
        let unindex = tx
            .prepare_cached("DELETE FROM user_conversations WHERE conversation_id = $1 AND user_id = ANY($2::uuid[])")
            .await?;
        tx.execute(&unindex, &[&next.id.0, &removed]).await?;
        tx.commit().await?;
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------------
// Shard store
// ---------------------------------------------------------------------------------------------

impl PgShard {
    fn shard_db(&self) -> i32 {
        shard_db(self.shard)
    }

    /// The lease transaction of [`ShardStore::acquire_lease`].
    async fn grant(&self, owner: &str, ttl_ms: i64, lock: SessionLock) -> Result<Option<LeaseGrant>> {
        let shard = self.shard_db();
        let mut client = self.backend.lease_pool.get().await?;
        let tx = client.transaction().await?;
        let create = tx
            .prepare_cached(
                "INSERT INTO shard_leases (shard, owner, epoch, expires_at)
                 VALUES ($1, NULL, 0, to_timestamp(0)) ON CONFLICT (shard) DO NOTHING",
            )
            .await?;
        tx.execute(&create, &[&shard]).await?;
        let read =
            tx.prepare_cached("SELECT owner, expires_at < now() FROM shard_leases WHERE shard = $1 FOR UPDATE").await?;
        let row = tx.query_one(&read, &[&shard]).await?;
        let holder: Option<String> = row.try_get(0)?;
        let expired: bool = row.try_get(1)?;
        let free = holder.as_deref().is_none_or(|h| h == owner) || expired;
        if !free && lock != SessionLock::Obtained {
            tx.rollback().await?;
            return Ok(None);
        }
        let update = tx
            .prepare_cached(concat!(
                "UPDATE shard_leases SET epoch = epoch + 1, owner = $2,
                     expires_at = now() + $3::bigint * interval '1 millisecond'
                 WHERE shard = $1 RETURNING epoch, ",
                ms!("expires_at")
            ))
            .await?;
        let row = tx.query_one(&update, &[&shard, &owner, &ttl_ms]).await?;
        let grant = LeaseGrant { epoch: Epoch(from_db(row.try_get(0)?, "epoch")?), expires_at_ms: row.try_get(1)? };
        tx.commit().await?;
        Ok(Some(grant))
    }

    /// The lease row's owner and epoch (none and 0 when there is no row yet).
    async fn current_lease(&self) -> Result<(Option<String>, u64)> {
        let client = self.backend.lease_pool.get().await?;
        let stmt = client.prepare_cached("SELECT owner, epoch FROM shard_leases WHERE shard = $1").await?;
        match client.query_opt(&stmt, &[&self.shard_db()]).await? {
            Some(row) => Ok((row.try_get(0)?, from_db(row.try_get(1)?, "epoch")?)),
            None => Ok((None, 0)),
        }
    }
}

#[async_trait]
impl ShardStore for PgShard {
    fn shard(&self) -> ShardId {
        self.shard
    }

    async fn acquire_lease(&self, owner: &str, ttl_ms: u64) -> Result<Option<LeaseGrant>> {
        let ttl = to_db(ttl_ms.clamp(1, MAX_LEASE_TTL_MS));
        let lock = self.backend.locks.try_lock(self.shard, owner).await;
        let granted = self.grant(owner, ttl, lock).await;
        if lock == SessionLock::Obtained && !matches!(granted, Ok(Some(_))) {
            // We took the lock only to try; holding it without the lease would block the owner's
            // successor from the fast path.
            self.backend.locks.unlock(self.shard, Some(owner)).await;
        }
        if let Ok(Some(grant)) = &granted {
            if lock == SessionLock::AlreadyHeld {
                self.backend.locks.set_holder(self.shard, owner).await;
            }
            tracing::info!(shard = %self.shard, owner, epoch = %grant.epoch, ?lock, "lease granted");
        }
        granted
    }

    async fn renew_lease(&self, owner: &str, epoch: Epoch, ttl_ms: u64) -> Result<LeaseGrant> {
        let ttl = to_db(ttl_ms.clamp(1, MAX_LEASE_TTL_MS));
        let renewed = {
            let client = self.backend.lease_pool.get().await?;
            let stmt = client
                .prepare_cached(concat!(
                    "UPDATE shard_leases SET expires_at = now() + $4::bigint * interval '1 millisecond'
                     WHERE shard = $1 AND epoch = $2 AND owner = $3 RETURNING ",
                    ms!("expires_at")
                ))
                .await?;
            client.query_opt(&stmt, &[&self.shard_db(), &to_db(epoch.0), &owner, &ttl]).await?
        };
        let Some(row) = renewed else {
            let (holder, current) = self.current_lease().await?;
            if holder.as_deref() != Some(owner) {
                // The lease moved on: the session lock would only block its new owner's fast path.
                self.backend.locks.unlock(self.shard, Some(owner)).await;
            }
            return Err(StorageError::StaleEpoch { shard: self.shard.0, held: epoch.0, current });
        };
        // Leases taken over by expiry come without the session lock (the old owner's session
        // still held it); take it as soon as it is free so the fast path protects us too.
        self.backend.locks.try_lock_if_idle(self.shard, owner).await;
        Ok(LeaseGrant { epoch, expires_at_ms: row.try_get(0)? })
    }

    async fn release_lease(&self, owner: &str, epoch: Epoch) -> Result<()> {
        {
            let client = self.backend.lease_pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "UPDATE shard_leases SET owner = NULL, expires_at = now() - interval '1 millisecond'
                     WHERE shard = $1 AND epoch = $2 AND owner = $3",
                )
                .await?;
            client.execute(&stmt, &[&self.shard_db(), &to_db(epoch.0), &owner]).await?;
        }
        self.backend.locks.unlock(self.shard, Some(owner)).await;
        Ok(())
    }

    async fn lease_info(&self) -> Result<LeaseInfo> {
        let client = self.backend.lease_pool.get().await?;
        let stmt = client
            .prepare_cached(concat!(
                "SELECT l.owner, COALESCE(l.epoch, 0), COALESCE(",
                ms!("l.expires_at"),
                ", 0), ",
                ms!("clock_timestamp()"),
                " FROM (SELECT 1) AS one LEFT JOIN shard_leases l ON l.shard = $1"
            ))
            .await?;
        let row = client.query_one(&stmt, &[&self.shard_db()]).await?;
        Ok(LeaseInfo {
            shard: self.shard,
            owner: row.try_get(0)?,
            epoch: Epoch(from_db(row.try_get(1)?, "epoch")?),
            expires_at_ms: row.try_get(2)?,
            now_ms: row.try_get(3)?,
        })
    }

    async fn commit(&self, epoch: Epoch, batch: &WriteBatch) -> Result<Committed> {
        self.backend.committer.commit(self.shard, epoch, batch).await
    }

    async fn history(
        &self,
        conversation: ConversationId,
        before_seq: Option<Seq>,
        limit: u32,
    ) -> Result<(Vec<MessageView>, bool)> {
        let limit = limit.clamp(1, MAX_ROWS);
        let before = before_seq.map(to_db).unwrap_or(i64::MAX);
        let client = self.backend.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m
                 WHERE m.conversation_id = $1 AND m.seq < $2
                 ORDER BY m.seq DESC LIMIT $3"
            ))
            .await?;
        let rows = client.query(&stmt, &[&conversation.0, &before, &(i64::from(limit) + 1)]).await?;
        let has_more = rows.len() > limit as usize;
        let mut page = rows.iter().take(limit as usize).map(|r| message_view(r, 0)).collect::<Result<Vec<_>>>()?;
        page.reverse();
        Ok((page, has_more))
    }

    async fn sync(&self, request: &SyncRequest) -> Result<SyncReply> {
        let limit = request.per_conversation_limit.clamp(1, MAX_ROWS);
        let conversations: Vec<Uuid> = distinct(&request.conversations).into_iter().map(|c| c.0).collect();
        let client = self.backend.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS}
                 FROM UNNEST($1::uuid[]) WITH ORDINALITY AS c(id, ord)
                 CROSS JOIN LATERAL (
                     SELECT COALESCE((SELECT delivered_seq FROM cursors
                                      WHERE conversation_id = c.id AND user_id = $2
                                        AND device_id = $3), 0) AS after
                 ) cur
                 CROSS JOIN LATERAL (
                     SELECT * FROM messages
                     WHERE conversation_id = c.id AND seq > cur.after
                     ORDER BY seq LIMIT $4
                 ) m
                 ORDER BY c.ord, m.seq"
            ))
            .await?;
        let rows = client
            .query(&stmt, &[&conversations, &request.user.0, &request.device.as_str(), &(i64::from(limit) + 1)])
            .await?;
        let mut reply = SyncReply::default();
        let mut taken: HashMap<ConversationId, u32> = HashMap::new();
        for row in &rows {
            let message = message_view(row, 0)?;
            let n = taken.entry(message.conversation_id).or_insert(0);
            *n += 1;
            if *n > limit {
                reply.truncated.push(message.conversation_id);
            } else {
                reply.messages.push(message);
            }
        }
        Ok(reply)
    }

    async fn summaries(&self, user: UserId, conversations: &[ConversationId]) -> Result<Vec<ShardSummary>> {
        let conversations: Vec<Uuid> = distinct(conversations).into_iter().map(|c| c.0).collect();
        let client = self.backend.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT sc.conversation_id, sc.last_seq, COALESCE(cur.read_seq, 0),
                        (SELECT count(*) FROM messages u
                         WHERE u.conversation_id = sc.conversation_id
                           AND u.seq > COALESCE(cur.read_seq, 0) AND u.sender <> $2),
                        peer.n, peer.delivered, peer.read,
                        {MESSAGE_COLUMNS}
                 FROM UNNEST($3::uuid[]) WITH ORDINALITY AS c(id, ord)
                 CROSS JOIN LATERAL (
                     SELECT conversation_id, last_seq FROM shard_conversations
                     WHERE conversation_id = c.id AND shard = $1 LIMIT 1
                 ) sc
                 LEFT JOIN LATERAL (
                     SELECT read_seq FROM cursors
                     WHERE conversation_id = c.id AND user_id = $2 AND device_id = '' LIMIT 1
                 ) cur ON true
                 CROSS JOIN LATERAL (
                     -- At most two rows are read: a group's cursors are not scanned to find out
                     -- that there is more than one other member.
                     SELECT count(*) AS n, min(delivered_seq) AS delivered, min(read_seq) AS read
                     FROM (SELECT delivered_seq, read_seq FROM cursors
                           WHERE conversation_id = c.id AND device_id = '' AND user_id <> $2 LIMIT 2) o
                 ) peer
                 LEFT JOIN LATERAL (
                     SELECT * FROM messages
                     WHERE conversation_id = sc.conversation_id AND seq = sc.last_seq LIMIT 1
                 ) m ON true
                 ORDER BY c.ord"
            ))
            .await?;
        let rows = client.query(&stmt, &[&self.shard_db(), &user.0, &conversations]).await?;
        rows.iter()
            .map(|row| {
                let last_message = match row.try_get::<_, Option<Uuid>>(7)? {
                    Some(_) => Some(message_view(row, 7)?),
                    None => None,
                };
                let peer_cursor = match row.try_get::<_, i64>(4)? {
                    1 => Some((
                        from_db(row.try_get::<_, i64>(5)?, "peer delivered_seq")?,
                        from_db(row.try_get::<_, i64>(6)?, "peer read_seq")?,
                    )),
                    _ => None,
                };
                Ok(ShardSummary {
                    conversation_id: ConversationId(row.try_get(0)?),
                    last_seq: from_db(row.try_get(1)?, "last_seq")?,
                    read_seq: from_db(row.try_get(2)?, "read_seq")?,
                    unread: from_db(row.try_get(3)?, "unread count")?,
                    last_message,
                    peer_cursor,
                })
            })
            .collect()
    }

    async fn group_floors(&self, groups: &[(ConversationId, Vec<UserId>)]) -> Result<Vec<GroupFloor>> {
        // One row per (group, member), each joined to its cursor by a LATERAL probe of the
        // primary key (a plain join was planned as a scan of `cursors`: tests/tests/pg_plans.rs);
        // a member without a cursor joins as NULL, which counts as 0.
        let (mut conversations, mut users) = (Vec::new(), Vec::new());
        for (conversation, members) in groups {
            for user in members {
                conversations.push(conversation.0);
                users.push(user.0);
            }
        }
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.backend.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT p.conversation_id, min(COALESCE(c.delivered_seq, 0)), min(COALESCE(c.read_seq, 0))
                 FROM UNNEST($1::uuid[], $2::uuid[]) AS p(conversation_id, user_id)
                 LEFT JOIN LATERAL (
                     SELECT delivered_seq, read_seq FROM cursors
                     WHERE conversation_id = p.conversation_id AND user_id = p.user_id AND device_id = ''
                     LIMIT 1
                 ) c ON true
                 GROUP BY p.conversation_id",
            )
            .await?;
        client
            .query(&stmt, &[&conversations, &users])
            .await?
            .iter()
            .map(|row| {
                Ok(GroupFloor {
                    conversation_id: ConversationId(row.try_get(0)?),
                    delivered_seq: from_db(row.try_get(1)?, "group delivered_seq")?,
                    read_seq: from_db(row.try_get(2)?, "group read_seq")?,
                })
            })
            .collect()
    }

    async fn member_cursor(&self, conversation: ConversationId, user: UserId) -> Result<(Seq, Seq)> {
        let client = self.backend.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT delivered_seq, read_seq FROM cursors
                 WHERE conversation_id = $1 AND user_id = $2 AND device_id = ''",
            )
            .await?;
        match client.query_opt(&stmt, &[&conversation.0, &user.0]).await? {
            Some(row) => Ok((from_db(row.try_get(0)?, "delivered_seq")?, from_db(row.try_get(1)?, "read_seq")?)),
            None => Ok((0, 0)),
        }
    }

    async fn epochs(&self, conversation: ConversationId) -> Result<Vec<(Seq, Epoch)>> {
        let client = self.backend.pool.get().await?;
        let stmt =
            client.prepare_cached("SELECT seq, epoch FROM messages WHERE conversation_id = $1 ORDER BY seq").await?;
        client
            .query(&stmt, &[&conversation.0])
            .await?
            .iter()
            .map(|row| Ok((from_db(row.try_get(0)?, "seq")?, Epoch(from_db(row.try_get(1)?, "epoch")?))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_run_without_jit_unless_the_url_says_otherwise() {
        let plain = connection_config("postgres://u@127.0.0.1:5432/db").unwrap();
        assert_eq!(plain.get_options(), Some("-c jit=off"));
        assert_eq!(plain.get_application_name(), Some("parley"));
        let with_options = connection_config("postgres://u@127.0.0.1/db?options=-c%20work_mem%3D8MB").unwrap();
        assert_eq!(with_options.get_options(), Some("-c work_mem=8MB -c jit=off"));
        let chosen = connection_config("postgres://u@127.0.0.1/db?options=-c%20jit%3Don").unwrap();
        assert_eq!(chosen.get_options(), Some("-c jit=on"));
    }

    #[test]
    fn commit_connections_use_generic_plans_unless_the_url_says_otherwise() {
        let plain = commit_connection_config("postgres://u@127.0.0.1:5432/db").unwrap();
        assert_eq!(plain.get_options(), Some("-c jit=off -c plan_cache_mode=force_generic_plan"));
        let chosen = commit_connection_config("postgres://u@127.0.0.1/db?options=-c%20plan_cache_mode%3Dauto").unwrap();
        assert_eq!(chosen.get_options(), Some("-c plan_cache_mode=auto -c jit=off"));
        // Reads keep the server's choice.
        let reads = connection_config("postgres://u@127.0.0.1:5432/db").unwrap();
        assert!(!reads.get_options().unwrap_or_default().contains("plan_cache_mode"));
    }
}
