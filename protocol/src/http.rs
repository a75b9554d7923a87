//! JSON bodies of the HTTP API: account endpoints, the native message API, and the seed systems'
//! REST shapes (`/api/...`) kept path- and field-compatible so their clients keep working.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::frames::MessageView;
use crate::ids::{ClientMsgId, ConversationId, MediaId, MessageId, Seq, UserId};

/// `POST /v1/register` and `POST /v1/login`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Answer to register/login: an opaque bearer token and when it expires.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub user_id: UserId,
    pub username: String,
    pub expires_at_ms: i64,
}

/// A user as listed by `GET /v1/users` and `GET /api/users`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    pub id: UserId,
    pub username: String,
}

/// `POST /v1/messages`: the HTTP equivalent of the `send` frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendRequest {
    pub client_msg_id: ClientMsgId,
    #[serde(default)]
    pub to: Option<UserId>,
    #[serde(default)]
    pub conversation_id: Option<ConversationId>,
    pub body: String,
    /// An upload's id (`POST /v1/media`): the message carries that file, `body` is its caption.
    #[serde(default)]
    pub media_id: Option<MediaId>,
}

/// Answer to a send: the same facts as the `ack` frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResponse {
    pub client_msg_id: ClientMsgId,
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub sent_at_ms: i64,
    pub duplicate: bool,
}

/// `GET /v1/conversations/:id/messages` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub conversation_id: ConversationId,
    pub messages: Vec<MessageView>,
    pub has_more: bool,
}

/// `POST /v1/groups`: a new group owned by the caller, with these other members.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateGroupRequest {
    pub name: String,
    #[serde(default)]
    pub members: Vec<UserId>,
}

/// `POST /v1/groups/:id/members`: add these users (the owner only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddMembersRequest {
    pub members: Vec<UserId>,
}

/// `PATCH /v1/groups/:id`: rename the group (the owner only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenameGroupRequest {
    pub name: String,
}

/// Every HTTP error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorCode,
    pub message: String,
}

/// Seed API: `POST /api/messages` body. `from_user_id` must equal the token's user.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedSendRequest {
    pub from_user_id: String,
    pub to_user_id: String,
    pub content: String,
    /// Not in the seed; optional here. Without it each POST is a new message (the seed's
    /// behaviour); with it, retries are idempotent.
    #[serde(default)]
    pub client_msg_id: Option<ClientMsgId>,
}

/// Seed API: a message row as the seed's `messages` table had it, plus our seq and conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedMessage {
    pub id: MessageId,
    pub from_user_id: UserId,
    pub to_user_id: UserId,
    pub content: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub shard_id: u16,
    pub conversation_id: ConversationId,
    pub seq: Seq,
}

/// Seed API: answer to `POST /api/messages`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedSendResponse {
    pub success: bool,
    pub id: MessageId,
    pub shard_id: u16,
    pub message: SeedMessage,
}

/// One shard as `GET /api/shards` and `GET /api/health/shards` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardView {
    pub shard_id: u16,
    /// Node holding the lease, if any.
    pub owner: Option<String>,
    pub epoch: u64,
    /// `healthy` when a live owner serves it, else `unowned`.
    pub status: String,
    /// The `[[shard_group]]` whose store (and Redis) holds the shard; `home` when none claims it.
    #[serde(default)]
    pub group: String,
}

/// Answer of `GET /health` and `/healthz`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthResponse {
    pub status: String,
    pub node: String,
}

/// `GET /v1/media?limit=&before=`: how much of their upload quota the caller uses, and a page of
/// their uploads, newest first — how a client finds what to delete, including uploads that were
/// never sent in a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaUsage {
    /// Uploads the caller has stored (deleted ones no longer count).
    pub uploads: u64,
    /// Their total size, bytes.
    pub used_bytes: u64,
    /// `limits.media_quota_bytes` of the node that answered.
    pub quota_bytes: u64,
    /// Up to `limit` (default `DEFAULT_PAGE`, at most `MAX_PAGE`) uploads, newest first.
    pub items: Vec<MediaItem>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One of the caller's uploads in [`MediaUsage`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaItem {
    #[serde(flatten)]
    pub media: crate::media::MediaRef,
    /// When it was uploaded (ms since the epoch, server clock).
    pub created_at_ms: i64,
}

/// `GET /v1/media`: the page asked for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MediaListQuery {
    #[serde(default)]
    pub limit: Option<u32>,
    /// A `next` from an earlier answer.
    #[serde(default)]
    pub before: Option<String>,
}

/// `POST /v1/media?name=…`: the query. The body is the file's bytes and `Content-Type` its type;
/// the answer (201) is the stored [`crate::media::MediaRef`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MediaUploadQuery {
    #[serde(default)]
    pub name: Option<String>,
}
