//! WebSocket frames between a client and a node: JSON text frames with a `type` tag.
//!
//! Decoding is deliberately two-step ([`ClientFrame::decode`]): first "is this JSON with a `type`?",
//! then "is it a type we know?", then the fields — so each kind of bad input gets its own error code.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, ProtocolError};
use crate::ids::{ClientMsgId, ConversationId, DeviceId, MediaId, MessageId, ReqId, Seq, UserId};
use crate::limits::MAX_FRAME_BYTES;
use crate::media::MediaRef;

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Must be the first frame: authenticates the connection and names the device.
    Hello { protocol: u32, token: String, device_id: DeviceId },
    /// Send a message: to a user (`to`, a 1:1 chat) or into a conversation (`conversation_id`).
    /// With `media_id` (an upload's id, `POST /v1/media`) the message carries that file and
    /// `body` is its caption, which may then be empty.
    Send {
        client_msg_id: ClientMsgId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<UserId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<ConversationId>,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media_id: Option<MediaId>,
    },
    /// This device has received every message of the conversation up to `seq` (cumulative).
    Delivered { conversation_id: ConversationId, seq: Seq },
    /// The user has read every message of the conversation up to `seq` (cumulative).
    Read { conversation_id: ConversationId, seq: Seq },
    /// A page of history, newest first from `before_seq` (exclusive; omitted = from the end).
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<ReqId>,
        conversation_id: ConversationId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before_seq: Option<Seq>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// The user's conversations with their last message and unread count.
    Conversations {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<ReqId>,
    },
    /// Keep-alive; answered with `pong`.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
    /// The user is typing in the conversation: shown to the other members' live sessions. No
    /// reply; at most one per conversation per `TYPING_INTERVAL_MS` is forwarded.
    Typing { conversation_id: ConversationId },
    /// Watch these users' presence (online, last seen), replacing what this connection watched
    /// before; an empty list stops watching. Answered with one `presence` frame per user, then
    /// a `presence` frame whenever one of them comes online or goes offline, while the
    /// connection lasts. At most `MAX_PRESENCE_WATCH` users; every id must exist.
    Presence { user_ids: Vec<UserId> },
}

/// Every `type` a client may send; anything else is `unknown_frame`.
pub const CLIENT_FRAME_TYPES: &[&str] =
    &["hello", "send", "delivered", "read", "history", "conversations", "ping", "typing", "presence"];

impl ClientFrame {
    /// Decode one text frame, classifying failures into distinct error codes.
    pub fn decode(text: &str) -> Result<ClientFrame, ProtocolError> {
        if text.len() > MAX_FRAME_BYTES {
            return Err(ProtocolError::FrameTooLarge(text.len()));
        }
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| ProtocolError::BadJson("missing string field `type`".into()))?;
        if !CLIENT_FRAME_TYPES.contains(&kind) {
            let shown: String = kind.chars().take(32).collect();
            return Err(ProtocolError::UnknownFrame(shown));
        }
        serde_json::from_value(value).map_err(classify_serde_error)
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("client frames always serialize")
    }
}

/// A field that failed its own validation (see `ids.rs`) reports `invalid_field`; anything else
/// (missing field, wrong JSON type) is `bad_json`.
pub fn classify_serde_error(e: serde_json::Error) -> ProtocolError {
    let text = e.to_string();
    match text.strip_prefix("invalid field: ") {
        // serde appends " at line x column y"; keep only our sentence.
        Some(rest) => ProtocolError::InvalidFieldDetail(rest.split(" at line ").next().unwrap_or(rest).to_string()),
        None => ProtocolError::BadJson(text),
    }
}

/// A message as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub sender: UserId,
    pub client_msg_id: ClientMsgId,
    pub body: String,
    /// Server commit time, milliseconds since the Unix epoch.
    pub sent_at_ms: i64,
    /// The attached file, if any (`null` otherwise: this type also travels between nodes as
    /// bincode, which cannot skip fields). `body` is then its caption.
    #[serde(default)]
    pub media: Option<MediaRef>,
}

/// Which acknowledgement a receipt reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    Delivered,
    Read,
}

/// Kind of conversation: a 1:1 chat (its id derived from the two users) or a group (random id,
/// a name, an owner, up to `MAX_GROUP_MEMBERS` members).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    Direct,
    Group,
}

/// One entry of the conversation list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub conversation_id: ConversationId,
    pub kind: ConversationKind,
    pub members: Vec<UserId>,
    pub last_seq: Seq,
    /// Highest seq this user has marked read.
    pub read_seq: Seq,
    /// Messages from others after `read_seq`.
    pub unread: u64,
    /// Every other member has received (on some device) every message up to here: in a direct
    /// chat the peer, in a group each current member but this user (a member without any receipt
    /// counts as 0). Lets a client show its own messages' ticks after a restart, since receipts
    /// are not replayed. A conversation with no one else: `last_seq`.
    #[serde(default)]
    pub others_delivered_seq: Seq,
    /// Every other member has read every message up to here (as above).
    #[serde(default)]
    pub others_read_seq: Seq,
    pub last_message: Option<MessageView>,
    /// Groups only: the group's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Groups only: the member who may change the group (add, remove, rename).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<UserId>,
    /// This user muted the conversation's notifications until then (ms since the epoch); absent
    /// when it is not muted (PROTOCOL.md §5, "Push notifications").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muted_until_ms: Option<i64>,
}

/// A group as its members see it: answered by the group endpoints and pushed in `group` frames.
/// Also travels between nodes (inside `UserEvent::Group`), so it has no optional fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub conversation_id: ConversationId,
    pub name: String,
    pub owner: UserId,
    /// Sorted; the owner included.
    pub members: Vec<UserId>,
    /// Bumped by every change; a client keeps the view with the highest version.
    pub version: u64,
}

/// Limits the server enforces, announced in `welcome` so clients need not hard-code them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_body_bytes: usize,
    pub max_page: u32,
    /// Frames of one connection the server holds at once (`limits.max_in_flight_per_connection`):
    /// a client may pipeline this many requests before the server stops reading its socket.
    pub max_in_flight: usize,
    /// Largest media upload (`POST /v1/media`), in bytes.
    #[serde(default)]
    pub max_media_bytes: u64,
}

/// Frames the server sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Answer to a good `hello`.
    Welcome { protocol: u32, user_id: UserId, username: String, device_id: DeviceId, node: String, limits: Limits },
    /// The message is durably stored (sent only after the commit). `duplicate` is true when this
    /// answers a retry of an already stored message; ids and seq are then the original ones.
    Ack {
        client_msg_id: ClientMsgId,
        message_id: MessageId,
        conversation_id: ConversationId,
        seq: Seq,
        sent_at_ms: i64,
        duplicate: bool,
    },
    /// A message for this device: live, or replayed during reconnect sync.
    Message { message: MessageView },
    /// Another member's device received (`delivered`) or read (`read`) messages up to `seq`.
    Receipt { conversation_id: ConversationId, user_id: UserId, kind: ReceiptKind, seq: Seq },
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<ReqId>,
        conversation_id: ConversationId,
        /// Ascending by seq.
        messages: Vec<MessageView>,
        has_more: bool,
    },
    Conversations {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<ReqId>,
        conversations: Vec<ConversationSummary>,
    },
    /// A group this user belongs to (or just left) was created or changed. Sent to every member
    /// before and after the change: a user missing from `members` is no longer in the group.
    Group { group: GroupView },
    /// Reconnect sync finished: everything this device had not acknowledged was sent (except
    /// conversations flagged in `truncated`, whose rest the client pages with `history`).
    SyncDone { messages: u64, truncated: Vec<ConversationId> },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
    /// Another member is typing in the conversation (show it for `TYPING_SHOWN_MS`, or until a
    /// message from them arrives).
    Typing { conversation_id: ConversationId, user_id: UserId },
    /// A watched user's presence: `online` while they have a connection to any live node;
    /// otherwise `last_seen_ms`, when their last connection ended (`null`: never connected
    /// since this server recorded it). Sent in answer to `presence` and on every change.
    Presence { user_id: UserId, online: bool, last_seen_ms: Option<i64> },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<ClientMsgId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<ReqId>,
    },
}

impl ServerFrame {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    pub fn decode(text: &str) -> Result<ServerFrame, ProtocolError> {
        serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        ServerFrame::Error { code, message: message.into(), client_msg_id: None, req_id: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(text: &str) -> Option<ErrorCode> {
        ClientFrame::decode(text).err().map(|e| e.code())
    }

    #[test]
    fn decode_classifies_bad_input() {
        let cases: &[(&str, Option<ErrorCode>)] = &[
            (r#"{"type":"ping"}"#, None),
            (r#"{"type":"ping","nonce":7}"#, None),
            ("not json", Some(ErrorCode::BadJson)),
            (r#"{"nonce":1}"#, Some(ErrorCode::BadJson)),
            (r#"{"type":42}"#, Some(ErrorCode::BadJson)),
            (r#"{"type":"teleport"}"#, Some(ErrorCode::UnknownFrame)),
            (r#"{"type":"send","client_msg_id":"a","body":1}"#, Some(ErrorCode::BadJson)),
            (r#"{"type":"send","client_msg_id":"a b","body":"x"}"#, Some(ErrorCode::InvalidField)),
            (r#"{"type":"read","conversation_id":"nope","seq":1}"#, Some(ErrorCode::BadJson)),
            (r#"{"type":"presence","user_ids":[]}"#, None),
            (r#"{"type":"presence"}"#, Some(ErrorCode::BadJson)),
            (r#"{"type":"presence","user_ids":["nope"]}"#, Some(ErrorCode::BadJson)),
            (r#"{"type":"send","client_msg_id":"a","to":null,"body":"","media_id":"nope"}"#, Some(ErrorCode::BadJson)),
        ];
        for (text, want) in cases {
            assert_eq!(code_of(text), *want, "{text}");
        }
        let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(MAX_FRAME_BYTES));
        assert_eq!(code_of(&big), Some(ErrorCode::FrameTooLarge));
    }

    #[test]
    fn frames_round_trip() {
        let f = ClientFrame::Send {
            client_msg_id: ClientMsgId::new("c1").unwrap(),
            to: Some(UserId::random()),
            conversation_id: None,
            body: "hi".into(),
            media_id: None,
        };
        assert_eq!(ClientFrame::decode(&f.encode()).unwrap(), f);
        assert!(!f.encode().contains("media_id"), "no media, no field");
        let with_media = ClientFrame::Send {
            client_msg_id: ClientMsgId::new("c2").unwrap(),
            to: None,
            conversation_id: Some(ConversationId(uuid::Uuid::new_v4())),
            body: String::new(),
            media_id: Some(MediaId(uuid::Uuid::new_v4())),
        };
        assert_eq!(ClientFrame::decode(&with_media.encode()).unwrap(), with_media);
        let e = ServerFrame::error(ErrorCode::BadJson, "nope");
        assert_eq!(ServerFrame::decode(&e.encode()).unwrap(), e);
        let w = ClientFrame::Presence { user_ids: vec![UserId::random(), UserId::random()] };
        assert_eq!(ClientFrame::decode(&w.encode()).unwrap(), w);
        let seen =
            ServerFrame::Presence { user_id: UserId::random(), online: false, last_seen_ms: Some(1_700_000_000_000) };
        assert_eq!(ServerFrame::decode(&seen.encode()).unwrap(), seen);
        let never = ServerFrame::Presence { user_id: UserId::random(), online: false, last_seen_ms: None };
        assert!(never.encode().contains(r#""last_seen_ms":null"#), "never seen is an explicit null");
    }
}
