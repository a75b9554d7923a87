//! The storage crate's one error type. `node` maps it to client-visible codes in one place.

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The write's lease epoch is not the shard's current one: another node took the shard over.
    /// Nothing was written.
    #[error("stale lease epoch for shard {shard}: held {held}, current {current}")]
    StaleEpoch { shard: u16, held: u64, current: u64 },
    #[error("username is taken")]
    UsernameTaken,
    /// Storing the upload would take its owner's uploads past `quota` bytes (they use `used`).
    /// Nothing was stored.
    #[error("uploads use {used} of {quota} bytes; this one does not fit")]
    MediaQuotaExceeded { used: u64, quota: u64 },
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A Redis round took longer than its bound; what it did in Redis is unknown.
    #[error("redis: no answer within {0:?}")]
    RedisTimeout(std::time::Duration),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("blocking task failed: {0}")]
    Join(String),
}

impl From<deadpool_postgres::PoolError> for StorageError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StorageError::Pool(e.to_string())
    }
}
