//! Node-to-node payloads: what shard actors, session routers and cluster agents tell each other.
//!
//! These travel as versioned bincode ([`crate::codec`]). Rules: never rename or reorder a variant or
//! field of an enum here (bincode encodes variants by index) — only append; no `#[serde(tag)]`,
//! `flatten` or `skip_serializing_if` (bincode cannot decode them).

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::frames::{GroupView, MessageView, ReceiptKind};
use crate::ids::{ClientMsgId, ConversationId, DeviceId, Epoch, MessageId, Seq, ShardId, UserId};
use crate::media::MediaRef;
use crate::privacy::PrivacySettings;

/// A send, as a session hands it to the shard that owns the conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendCommand {
    /// Always the authenticated user: sessions fill it in, clients cannot.
    pub sender: UserId,
    pub client_msg_id: ClientMsgId,
    pub conversation_id: ConversationId,
    /// Every member, sender included. For a direct chat: the two users.
    pub members: Vec<UserId>,
    pub body: String,
    /// The sending session (random per connection), so fan-out skips the device that already
    /// has the message. 0 = none (HTTP sends).
    pub origin_session: u64,
    /// The attached file, resolved by the sending node from the upload's record (never from the
    /// client's claims).
    pub media: Option<MediaRef>,
}

/// What became of a send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendOutcome {
    /// Durably stored (now or, when `duplicate`, by an earlier attempt with the same client id).
    Stored(StoredAck),
    /// Refused; nothing was stored.
    Refused(ErrorCode),
}

/// The durable facts about a stored message that its sender needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAck {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub sent_at_ms: i64,
    pub duplicate: bool,
}

/// A delivered/read acknowledgement from one device of `user`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptCommand {
    pub user: UserId,
    /// Who the shard tells: for a direct chat both members (the session checked `user` is one),
    /// so the shard needs no lookup. Empty for a group: the shard then tells the reader's own
    /// devices and the senders of the messages the receipt covers (not every member: in a group
    /// of n, n readers × n members would be n² frames per message).
    pub members: Vec<UserId>,
    pub device: DeviceId,
    pub conversation_id: ConversationId,
    pub kind: ReceiptKind,
    pub seq: Seq,
}

/// Reconnect sync: messages of these conversations that `device` has not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub user: UserId,
    pub device: DeviceId,
    pub conversations: Vec<ConversationId>,
    pub per_conversation_limit: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReply {
    /// Grouped by conversation, ascending seq within each.
    pub messages: Vec<MessageView>,
    /// Conversations with more unacknowledged messages than the limit.
    pub truncated: Vec<ConversationId>,
}

/// An event for the live sessions of some users, pushed by a shard to every node's router.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserEvent {
    Message(MessageView),
    Receipt {
        conversation_id: ConversationId,
        user_id: UserId,
        kind: ReceiptKind,
        seq: Seq,
    },
    /// The token with this hash was logged out: sessions authenticated by it end now, on every
    /// node (a stolen token must not keep a socket open after its owner logged out).
    TokenRevoked {
        token_hash: String,
    },
    /// A group was created or changed. A node that hands this on also forgets its cached copy of
    /// the group, so sends through it see the new members at once.
    Group(GroupView),
    /// `user_id` is typing in the conversation: for the other members' live sessions only. Not
    /// stored, not replayed, at most once.
    Typing {
        conversation_id: ConversationId,
        user_id: UserId,
    },
    /// A watched user came online or went offline (`last_seen_ms`: when, if known). Made by
    /// each node for its own watchers from the presence it holds; not stored.
    Presence {
        user_id: UserId,
        online: bool,
        last_seen_ms: Option<i64>,
    },
}

/// A conversation as its shard knows it, for the conversation list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSummary {
    pub conversation_id: ConversationId,
    pub last_seq: Seq,
    pub read_seq: Seq,
    pub unread: u64,
    pub last_message: Option<MessageView>,
    /// The member-level (delivered, read) cursor of the one *other* user with a cursor in this
    /// conversation; `None` when no other user has one, or more than one does. In a direct chat
    /// that is the peer's position, which the conversation list shows as `others_*_seq` (the
    /// store cannot tell a direct chat from a group; the node, which can, ignores it for groups).
    pub peer_cursor: Option<(Seq, Seq)>,
}

/// How far *every* listed member of a group has got: the lowest member-level (delivered, read)
/// cursor among them, a member without a cursor counting as 0. For one user's conversation list,
/// the members are everyone but that user, so their own messages up to `read_seq` are read by all
/// (the list's `others_*_seq`, which lets a client show group ticks after a restart).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupFloor {
    pub conversation_id: ConversationId,
    pub delivered_seq: Seq,
    pub read_seq: Seq,
}

/// Everything nodes send each other. Append-only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodePayload {
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Deliver `event` to the live sessions of `users` on the receiving node, except the session
    /// `skip_session` (the sender's own device; 0 = none). Sent by older nodes; see `DeliverBatch`.
    Deliver {
        users: Vec<UserId>,
        event: UserEvent,
        skip_session: u64,
    },
    Send(SendCommand),
    SendResult(SendOutcome),
    Receipt(ReceiptCommand),
    Sync(SyncRequest),
    SyncResult(SyncReply),
    /// A node announces which shards it serves and under which epochs.
    ShardsServed {
        node: String,
        boot_id: String,
        shards: Vec<(ShardId, Epoch)>,
    },
    /// Who are you? Answered with `Identity`.
    Identify,
    Identity {
        node: String,
        boot_id: String,
        http: String,
        /// Where peers dial this node (`host:port` of its cluster listener, or its advertised
        /// address), so that nodes that learn of it by gossip can reach it.
        dial: String,
    },
    History {
        conversation: ConversationId,
        before_seq: Option<Seq>,
        limit: u32,
    },
    HistoryResult(Result<(Vec<MessageView>, bool), ErrorCode>),
    Summaries {
        user: UserId,
        conversations: Vec<ConversationId>,
    },
    SummariesResult(Result<Vec<ShardSummary>, ErrorCode>),
    SyncFailed(ErrorCode),
    /// Gossip: the live members the sender knows, as (node name, dial address). A node that
    /// joined through a seed learns the rest of the cluster from it and dials them (ractor_cluster
    /// needs a full mesh).
    Members {
        members: Vec<(String, String)>,
    },
    /// Every delivery of one shard commit, in commit order: one frame per peer per commit instead
    /// of one per message (each frame costs a ractor_cluster round of encode, socket write, read,
    /// decode and several mailbox hops). Supersedes `Deliver`, which nodes still accept.
    DeliverBatch {
        deliveries: Vec<Delivery>,
    },
    /// Sends for shards the receiving node serves, from the node named `from`: everything its
    /// sessions handed to this peer while the previous batch was on its way, in the order they
    /// handed them over. Each send carries an id its node picked; the outcomes come back as
    /// `SendResults` casts to `from`'s gateway, one per shard commit. Supersedes `Call(Send)`
    /// (one ractor_cluster request and one reply per message), which nodes still answer.
    SendBatch {
        from: String,
        sends: Vec<RemoteSend>,
    },
    /// Outcomes of sends that arrived in `SendBatch`es, by the ids their node gave them.
    SendResults {
        results: Vec<(u64, SendOutcome)>,
    },
    /// Presence on the node named `node`: the users with at least one session there.
    /// `full`: `online` is the whole list (it replaces what the receiver held for `node`; sent
    /// when a peer becomes live, because casts made before that were not received); otherwise a
    /// change: `online` came online there, `offline` went offline there at the given times.
    /// `want_full`: answer with a full list of your own (the peer that sends its list to a
    /// new peer asks for the new peer's in return).
    Presence {
        node: String,
        full: bool,
        want_full: bool,
        online: Vec<UserId>,
        offline: Vec<(UserId, i64)>,
    },
    /// The [`GroupFloor`] of each group, over the members listed with it.
    GroupFloors {
        groups: Vec<(ConversationId, Vec<UserId>)>,
    },
    GroupFloorsResult(Result<Vec<GroupFloor>, ErrorCode>),
    /// Who may see `user`'s presence changed (PROTOCOL.md §5, "Privacy and contacts"): cast to
    /// every live peer by the node that stored the change, so that nodes whose sessions watch
    /// `user` filter the next change by it. `version` is `user`'s rules version after the change
    /// (it grows by one per change, whichever node made it): a receiver keeps, per kind of change,
    /// the newest it has seen, so casts from two nodes may arrive in any order.
    PresenceRules {
        user: UserId,
        version: u64,
        change: RulesChange,
    },
}

/// One change of a user's presence rules ([`NodePayload::PresenceRules`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RulesChange {
    /// The user's settings are now these.
    Settings(PrivacySettings),
    /// `contact` is now on the user's contact list, or no longer.
    Contact { contact: UserId, is_contact: bool },
}

/// One send of a [`NodePayload::SendBatch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSend {
    /// Picked by the sending node, unique among its sends in flight; echoed in `SendResults`.
    pub id: u64,
    pub cmd: SendCommand,
}

/// One event for the live sessions of `users` on the receiving node, except the session
/// `skip_session` (the sender's own device; 0 = none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub users: Vec<UserId>,
    pub event: UserEvent,
    pub skip_session: u64,
}
