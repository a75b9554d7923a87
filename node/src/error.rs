//! The node's error type and **the one place** where internal errors become client-visible codes.
//! Internals (SQL errors, actor failures) are logged here and shown to clients only as
//! `internal`/`unavailable`.

use parley_protocol::{ErrorCode, ProtocolError, ShardId};
use parley_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A refusal whose code and text are meant for the client as they are.
    #[error("{code}: {message}")]
    Client { code: ErrorCode, message: String },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// No live owner for the shard is reachable from here right now.
    #[error("shard {0} is not served right now")]
    ShardUnavailable(ShardId),
    /// A call that did not answer in time: its outcome is unknown.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("actor error: {0}")]
    Actor(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl NodeError {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Self {
        NodeError::Client { code, message: message.into() }
    }

    /// The client-visible code.
    pub fn code(&self) -> ErrorCode {
        match self {
            NodeError::Client { code, .. } => *code,
            NodeError::Protocol(e) => e.code(),
            NodeError::Storage(StorageError::UsernameTaken) => ErrorCode::UsernameTaken,
            NodeError::Storage(StorageError::MediaQuotaExceeded { .. }) => ErrorCode::MediaQuotaExceeded,
            NodeError::Storage(StorageError::StaleEpoch { .. }) => ErrorCode::Unavailable,
            NodeError::Storage(StorageError::Pool(_) | StorageError::Postgres(_)) => ErrorCode::Unavailable,
            NodeError::Storage(_) => ErrorCode::Internal,
            NodeError::ShardUnavailable(_) | NodeError::Timeout(_) => ErrorCode::Unavailable,
            NodeError::Actor(_) | NodeError::Io(_) => ErrorCode::Internal,
        }
    }

    /// The text a client sees. Internal details stay in the log.
    pub fn client_message(&self) -> String {
        match self {
            NodeError::Client { message, .. } => message.clone(),
            NodeError::Protocol(e) => e.to_string(),
            NodeError::Storage(StorageError::UsernameTaken) => "username is taken".into(),
            NodeError::Storage(StorageError::MediaQuotaExceeded { used, quota }) => quota_message(*used, None, *quota),
            NodeError::ShardUnavailable(_)
            | NodeError::Timeout(_)
            | NodeError::Storage(StorageError::StaleEpoch { .. }) => {
                "temporarily unavailable; retry (sends: with the same client_msg_id)".into()
            }
            other => {
                tracing::error!(error = %other, "internal error");
                if other.code() == ErrorCode::Unavailable {
                    "temporarily unavailable; retry".into()
                } else {
                    "internal error".into()
                }
            }
        }
    }
}

pub type NodeResult<T> = Result<T, NodeError>;

/// What a user over their upload quota is told (`size`: the refused upload's, when known).
pub fn quota_message(used: u64, size: Option<u64>, quota: u64) -> String {
    let upload = size.map_or_else(|| "this upload does not fit".to_string(), |s| format!("{s} more do not fit"));
    format!("your uploads use {used} of your {quota} bytes; {upload} (delete uploads to make room)")
}
