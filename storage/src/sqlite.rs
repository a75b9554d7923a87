//! Embedded backend: SQLite in WAL mode, one file per shard plus `directory.db`.
//!
//! Why this shape: it needs no service, and several node processes on one machine can share the
//! same directory (SQLite serialises writers per file with `BEGIN IMMEDIATE`; WAL lets readers run
//! beside the writer). One file per shard means shards never contend with each other.
//!
//! Fencing: the lease row lives in the shard's own file, so the epoch check and the message insert
//! happen in one `BEGIN IMMEDIATE` transaction — no other writer can slip in between.
//! The session lock is an exclusive `flock` on `shard-NNN.lock`: the kernel drops it the moment the
//! holding process dies, which lets a restarted or surviving node take over at once after a kill -9
//! instead of waiting for the lease to expire.
//!
//! rusqlite is blocking, so every call runs on tokio's blocking pool; a connection is used by one
//! call at a time (a std mutex, never held across `.await`).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use parley_protocol::cluster::{StoredAck, SyncReply, SyncRequest};
use parley_protocol::frames::{ConversationKind, MessageView, ReceiptKind};
use parley_protocol::http::UserView;
use parley_protocol::media::MediaRef;
use parley_protocol::privacy::PrivacySettings;
use parley_protocol::{ClientMsgId, ConversationId, Epoch, MediaId, MessageId, Seq, ShardId, UserId};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use crate::model::*;
use crate::{privacy_codes, privacy_from_codes, version_of, Directory, Result, ShardStore, StorageError};

/// How long a writer waits for another process's transaction on the same file before failing.
/// Transactions here are short (a batch insert); 5 s only trips when something is badly wrong.
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// The store refuses page sizes above this whatever the caller asks (defence in depth).
pub(crate) const MAX_ROWS: u32 = 1_000;

type Conn = Arc<Mutex<Connection>>;

/// Run `f` with the connection on the blocking pool.
async fn with<T, F>(conn: &Conn, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
{
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = conn.lock().map_err(|_| StorageError::Join("connection mutex poisoned".into()))?;
        f(&mut guard)
    })
    .await
    .map_err(|e| StorageError::Join(e.to_string()))?
}

/// Open a file, retrying while another process holds it (several nodes starting at once on one
/// data directory all switch it to WAL and create the schema; SQLite answers `SQLITE_BUSY` to
/// some of them even with a busy timeout).
fn open_with_schema(path: &Path, schema: &str) -> Result<Connection> {
    let mut attempt = 0;
    loop {
        let result = open_conn(path).and_then(|c| {
            c.execute_batch(schema)?;
            Ok(c)
        });
        match result {
            Err(StorageError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                    && attempt < OPEN_RETRIES =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// 100 × 50 ms: a contended open gives up after about 5 s.
const OPEN_RETRIES: u32 = 100;

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    // WAL: readers beside the writer, and several processes may share the file.
    // synchronous=FULL: a commit is on disk before it returns, because acks promise durability.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn uuid_of(bytes: Vec<u8>) -> Result<Uuid> {
    Uuid::from_slice(&bytes).map_err(|e| StorageError::Corrupt(format!("uuid column: {e}")))
}

fn kind_code(kind: ConversationKind) -> i64 {
    match kind {
        ConversationKind::Direct => 0,
        ConversationKind::Group => 1,
    }
}

fn kind_of(code: i64) -> Result<ConversationKind> {
    match code {
        0 => Ok(ConversationKind::Direct),
        1 => Ok(ConversationKind::Group),
        other => Err(StorageError::Corrupt(format!("conversation kind {other}"))),
    }
}

const DIRECTORY_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id BLOB PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    last_seen_ms INTEGER,
    last_seen_audience INTEGER NOT NULL DEFAULT 0,
    online_audience INTEGER NOT NULL DEFAULT 0,
    rules_version INTEGER NOT NULL DEFAULT 0,
    groups_audience INTEGER NOT NULL DEFAULT 0,
    read_receipts INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS contacts (
    owner BLOB NOT NULL REFERENCES users(id),
    contact BLOB NOT NULL REFERENCES users(id),
    added_at_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, contact)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    user_id BLOB NOT NULL REFERENCES users(id),
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    members TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    name TEXT,
    owner BLOB,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS user_conversations (
    user_id BLOB NOT NULL,
    conversation_id BLOB NOT NULL,
    muted_until_ms INTEGER,
    PRIMARY KEY (user_id, conversation_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS push_subscriptions (
    endpoint TEXT PRIMARY KEY,
    user_id BLOB NOT NULL REFERENCES users(id),
    token_hash TEXT NOT NULL,
    p256dh TEXT NOT NULL,
    auth TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS push_subscriptions_user ON push_subscriptions (user_id, created_at_ms);
CREATE INDEX IF NOT EXISTS push_subscriptions_token ON push_subscriptions (token_hash);
";

const SHARD_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS lease (
    shard INTEGER PRIMARY KEY,
    owner TEXT,
    epoch INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id BLOB PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    conversation_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    message_id BLOB NOT NULL UNIQUE,
    sender BLOB NOT NULL,
    client_msg_id TEXT NOT NULL,
    body TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    media TEXT,
    PRIMARY KEY (conversation_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency ON messages (conversation_id, sender, client_msg_id);
CREATE TABLE IF NOT EXISTS cursors (
    conversation_id BLOB NOT NULL,
    user_id BLOB NOT NULL,
    device_id TEXT NOT NULL,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    read_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, user_id, device_id)
) WITHOUT ROWID;
";

/// Uploads live in `media.db`, a file of their own, so that storing or reading a 16 MiB file does
/// not hold up the directory's connection (every sign-in and token check goes through it).
const MEDIA_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS media (
    media_id BLOB PRIMARY KEY,
    owner BLOB NOT NULL,
    mime TEXT NOT NULL,
    name TEXT,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    bytes BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
-- A user's uploads, summed for their quota on every upload and listed newest first (covering for
-- the sum: the bytes are not read).
CREATE INDEX IF NOT EXISTS media_owner_time ON media (owner, created_at_ms, media_id, size);
-- An image upload's thumbnail, written and deleted with it.
CREATE TABLE IF NOT EXISTS media_thumbnails (
    media_id BLOB PRIMARY KEY,
    mime TEXT NOT NULL,
    bytes BLOB NOT NULL
);
";

/// Add `column` to `table` with `ddl` unless it is there: how files made by an older version are
/// brought up to the current schema (SQLite has no `ADD COLUMN IF NOT EXISTS`).
fn add_missing_column(conn: &Connection, table: &str, column: &str, ddl: &str) -> Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let columns: Vec<String> = stmt.query_map([table], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    if !columns.iter().any(|c| c == column) {
        conn.execute_batch(ddl)?;
    }
    Ok(())
}

/// Bring a `directory.db` made by an older version up to [`DIRECTORY_SCHEMA`]: the group columns
/// of `conversations` (added in the version that brought groups), `users.last_seen_ms` (added
/// with presence) and the privacy columns of `users` (`contacts` is created by the schema). Idempotent; runs at every open.
fn upgrade_directory(conn: &Connection) -> Result<()> {
    for (table, column, ddl) in [
        ("conversations", "name", "ALTER TABLE conversations ADD COLUMN name TEXT"),
        ("conversations", "owner", "ALTER TABLE conversations ADD COLUMN owner BLOB"),
        ("conversations", "version", "ALTER TABLE conversations ADD COLUMN version INTEGER NOT NULL DEFAULT 0"),
        ("users", "last_seen_ms", "ALTER TABLE users ADD COLUMN last_seen_ms INTEGER"),
        ("users", "last_seen_audience", "ALTER TABLE users ADD COLUMN last_seen_audience INTEGER NOT NULL DEFAULT 0"),
        ("users", "online_audience", "ALTER TABLE users ADD COLUMN online_audience INTEGER NOT NULL DEFAULT 0"),
        ("users", "rules_version", "ALTER TABLE users ADD COLUMN rules_version INTEGER NOT NULL DEFAULT 0"),
        ("users", "groups_audience", "ALTER TABLE users ADD COLUMN groups_audience INTEGER NOT NULL DEFAULT 0"),
        ("users", "read_receipts", "ALTER TABLE users ADD COLUMN read_receipts INTEGER NOT NULL DEFAULT 1"),
    ] {
        add_missing_column(conn, table, column, ddl)?;
    }
    Ok(())
}

/// The embedded backend rooted at one directory.
#[derive(Clone)]
pub struct SqliteBackend {
    dir: PathBuf,
    directory: Conn,
    media: Conn,
}

impl SqliteBackend {
    pub async fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("directory.db");
        let media_path = dir.join("media.db");
        let (conn, media) = tokio::task::spawn_blocking(move || {
            let conn = open_with_schema(&path, DIRECTORY_SCHEMA)?;
            // Files made before muting existed.
            add_missing_column(
                &conn,
                "user_conversations",
                "muted_until_ms",
                "ALTER TABLE user_conversations ADD COLUMN muted_until_ms INTEGER",
            )?;
            upgrade_directory(&conn)?;
            let media = open_with_schema(&media_path, MEDIA_SCHEMA)?;
            Ok::<_, StorageError>((conn, media))
        })
        .await
        .map_err(|e| StorageError::Join(e.to_string()))??;
        Ok(SqliteBackend {
            dir: dir.to_path_buf(),
            directory: Arc::new(Mutex::new(conn)),
            media: Arc::new(Mutex::new(media)),
        })
    }

    pub fn directory(&self) -> SqliteDirectory {
        SqliteDirectory { conn: self.directory.clone(), media: self.media.clone() }
    }

    pub async fn shard(&self, shard: ShardId) -> Result<SqliteShard> {
        let db = self.dir.join(format!("shard-{:03}.db", shard.0));
        let lock = self.dir.join(format!("shard-{:03}.lock", shard.0));
        let (writer, reader) = tokio::task::spawn_blocking(move || -> Result<(Connection, Connection)> {
            let writer = open_with_schema(&db, SHARD_SCHEMA)?;
            // Files made before media existed.
            add_missing_column(&writer, "messages", "media", "ALTER TABLE messages ADD COLUMN media TEXT")?;
            writer.execute(
                "INSERT OR IGNORE INTO lease (shard, owner, epoch, expires_at_ms) VALUES (?1, NULL, 0, 0)",
                params![shard.0],
            )?;
            let reader = open_conn(&db)?;
            Ok((writer, reader))
        })
        .await
        .map_err(|e| StorageError::Join(e.to_string()))??;
        Ok(SqliteShard {
            shard,
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            lock_path: lock,
            lock_file: Arc::new(Mutex::new(None)),
        })
    }
}

/// Accounts, tokens and the conversation index in `directory.db`; uploads in `media.db`.
pub struct SqliteDirectory {
    conn: Conn,
    media: Conn,
}

#[async_trait]
impl Directory for SqliteDirectory {
    async fn create_user(&self, user: &UserRecord) -> Result<()> {
        let user = user.clone();
        with(&self.conn, move |c| {
            let r = c.execute(
                "INSERT INTO users (id, username, password_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![user.id.0.as_bytes().to_vec(), user.username, user.password_hash, user.created_at_ms],
            );
            match r {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                    Err(StorageError::UsernameTaken)
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        let username = username.to_string();
        with(&self.conn, move |c| {
            let row = c
                .query_row(
                    "SELECT id, username, password_hash, created_at_ms FROM users WHERE username = ?1",
                    params![username],
                    |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            row.map(|(id, username, password_hash, created_at_ms)| {
                Ok(UserRecord { id: UserId(uuid_of(id)?), username, password_hash, created_at_ms })
            })
            .transpose()
        })
        .await
    }

    async fn users_by_id(&self, ids: &[UserId]) -> Result<Vec<UserView>> {
        let ids = ids.to_vec();
        with(&self.conn, move |c| {
            let mut stmt = c.prepare_cached("SELECT username FROM users WHERE id = ?1")?;
            let mut out = Vec::new();
            for id in ids {
                if let Some(username) = stmt.query_row(params![id.0.as_bytes().to_vec()], |r| r.get(0)).optional()? {
                    out.push(UserView { id, username });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_media(
        &self,
        record: &MediaRecord,
        bytes: &[u8],
        thumbnail: Option<&Thumbnail>,
        quota_bytes: u64,
    ) -> Result<()> {
        let record = record.clone();
        let bytes = bytes.to_vec();
        let thumbnail = thumbnail.cloned();
        with(&self.media, move |c| {
            let m = &record.media;
            // IMMEDIATE: the file's write lock from the sum to the commit, so that uploads from
            // other node processes sharing the file cannot pass the quota together.
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let owner = record.owner.0.as_bytes().to_vec();
            let used: i64 =
                tx.query_row("SELECT COALESCE(sum(size), 0) FROM media WHERE owner = ?1", params![owner], |r| {
                    r.get(0)
                })?;
            let used = u64::try_from(used).map_err(|_| StorageError::Corrupt(format!("media total {used}")))?;
            if used.saturating_add(m.size) > quota_bytes {
                return Err(StorageError::MediaQuotaExceeded { used, quota: quota_bytes });
            }
            tx.execute(
                "INSERT INTO media (media_id, owner, mime, name, size, sha256, bytes, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    m.media_id.0.as_bytes().to_vec(),
                    record.owner.0.as_bytes().to_vec(),
                    m.mime,
                    m.name,
                    i64::try_from(m.size).map_err(|_| StorageError::Corrupt(format!("media size {}", m.size)))?,
                    m.sha256,
                    bytes,
                    record.created_at_ms
                ],
            )?;
            if let Some(t) = thumbnail {
                tx.execute(
                    "INSERT INTO media_thumbnails (media_id, mime, bytes) VALUES (?1, ?2, ?3)",
                    params![m.media_id.0.as_bytes().to_vec(), t.mime, t.bytes],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn media_totals(&self, owner: UserId) -> Result<MediaTotals> {
        with(&self.media, move |c| {
            let (uploads, bytes): (i64, i64) = c.query_row(
                "SELECT count(*), COALESCE(sum(size), 0) FROM media WHERE owner = ?1",
                params![owner.0.as_bytes().to_vec()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let count = |v: i64, what: &str| u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{what} {v}")));
            Ok(MediaTotals { uploads: count(uploads, "upload count")?, bytes: count(bytes, "media total")? })
        })
        .await
    }

    async fn media_list(&self, owner: UserId, before: Option<(i64, MediaId)>, limit: u32) -> Result<Vec<MediaRecord>> {
        let (before_ms, before_id) = before.map_or((i64::MAX, Uuid::max()), |(ms, id)| (ms, id.0));
        let limit = limit.clamp(1, MAX_ROWS);
        with(&self.media, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT media_id, owner, mime, name, size, sha256, created_at_ms FROM media
                 WHERE owner = ?1 AND (created_at_ms, media_id) < (?2, ?3)
                 ORDER BY created_at_ms DESC, media_id DESC LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![owner.0.as_bytes().to_vec(), before_ms, before_id.as_bytes().to_vec(), limit],
                media_row,
            )?;
            rows.map(|r| media_record(r?)).collect()
        })
        .await
    }

    async fn delete_media(&self, id: MediaId, owner: UserId) -> Result<MediaDeletion> {
        with(&self.media, move |c| {
            let id = id.0.as_bytes().to_vec();
            let tx = c.transaction()?;
            let deleted = tx.execute(
                "DELETE FROM media WHERE media_id = ?1 AND owner = ?2",
                params![id, owner.0.as_bytes().to_vec()],
            )?;
            if deleted > 0 {
                tx.execute("DELETE FROM media_thumbnails WHERE media_id = ?1", params![id])?;
                tx.commit()?;
                return Ok(MediaDeletion::Deleted);
            }
            drop(tx);
            let exists = c.query_row("SELECT 1 FROM media WHERE media_id = ?1", params![id], |_| Ok(())).optional()?;
            Ok(if exists.is_some() { MediaDeletion::NotOwner } else { MediaDeletion::Unknown })
        })
        .await
    }

    async fn media(&self, id: MediaId) -> Result<Option<MediaRecord>> {
        with(&self.media, move |c| {
            c.query_row(
                "SELECT media_id, owner, mime, name, size, sha256, created_at_ms FROM media WHERE media_id = ?1",
                params![id.0.as_bytes().to_vec()],
                media_row,
            )
            .optional()?
            .map(media_record)
            .transpose()
        })
        .await
    }

    async fn media_thumbnail(&self, id: MediaId) -> Result<Option<(MediaRecord, Option<Thumbnail>)>> {
        with(&self.media, move |c| {
            c.query_row(
                "SELECT m.media_id, m.owner, m.mime, m.name, m.size, m.sha256, m.created_at_ms, t.mime, t.bytes
                 FROM media m LEFT JOIN media_thumbnails t ON t.media_id = m.media_id WHERE m.media_id = ?1",
                params![id.0.as_bytes().to_vec()],
                |r| Ok((media_row(r)?, r.get::<_, Option<String>>(7)?, r.get::<_, Option<Vec<u8>>>(8)?)),
            )
            .optional()?
            .map(|(row, mime, bytes)| {
                let thumbnail = mime.zip(bytes).map(|(mime, bytes)| Thumbnail { mime, bytes });
                Ok((media_record(row)?, thumbnail))
            })
            .transpose()
        })
        .await
    }

    async fn media_bytes(&self, id: MediaId) -> Result<Option<(MediaRecord, Vec<u8>)>> {
        with(&self.media, move |c| {
            c.query_row(
                "SELECT media_id, owner, mime, name, size, sha256, created_at_ms, bytes FROM media WHERE media_id = ?1",
                params![id.0.as_bytes().to_vec()],
                |r| Ok((media_row(r)?, r.get::<_, Vec<u8>>(7)?)),
            )
            .optional()?
            .map(|(row, bytes)| Ok((media_record(row)?, bytes)))
            .transpose()
        })
        .await
    }

    async fn setting_or_init(&self, key: &str, init: &str) -> Result<String> {
        let (key, init) = (key.to_string(), init.to_string());
        with(&self.conn, move |c| {
            c.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, init],
            )?;
            Ok(c.query_row("SELECT value FROM settings WHERE key = ?1", params![key], |r| r.get(0))?)
        })
        .await
    }

    async fn put_push_subscription(&self, record: &PushSubscriptionRecord, keep: usize) -> Result<()> {
        let r = record.clone();
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        with(&self.conn, move |c| {
            let tx = c.transaction()?;
            let user = r.user.0.as_bytes().to_vec();
            tx.execute(
                "INSERT INTO push_subscriptions (endpoint, user_id, token_hash, p256dh, auth, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (endpoint) DO UPDATE SET user_id = excluded.user_id, token_hash = excluded.token_hash,
                     p256dh = excluded.p256dh, auth = excluded.auth, created_at_ms = excluded.created_at_ms",
                params![r.endpoint, user, r.token_hash, r.p256dh, r.auth, r.created_at_ms],
            )?;
            tx.execute(
                "DELETE FROM push_subscriptions WHERE endpoint IN (
                     SELECT endpoint FROM push_subscriptions WHERE user_id = ?1
                     ORDER BY created_at_ms DESC, endpoint LIMIT -1 OFFSET ?2)",
                params![user, keep],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn push_subscriptions(&self, user: UserId, now_ms: i64) -> Result<Vec<PushSubscriptionRecord>> {
        with(&self.conn, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT s.endpoint, s.user_id, s.token_hash, s.p256dh, s.auth, s.created_at_ms
                 FROM push_subscriptions s JOIN tokens t ON t.token_hash = s.token_hash
                 WHERE s.user_id = ?1 AND t.expires_at_ms > ?2
                 ORDER BY s.created_at_ms DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![user.0.as_bytes().to_vec(), now_ms, MAX_ROWS], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })?;
            rows.map(|row| {
                let (endpoint, user, token_hash, p256dh, auth, created_at_ms) = row?;
                Ok(PushSubscriptionRecord {
                    endpoint,
                    user: UserId(uuid_of(user)?),
                    token_hash,
                    p256dh,
                    auth,
                    created_at_ms,
                })
            })
            .collect()
        })
        .await
    }

    async fn set_muted(&self, user: UserId, conversation: ConversationId, until_ms: Option<i64>) -> Result<bool> {
        with(&self.conn, move |c| {
            let n = c.execute(
                "UPDATE user_conversations SET muted_until_ms = ?3 WHERE user_id = ?1 AND conversation_id = ?2",
                params![user.0.as_bytes().to_vec(), conversation.0.as_bytes().to_vec(), until_ms],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn muted(&self, user: UserId, now_ms: i64) -> Result<Vec<(ConversationId, i64)>> {
        with(&self.conn, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT conversation_id, muted_until_ms FROM user_conversations
                 WHERE user_id = ?1 AND muted_until_ms > ?2",
            )?;
            let rows = stmt.query_map(params![user.0.as_bytes().to_vec(), now_ms], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
            })?;
            rows.map(|row| {
                let (id, until) = row?;
                Ok((ConversationId(uuid_of(id)?), until))
            })
            .collect()
        })
        .await
    }

    async fn delete_push_subscription(&self, endpoint: &str, user: Option<UserId>) -> Result<bool> {
        let endpoint = endpoint.to_string();
        with(&self.conn, move |c| {
            let n = match user {
                Some(u) => c.execute(
                    "DELETE FROM push_subscriptions WHERE endpoint = ?1 AND user_id = ?2",
                    params![endpoint, u.0.as_bytes().to_vec()],
                )?,
                None => c.execute("DELETE FROM push_subscriptions WHERE endpoint = ?1", params![endpoint])?,
            };
            Ok(n > 0)
        })
        .await
    }

    async fn record_last_seen(&self, seen: &[(UserId, i64)]) -> Result<()> {
        let seen = seen.to_vec();
        with(&self.conn, move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE users SET last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?2) WHERE id = ?1",
                )?;
                for (user, at) in seen {
                    stmt.execute(params![user.0.as_bytes().to_vec(), at])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn presence_view(&self, watcher: UserId, ids: &[UserId]) -> Result<Vec<PresenceRecord>> {
        let ids = ids.to_vec();
        with(&self.conn, move |c| {
            // One transaction, so a user's version, settings and contact flag agree.
            let tx = c.transaction()?;
            let mut out: Vec<PresenceRecord> = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT u.last_seen_ms, u.last_seen_audience, u.online_audience, u.rules_version,
                            EXISTS (SELECT 1 FROM contacts c WHERE c.owner = u.id AND c.contact = ?2), u.groups_audience,
                            u.read_receipts
                     FROM users u WHERE u.id = ?1",
                )?;
                for id in ids {
                    if out.iter().any(|r| r.user == id) {
                        continue;
                    }
                    let row = stmt
                        .query_row(params![id.0.as_bytes().to_vec(), watcher.0.as_bytes().to_vec()], |r| {
                            Ok((
                                r.get::<_, Option<i64>>(0)?,
                                (r.get(1)?, r.get(2)?, r.get(5)?, r.get(6)?),
                                r.get::<_, i64>(3)?,
                                r.get(4)?,
                            ))
                        })
                        .optional()?;
                    if let Some((last_seen_ms, (last_seen, online, groups, receipts), version, watcher_is_contact)) = row {
                        out.push(PresenceRecord {
                            user: id,
                            last_seen_ms,
                            settings: privacy_from_codes(last_seen, online, groups, receipts)?,
                            version: version_of(version)?,
                            watcher_is_contact,
                        });
                    }
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn privacy(&self, user: UserId) -> Result<Option<(PrivacySettings, u64)>> {
        with(&self.conn, move |c| {
            let row = c
                .query_row(
                    "SELECT last_seen_audience, online_audience, rules_version, groups_audience, read_receipts
                     FROM users WHERE id = ?1",
                    params![user.0.as_bytes().to_vec()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            match row {
                Some((last_seen, online, version, groups, receipts)) => {
                    Ok(Some((privacy_from_codes(last_seen, online, groups, receipts)?, version_of(version)?)))
                }
                None => Ok(None),
            }
        })
        .await
    }

    async fn set_privacy(&self, user: UserId, settings: PrivacySettings) -> Result<Option<u64>> {
        let (last_seen, online, groups, read_receipts) = privacy_codes(settings);
        with(&self.conn, move |c| {
            let version = c
                .query_row(
                    "UPDATE users SET last_seen_audience = ?2, online_audience = ?3, groups_audience = ?4,
                         read_receipts = ?5, rules_version = rules_version + 1
                     WHERE id = ?1 RETURNING rules_version",
                    params![user.0.as_bytes().to_vec(), last_seen, online, groups, read_receipts],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?;
            version.map(version_of).transpose()
        })
        .await
    }

    async fn contacts(&self, owner: UserId) -> Result<Vec<UserView>> {
        with(&self.conn, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT u.id, u.username FROM contacts c JOIN users u ON u.id = c.contact
                 WHERE c.owner = ?1 ORDER BY u.username",
            )?;
            let rows =
                stmt.query_map(params![owner.0.as_bytes().to_vec()], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?)))?;
            rows.map(|row| {
                let (id, username) = row?;
                Ok(UserView { id: UserId(uuid_of(id)?), username })
            })
            .collect()
        })
        .await
    }

    async fn set_contact(&self, owner: UserId, contact: UserId, is_contact: bool, max: usize) -> Result<ContactChange> {
        with(&self.conn, move |c| {
            // IMMEDIATE: the count and the insert are one step for every process sharing the file.
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (o, k) = (owner.0.as_bytes().to_vec(), contact.0.as_bytes().to_vec());
            let user_exists = |id: &Vec<u8>| -> Result<bool> {
                Ok(tx.query_row("SELECT 1 FROM users WHERE id = ?1", params![id], |_| Ok(())).optional()?.is_some())
            };
            if !user_exists(&o)? || (is_contact && !user_exists(&k)?) {
                return Ok(ContactChange::UnknownUser);
            }
            let changed = if is_contact {
                let present = tx
                    .query_row("SELECT 1 FROM contacts WHERE owner = ?1 AND contact = ?2", params![o, k], |_| Ok(()))
                    .optional()?
                    .is_some();
                if present {
                    return Ok(ContactChange::Unchanged);
                }
                let n: i64 =
                    tx.query_row("SELECT count(*) FROM contacts WHERE owner = ?1", params![o], |r| r.get(0))?;
                if usize::try_from(n).unwrap_or(usize::MAX) >= max {
                    return Ok(ContactChange::TooMany);
                }
                tx.execute(
                    "INSERT INTO contacts (owner, contact, added_at_ms) VALUES (?1, ?2, ?3)",
                    params![o, k, crate::now_ms()],
                )? > 0
            } else {
                tx.execute("DELETE FROM contacts WHERE owner = ?1 AND contact = ?2", params![o, k])? > 0
            };
            if !changed {
                return Ok(ContactChange::Unchanged);
            }
            let version: i64 = tx.query_row(
                "UPDATE users SET rules_version = rules_version + 1 WHERE id = ?1 RETURNING rules_version",
                params![o],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(ContactChange::Changed { version: version_of(version)? })
        })
        .await
    }

    async fn list_users(&self, limit: u32) -> Result<Vec<UserView>> {
        let limit = limit.min(MAX_ROWS);
        with(&self.conn, move |c| {
            let mut stmt = c.prepare_cached("SELECT id, username FROM users ORDER BY username LIMIT ?1")?;
            let rows = stmt.query_map(params![limit], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?)))?;
            rows.map(|row| {
                let (id, username) = row?;
                Ok(UserView { id: UserId(uuid_of(id)?), username })
            })
            .collect()
        })
        .await
    }

    async fn insert_token(&self, token_hash: &str, user: UserId, expires_at_ms: i64) -> Result<()> {
        let token_hash = token_hash.to_string();
        with(&self.conn, move |c| {
            c.execute(
                "INSERT INTO tokens (token_hash, user_id, expires_at_ms) VALUES (?1, ?2, ?3)",
                params![token_hash, user.0.as_bytes().to_vec(), expires_at_ms],
            )?;
            Ok(())
        })
        .await
    }

    async fn token_user(&self, token_hash: &str, now_ms: i64) -> Result<Option<TokenGrant>> {
        let token_hash = token_hash.to_string();
        with(&self.conn, move |c| {
            let row = c
                .query_row(
                    "SELECT u.id, u.username, t.expires_at_ms FROM tokens t JOIN users u ON u.id = t.user_id
                     WHERE t.token_hash = ?1 AND t.expires_at_ms > ?2",
                    params![token_hash, now_ms],
                    |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            row.map(|(id, username, expires_at_ms)| {
                Ok(TokenGrant { user: UserView { id: UserId(uuid_of(id)?), username }, expires_at_ms })
            })
            .transpose()
        })
        .await
    }

    async fn delete_token(&self, token_hash: &str) -> Result<()> {
        let token_hash = token_hash.to_string();
        with(&self.conn, move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM push_subscriptions WHERE token_hash = ?1", params![token_hash])?;
            tx.execute("DELETE FROM tokens WHERE token_hash = ?1", params![token_hash])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn add_conversation(
        &self,
        conversation: ConversationId,
        kind: ConversationKind,
        members: &[UserId],
        now_ms: i64,
    ) -> Result<()> {
        let mut members = members.to_vec();
        members.sort();
        members.dedup();
        with(&self.conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT OR IGNORE INTO conversations (id, kind, members, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![conversation.0.as_bytes().to_vec(), kind_code(kind), joined_members(&members), now_ms],
            )?;
            index_members(&tx, conversation, &members)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn user_conversations(&self, user: UserId) -> Result<Vec<ConversationRecord>> {
        with(&self.conn, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.id, c.kind, c.members, c.name, c.owner, c.version FROM user_conversations uc
                 JOIN conversations c ON c.id = uc.conversation_id WHERE uc.user_id = ?1
                 ORDER BY c.created_at_ms, c.id",
            )?;
            let rows = stmt.query_map(params![user.0.as_bytes().to_vec()], conversation_row)?;
            rows.map(|row| conversation_record(row?)).collect()
        })
        .await
    }

    async fn conversation(&self, conversation: ConversationId) -> Result<Option<ConversationRecord>> {
        with(&self.conn, move |c| {
            let row = c
                .query_row(
                    "SELECT id, kind, members, name, owner, version FROM conversations WHERE id = ?1",
                    params![conversation.0.as_bytes().to_vec()],
                    conversation_row,
                )
                .optional()?;
            row.map(conversation_record).transpose()
        })
        .await
    }

    async fn create_group(&self, group: &ConversationRecord, now_ms: i64) -> Result<()> {
        let group = group.clone();
        with(&self.conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut members = group.members.clone();
            members.sort();
            members.dedup();
            tx.execute(
                "INSERT INTO conversations (id, kind, members, created_at_ms, name, owner, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
                params![
                    group.id.0.as_bytes().to_vec(),
                    kind_code(ConversationKind::Group),
                    joined_members(&members),
                    now_ms,
                    group.name,
                    group.owner.map(|o| o.0.as_bytes().to_vec()),
                ],
            )?;
            index_members(&tx, group.id, &members)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn update_group(&self, expected_version: u64, next: &ConversationRecord, removed: &[UserId]) -> Result<bool> {
        let (next, removed) = (next.clone(), removed.to_vec());
        with(&self.conn, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut members = next.members.clone();
            members.sort();
            members.dedup();
            let changed = tx.execute(
                "UPDATE conversations SET members = ?3, name = ?4, owner = ?5, version = version + 1
                 WHERE id = ?1 AND version = ?2 AND kind = 1",
                params![
                    next.id.0.as_bytes().to_vec(),
                    i64::try_from(expected_version).unwrap_or(i64::MAX),
                    joined_members(&members),
                    next.name,
                    next.owner.map(|o| o.0.as_bytes().to_vec()),
                ],
            )?;
            if changed == 0 {
                return Ok(false);
            }
            index_members(&tx, next.id, &members)?;
            for m in removed.iter().filter(|m| !members.contains(m)) {
                tx.execute(
                    "DELETE FROM user_conversations WHERE user_id = ?1 AND conversation_id = ?2",
                    params![m.0.as_bytes().to_vec(), next.id.0.as_bytes().to_vec()],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }
}

fn joined_members(members: &[UserId]) -> String {
    members.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(",")
}

/// Index `conversation` under each of `members` (present ones stay).
fn index_members(tx: &rusqlite::Transaction<'_>, conversation: ConversationId, members: &[UserId]) -> Result<()> {
    for m in members {
        tx.execute(
            "INSERT OR IGNORE INTO user_conversations (user_id, conversation_id) VALUES (?1, ?2)",
            params![m.0.as_bytes().to_vec(), conversation.0.as_bytes().to_vec()],
        )?;
    }
    Ok(())
}

/// A `conversations` row as read: (id, kind, members, name, owner, version).
type ConversationRow = (Vec<u8>, i64, String, Option<String>, Option<Vec<u8>>, i64);

fn conversation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConversationRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
}

fn conversation_record((id, kind, members, name, owner, version): ConversationRow) -> Result<ConversationRecord> {
    let members = members
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<UserId>().map_err(|e| StorageError::Corrupt(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    Ok(ConversationRecord {
        id: ConversationId(uuid_of(id)?),
        kind: kind_of(kind)?,
        members,
        name,
        owner: owner.map(uuid_of).transpose()?.map(UserId),
        version: u64::try_from(version).map_err(|_| StorageError::Corrupt(format!("negative version {version}")))?,
    })
}

/// One shard's file.
pub struct SqliteShard {
    shard: ShardId,
    writer: Conn,
    reader: Conn,
    lock_path: PathBuf,
    /// The flock'd lock file while this instance holds the session lock.
    lock_file: Arc<Mutex<Option<File>>>,
}

impl SqliteShard {
    /// Try the kernel session lock; true if this instance holds it now.
    fn try_session_lock(&self) -> Result<bool> {
        let mut held = self.lock_file.lock().map_err(|_| StorageError::Join("lock mutex poisoned".into()))?;
        if held.is_some() {
            return Ok(true);
        }
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&self.lock_path)?;
        match file.try_lock() {
            Ok(()) => {
                *held = Some(file);
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
        }
    }

    fn drop_session_lock(&self) {
        if let Ok(mut held) = self.lock_file.lock() {
            // Dropping the file closes it, which releases the flock.
            held.take();
        }
    }
}

/// A `messages` row as read: (conversation, seq, message id, sender, client id, body, sent at,
/// media JSON).
type MessageRow = (Vec<u8>, u64, Vec<u8>, Vec<u8>, String, String, i64, Option<String>);

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?))
}

/// An upload's row without its bytes: (id, owner, mime, name, size, sha256, created at).
type MediaRow = (Vec<u8>, Vec<u8>, String, Option<String>, i64, String, i64);

fn media_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MediaRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn media_record(row: MediaRow) -> Result<MediaRecord> {
    let (id, owner, mime, name, size, sha256, created_at_ms) = row;
    Ok(MediaRecord {
        media: MediaRef {
            media_id: MediaId(uuid_of(id)?),
            mime,
            size: u64::try_from(size).map_err(|_| StorageError::Corrupt(format!("media size {size}")))?,
            name,
            sha256,
        },
        owner: UserId(uuid_of(owner)?),
        created_at_ms,
    })
}

fn to_view(row: MessageRow) -> Result<MessageView> {
    let (conv, seq, id, sender, client_msg_id, body, sent_at_ms, media) = row;
    Ok(MessageView {
        message_id: MessageId(uuid_of(id)?),
        conversation_id: ConversationId(uuid_of(conv)?),
        seq,
        sender: UserId(uuid_of(sender)?),
        client_msg_id: ClientMsgId::new(client_msg_id).map_err(|e| StorageError::Corrupt(e.to_string()))?,
        body,
        sent_at_ms,
        media: crate::media_from_json(media)?,
    })
}

const MESSAGE_COLUMNS: &str = "conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms, media";

fn current_epoch(tx: &rusqlite::Transaction<'_>, shard: ShardId) -> Result<(Option<String>, u64, i64)> {
    Ok(tx.query_row("SELECT owner, epoch, expires_at_ms FROM lease WHERE shard = ?1", params![shard.0], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
    })?)
}

#[async_trait]
impl ShardStore for SqliteShard {
    fn shard(&self) -> ShardId {
        self.shard
    }

    async fn acquire_lease(&self, owner: &str, ttl_ms: u64) -> Result<Option<LeaseGrant>> {
        let got_lock = self.try_session_lock()?;
        let owner = owner.to_string();
        let shard = self.shard;
        let granted = with(&self.writer, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (current_owner, epoch, expires) = current_epoch(&tx, shard)?;
            let now = now_ms();
            let free = current_owner.is_none() || expires < now || current_owner.as_deref() == Some(&owner);
            if !(free || got_lock) {
                return Ok(None);
            }
            let epoch = epoch + 1;
            let expires_at_ms = now + ttl_ms as i64;
            tx.execute(
                "UPDATE lease SET owner = ?1, epoch = ?2, expires_at_ms = ?3 WHERE shard = ?4",
                params![owner, epoch as i64, expires_at_ms, shard.0],
            )?;
            tx.commit()?;
            Ok(Some(LeaseGrant { epoch: Epoch(epoch), expires_at_ms }))
        })
        .await?;
        if granted.is_none() && got_lock {
            // Taken just now for nothing: give it back.
            self.drop_session_lock();
        }
        Ok(granted)
    }

    async fn renew_lease(&self, owner: &str, epoch: Epoch, ttl_ms: u64) -> Result<LeaseGrant> {
        let owner = owner.to_string();
        let shard = self.shard;
        with(&self.writer, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let expires_at_ms = now_ms() + ttl_ms as i64;
            let n = tx.execute(
                "UPDATE lease SET expires_at_ms = ?1 WHERE shard = ?2 AND epoch = ?3 AND owner = ?4",
                params![expires_at_ms, shard.0, epoch.0 as i64, owner],
            )?;
            if n == 0 {
                let (_, current, _) = current_epoch(&tx, shard)?;
                return Err(StorageError::StaleEpoch { shard: shard.0, held: epoch.0, current });
            }
            tx.commit()?;
            Ok(LeaseGrant { epoch, expires_at_ms })
        })
        .await
    }

    async fn release_lease(&self, owner: &str, epoch: Epoch) -> Result<()> {
        let owner = owner.to_string();
        let shard = self.shard;
        with(&self.writer, move |c| {
            c.execute(
                "UPDATE lease SET owner = NULL, expires_at_ms = 0 WHERE shard = ?1 AND epoch = ?2 AND owner = ?3",
                params![shard.0, epoch.0 as i64, owner],
            )?;
            Ok(())
        })
        .await?;
        self.drop_session_lock();
        Ok(())
    }

    async fn lease_info(&self) -> Result<LeaseInfo> {
        let shard = self.shard;
        with(&self.reader, move |c| {
            let (owner, epoch, expires_at_ms) =
                c.query_row("SELECT owner, epoch, expires_at_ms FROM lease WHERE shard = ?1", params![shard.0], |r| {
                    Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
                })?;
            Ok(LeaseInfo { shard, owner, epoch: Epoch(epoch), expires_at_ms, now_ms: now_ms() })
        })
        .await
    }

    async fn commit(&self, epoch: Epoch, batch: &WriteBatch) -> Result<Committed> {
        let batch = batch.clone();
        let shard = self.shard;
        with(&self.writer, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (_, current, _) = current_epoch(&tx, shard)?;
            if current != epoch.0 {
                return Err(StorageError::StaleEpoch { shard: shard.0, held: epoch.0, current });
            }
            let mut results = Vec::with_capacity(batch.messages.len());
            let mut applied = Vec::with_capacity(batch.cursors.len());
            {
                let mut find = tx.prepare_cached(
                    "SELECT seq, message_id, sent_at_ms, body, media FROM messages
                     WHERE conversation_id = ?1 AND sender = ?2 AND client_msg_id = ?3",
                )?;
                let mut counter = tx.prepare_cached("SELECT last_seq FROM conversations WHERE conversation_id = ?1")?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO messages (conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms, epoch, media)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                let mut next: HashMap<ConversationId, u64> = HashMap::new();
                // Per idempotency key of the batch: the index of its first occurrence.
                let mut in_batch: HashMap<(ConversationId, UserId, ClientMsgId), usize> = HashMap::new();
                for (i, m) in batch.messages.iter().enumerate() {
                    let key = (m.conversation_id, m.sender, m.client_msg_id.clone());
                    if let Some(&first) = in_batch.get(&key) {
                        // A repeat: of a message stored before (its original as read back), or of
                        // one this batch stores (that occurrence's own body).
                        let repeat = match &results[first] {
                            MessageResult::Duplicate { ack, original } => {
                                MessageResult::Duplicate { ack: ack.clone(), original: original.clone() }
                            }
                            MessageResult::Stored(ack) => {
                                let m = &batch.messages[first];
                                let original = Original { body: m.body.clone(), media: m.media.clone() };
                                MessageResult::Duplicate { ack: StoredAck { duplicate: true, ..ack.clone() }, original }
                            }
                        };
                        results.push(repeat);
                        continue;
                    }
                    let existing = find
                        .query_row(
                            params![m.conversation_id.0.as_bytes().to_vec(), m.sender.0.as_bytes().to_vec(), m.client_msg_id.as_str()],
                            |r| {
                                Ok((
                                    r.get::<_, i64>(0)?,
                                    r.get::<_, Vec<u8>>(1)?,
                                    r.get::<_, i64>(2)?,
                                    r.get::<_, String>(3)?,
                                    r.get::<_, Option<String>>(4)?,
                                ))
                            },
                        )
                        .optional()?;
                    let result = match existing {
                        Some((seq, id, sent_at_ms, body, media)) => MessageResult::Duplicate {
                            ack: StoredAck {
                                message_id: MessageId(uuid_of(id)?),
                                conversation_id: m.conversation_id,
                                seq: seq as u64,
                                sent_at_ms,
                                duplicate: true,
                            },
                            original: Original { body, media: crate::media_from_json(media)? },
                        },
                        None => {
                            let seq = match next.get(&m.conversation_id) {
                                Some(s) => *s,
                                None => {
                                    let last: Option<i64> = counter
                                        .query_row(params![m.conversation_id.0.as_bytes().to_vec()], |r| r.get(0))
                                        .optional()?;
                                    last.unwrap_or(0) as u64 + 1
                                }
                            };
                            next.insert(m.conversation_id, seq + 1);
                            insert.execute(params![
                                m.conversation_id.0.as_bytes().to_vec(),
                                seq as i64,
                                m.message_id.0.as_bytes().to_vec(),
                                m.sender.0.as_bytes().to_vec(),
                                m.client_msg_id.as_str(),
                                m.body,
                                m.sent_at_ms,
                                epoch.0 as i64,
                                crate::media_to_json(&m.media),
                            ])?;
                            MessageResult::Stored(StoredAck {
                                message_id: m.message_id,
                                conversation_id: m.conversation_id,
                                seq,
                                sent_at_ms: m.sent_at_ms,
                                duplicate: false,
                            })
                        }
                    };
                    results.push(result);
                    in_batch.insert(key, i);
                }
                let mut bump = tx.prepare_cached(
                    "INSERT INTO conversations (conversation_id, last_seq) VALUES (?1, ?2)
                     ON CONFLICT (conversation_id) DO UPDATE SET last_seq = excluded.last_seq",
                )?;
                for (conv, next_seq) in next {
                    bump.execute(params![conv.0.as_bytes().to_vec(), (next_seq - 1) as i64])?;
                }
                let mut cursor = tx.prepare_cached(
                    "INSERT INTO cursors (conversation_id, user_id, device_id, delivered_seq, read_seq)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (conversation_id, user_id, device_id) DO UPDATE SET
                       delivered_seq = MAX(delivered_seq, excluded.delivered_seq),
                       read_seq = MAX(read_seq, excluded.read_seq)",
                )?;
                let mut last_seq =
                    tx.prepare_cached("SELECT last_seq FROM conversations WHERE conversation_id = ?1")?;
                for u in &batch.cursors {
                    // A cursor never passes the conversation's last message: acknowledging the
                    // future would make sync skip messages that do not exist yet.
                    let last: i64 = last_seq
                        .query_row(params![u.conversation_id.0.as_bytes().to_vec()], |r| r.get(0))
                        .optional()?
                        .unwrap_or(0);
                    let seq = (u.seq.min(i64::MAX as u64) as i64).min(last);
                    applied.push(seq.max(0) as u64);
                    let (delivered, read) = match u.kind {
                        ReceiptKind::Delivered => (seq, 0),
                        // Reading implies having received.
                        ReceiptKind::Read => (seq, seq),
                    };
                    let conv = u.conversation_id.0.as_bytes().to_vec();
                    let user = u.user.0.as_bytes().to_vec();
                    cursor.execute(params![conv, user, "", delivered, read])?;
                    if let Some(device) = &u.device {
                        cursor.execute(params![conv, user, device.as_str(), delivered, read])?;
                    }
                }
            }
            tx.commit()?;
            Ok(Committed { messages: results, cursors: applied })
        })
        .await
    }

    async fn history(
        &self,
        conversation: ConversationId,
        before_seq: Option<Seq>,
        limit: u32,
    ) -> Result<(Vec<MessageView>, bool)> {
        let limit = limit.clamp(1, MAX_ROWS);
        let before = before_seq.map(|s| s.min(i64::MAX as u64) as i64).unwrap_or(i64::MAX);
        with(&self.reader, move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND seq < ?2
                 ORDER BY seq DESC LIMIT ?3"
            ))?;
            let rows =
                stmt.query_map(params![conversation.0.as_bytes().to_vec(), before, limit + 1], message_from_row)?;
            let mut out = rows.map(|r| to_view(r?)).collect::<Result<Vec<_>>>()?;
            let has_more = out.len() > limit as usize;
            out.truncate(limit as usize);
            out.reverse();
            Ok((out, has_more))
        })
        .await
    }

    async fn sync(&self, request: &SyncRequest) -> Result<SyncReply> {
        let request = request.clone();
        let limit = request.per_conversation_limit.clamp(1, MAX_ROWS);
        with(&self.reader, move |c| {
            let mut reply = SyncReply::default();
            let mut cursor = c.prepare_cached(
                "SELECT delivered_seq FROM cursors WHERE conversation_id = ?1 AND user_id = ?2 AND device_id = ?3",
            )?;
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND seq > ?2
                 ORDER BY seq ASC LIMIT ?3"
            ))?;
            for conv in &request.conversations {
                let key = conv.0.as_bytes().to_vec();
                let after: i64 = cursor
                    .query_row(params![key, request.user.0.as_bytes().to_vec(), request.device.as_str()], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                let rows = stmt.query_map(params![key, after, limit + 1], message_from_row)?;
                let mut msgs = rows.map(|r| to_view(r?)).collect::<Result<Vec<_>>>()?;
                if msgs.len() > limit as usize {
                    msgs.truncate(limit as usize);
                    reply.truncated.push(*conv);
                }
                reply.messages.extend(msgs);
            }
            Ok(reply)
        })
        .await
    }

    async fn summaries(&self, user: UserId, conversations: &[ConversationId]) -> Result<Vec<ShardSummary>> {
        let conversations = conversations.to_vec();
        with(&self.reader, move |c| {
            let mut out = Vec::new();
            let mut last = c.prepare_cached("SELECT last_seq FROM conversations WHERE conversation_id = ?1")?;
            let mut read = c.prepare_cached(
                "SELECT read_seq FROM cursors WHERE conversation_id = ?1 AND user_id = ?2 AND device_id = ''",
            )?;
            let mut unread = c.prepare_cached(
                "SELECT COUNT(*) FROM messages WHERE conversation_id = ?1 AND seq > ?2 AND sender != ?3",
            )?;
            let mut msg = c.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND seq = ?2"
            ))?;
            // At most two rows are read: a group's cursors are not scanned to find out that there
            // is more than one other member.
            let mut peer = c.prepare_cached(
                "SELECT delivered_seq, read_seq FROM cursors
                 WHERE conversation_id = ?1 AND device_id = '' AND user_id != ?2 LIMIT 2",
            )?;
            let user_key = user.0.as_bytes().to_vec();
            for conv in conversations {
                let key = conv.0.as_bytes().to_vec();
                let Some(last_seq) = last.query_row(params![key], |r| r.get::<_, i64>(0)).optional()? else {
                    continue;
                };
                let read_seq: i64 = read.query_row(params![key, user_key], |r| r.get(0)).optional()?.unwrap_or(0);
                let unread_n: i64 = unread.query_row(params![key, read_seq, user_key], |r| r.get(0))?;
                let last_message =
                    msg.query_row(params![key, last_seq], message_from_row).optional()?.map(to_view).transpose()?;
                let peers = peer
                    .query_map(params![key, user_key], |r| {
                        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                out.push(ShardSummary {
                    conversation_id: conv,
                    last_seq: last_seq as u64,
                    read_seq: read_seq as u64,
                    unread: unread_n as u64,
                    last_message,
                    peer_cursor: match peers[..] {
                        [one] => Some(one),
                        _ => None,
                    },
                });
            }
            Ok(out)
        })
        .await
    }

    async fn group_floors(&self, groups: &[(ConversationId, Vec<UserId>)]) -> Result<Vec<GroupFloor>> {
        let groups = groups.to_vec();
        with(&self.reader, move |c| {
            let mut cursor = c.prepare_cached(
                "SELECT delivered_seq, read_seq FROM cursors
                 WHERE conversation_id = ?1 AND user_id = ?2 AND device_id = ''",
            )?;
            let mut out = Vec::new();
            for (conversation, users) in groups.iter().filter(|(_, users)| !users.is_empty()) {
                let key = conversation.0.as_bytes().to_vec();
                let (mut delivered, mut read) = (u64::MAX, u64::MAX);
                for user in users {
                    let (d, r) = cursor
                        .query_row(params![key, user.0.as_bytes().to_vec()], |r| {
                            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                        })
                        .optional()?
                        .unwrap_or((0, 0));
                    delivered = delivered.min(d);
                    read = read.min(r);
                }
                out.push(GroupFloor { conversation_id: *conversation, delivered_seq: delivered, read_seq: read });
            }
            Ok(out)
        })
        .await
    }

    async fn member_cursor(&self, conversation: ConversationId, user: UserId) -> Result<(Seq, Seq)> {
        with(&self.reader, move |c| {
            let row = c
                .query_row(
                    "SELECT delivered_seq, read_seq FROM cursors
                     WHERE conversation_id = ?1 AND user_id = ?2 AND device_id = ''",
                    params![conversation.0.as_bytes().to_vec(), user.0.as_bytes().to_vec()],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                )
                .optional()?;
            Ok(row.unwrap_or((0, 0)))
        })
        .await
    }

    async fn epochs(&self, conversation: ConversationId) -> Result<Vec<(Seq, Epoch)>> {
        with(&self.reader, move |c| {
            let mut stmt =
                c.prepare_cached("SELECT seq, epoch FROM messages WHERE conversation_id = ?1 ORDER BY seq")?;
            let rows = stmt.query_map(params![conversation.0.as_bytes().to_vec()], |r| {
                Ok((r.get::<_, i64>(0)? as u64, Epoch(r.get::<_, i64>(1)? as u64)))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}
