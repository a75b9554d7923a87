//! Rows and batches exchanged with the stores.

use parley_protocol::cluster::StoredAck;
use parley_protocol::frames::{ConversationKind, ReceiptKind};
use parley_protocol::media::MediaRef;
use parley_protocol::privacy::PrivacySettings;
use parley_protocol::{ClientMsgId, ConversationId, DeviceId, Epoch, MessageId, Seq, ShardId, UserId};

/// A user as stored, with the argon2 PHC string of the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    pub username: String,
    pub password_hash: String,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationRecord {
    pub id: ConversationId,
    pub kind: ConversationKind,
    /// Sorted.
    pub members: Vec<UserId>,
    /// Groups only.
    pub name: Option<String>,
    /// Groups only: the member allowed to change the group.
    pub owner: Option<UserId>,
    /// 0 for a direct chat and a new group; bumped by every [`crate::Directory::update_group`].
    pub version: u64,
}

impl ConversationRecord {
    /// A direct chat's record (its members are sorted here).
    pub fn direct(id: ConversationId, mut members: Vec<UserId>) -> Self {
        members.sort();
        members.dedup();
        ConversationRecord { id, kind: ConversationKind::Direct, members, name: None, owner: None, version: 0 }
    }
}

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    pub epoch: Epoch,
    /// Database clock, milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
}

/// A live token: whose it is and until when. Sessions authenticated by it end at `expires_at_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    pub user: parley_protocol::http::UserView,
    pub expires_at_ms: i64,
}

/// The lease as the database sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub shard: ShardId,
    pub owner: Option<String>,
    pub epoch: Epoch,
    pub expires_at_ms: i64,
    /// The database's clock when read (so callers can judge expiry without trusting their own).
    pub now_ms: i64,
}

/// A message to store. The id and timestamp are chosen by the shard before the commit so that a
/// batch is deterministic; the seq is assigned inside the transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub client_msg_id: ClientMsgId,
    pub body: String,
    pub sent_at_ms: i64,
    /// The attached file (stored with the message as JSON: its description, not its bytes).
    pub media: Option<MediaRef>,
}

/// An upload as stored in the directory (its bytes are stored next to it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaRecord {
    pub media: MediaRef,
    /// Who uploaded it.
    pub owner: UserId,
    pub created_at_ms: i64,
}

/// A small picture of an uploaded image, made by the node that took the upload; clients show it
/// inline and fetch the full upload when asked to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thumbnail {
    /// `image/jpeg` or `image/png`.
    pub mime: String,
    pub bytes: Vec<u8>,
}

/// What deleting an upload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaDeletion {
    /// It was the caller's, and it is gone (its bytes with it).
    Deleted,
    /// It is someone else's: nothing changed.
    NotOwner,
    /// No upload has that id (never had, or deleted before).
    Unknown,
}

/// What a watcher may know of one user's presence, as the directory holds it: one read, so the
/// version, the settings and the contact flag agree with each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceRecord {
    pub user: UserId,
    /// When they were last seen (`None`: never recorded). Unfiltered: the node applies `settings`.
    pub last_seen_ms: Option<i64>,
    pub settings: PrivacySettings,
    /// The user's rules version: grows by one with each change of their settings or contacts.
    pub version: u64,
    /// Whether the watcher is on this user's contact list.
    pub watcher_is_contact: bool,
}

/// What adding or removing a contact did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContactChange {
    /// Done; the owner's rules version is now this.
    Changed { version: u64 },
    /// It already was so (added twice, or removed when absent): nothing written.
    Unchanged,
    /// The contact (or the owner) is not a user.
    UnknownUser,
    /// Adding would pass the list's limit: nothing written.
    TooMany,
}

/// A user's stored uploads, counted for their quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediaTotals {
    pub uploads: u64,
    pub bytes: u64,
}

/// A browser's (or device's) Web Push subscription, registered while signed in with a token.
/// It lasts as long as that token: signing out (or the token expiring) ends the notifications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushSubscriptionRecord {
    /// The push service's URL; unique: registering it again (another sign-in on the same
    /// browser) moves it to the new user and token.
    pub endpoint: String,
    pub user: UserId,
    /// Hash of the token it was registered with ([`crate::token_hash`]).
    pub token_hash: String,
    /// The browser's keys for payload encryption, base64url as the browser gave them.
    pub p256dh: String,
    pub auth: String,
    pub created_at_ms: i64,
}

/// Move a cursor forward. `device: None` moves the member-level cursor only; a device cursor also
/// moves the member-level one (member delivered = max over devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorUpdate {
    pub conversation_id: ConversationId,
    pub user: UserId,
    pub device: Option<DeviceId>,
    pub kind: ReceiptKind,
    pub seq: Seq,
}

/// One transaction's worth of writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub messages: Vec<NewMessage>,
    pub cursors: Vec<CursorUpdate>,
}

/// What one commit did, in batch order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The fate of each message.
    pub messages: Vec<MessageResult>,
    /// Per cursor update, the seq it was applied as: the requested seq clamped to the
    /// conversation's last seq (a client cannot acknowledge messages that do not exist yet). This
    /// is what receipts announce to the other members.
    pub cursors: Vec<Seq>,
}

/// The fate of one message of a batch, in batch order. An enum so that later refusals (e.g. a
/// group member removed mid-flight) can be added without changing every caller's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageResult {
    /// Stored by this commit.
    Stored(StoredAck),
    /// Stored before under the same idempotency key (conversation, sender, client_msg_id), by an
    /// earlier commit or earlier in this batch: `ack` is the original's (`ack.duplicate` set) and
    /// `original` what it holds. The commit returns it so that the shard can push the original
    /// again (a retry may follow a crash between commit and fan-out) without reading it back —
    /// one read per duplicate made a resend storm cost one query each (BENCHMARKS.md, session 18).
    Duplicate { ack: StoredAck, original: Original },
}

impl MessageResult {
    /// The ack the sender gets, whichever the case.
    pub fn ack(&self) -> &StoredAck {
        match self {
            MessageResult::Stored(ack) | MessageResult::Duplicate { ack, .. } => ack,
        }
    }
}

/// What a stored message holds beyond its ack: a retry's own body and attachment may differ, and
/// recipients must only ever get the original's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Original {
    pub body: String,
    pub media: Option<MediaRef>,
}

/// A conversation as one shard knows it (defined in the protocol: it crosses nodes).
pub use parley_protocol::cluster::{GroupFloor, ShardSummary};

/// Milliseconds since the Unix epoch by the local clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
