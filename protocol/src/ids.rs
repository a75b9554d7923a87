//! Identifiers. Each is a newtype so that a user id can never be passed where a conversation id is
//! expected; all serialize as plain strings or numbers in JSON.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

use crate::limits::MAX_CLIENT_ID_LEN;
use crate::ProtocolError;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ProtocolError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map($name)
                    .map_err(|_| ProtocolError::InvalidField(concat!(stringify!($name), " is not a UUID")))
            }
        }
    };
}

uuid_id!(
    /// A registered user. Random (v4): it carries no information and cannot be guessed.
    UserId
);
uuid_id!(
    /// A conversation. For 1:1 chats it is derived from the two members (see
    /// [`ConversationId::direct`]), so both sides and every node compute the same id without a lookup.
    ConversationId
);
uuid_id!(
    /// A stored message. Time-ordered (v7) so that ids sort roughly by creation time.
    MessageId
);
uuid_id!(
    /// An uploaded media object. Random (v4), because the id is the capability to fetch the
    /// bytes: it travels only inside messages to a conversation's members (PROTOCOL.md §5, "Media").
    MediaId
);

/// Namespace for deriving direct-conversation ids (UUID v5). Never change it: every stored 1:1
/// conversation id depends on it.
const DIRECT_NAMESPACE: Uuid = Uuid::from_u128(0x7061_726c_6579_2d64_6972_6563_742d_7631);

impl ConversationId {
    /// The id of the 1:1 conversation between `a` and `b`, independent of argument order.
    pub fn direct(a: UserId, b: UserId) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut name = [0u8; 32];
        name[..16].copy_from_slice(lo.0.as_bytes());
        name[16..].copy_from_slice(hi.0.as_bytes());
        ConversationId(Uuid::new_v5(&DIRECT_NAMESPACE, &name))
    }
}

impl ConversationId {
    /// A new group's id: random (v4), so that it discloses nothing and cannot be guessed.
    pub fn new_group() -> Self {
        ConversationId(Uuid::new_v4())
    }

    /// Whether this is a group's id. Ids tell their kind by their UUID version: a direct chat's is
    /// derived (v5, [`ConversationId::direct`]), a group's random (v4, [`ConversationId::new_group`]),
    /// so a shard can treat groups differently without a lookup.
    pub fn is_group(&self) -> bool {
        self.0.get_version_num() == 4
    }
}

impl UserId {
    pub fn random() -> Self {
        UserId(Uuid::new_v4())
    }
}

impl MessageId {
    pub fn new() -> Self {
        MessageId(Uuid::now_v7())
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

/// A logical shard number in `0..shard_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShardId(pub u16);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A lease epoch: bumped on every acquisition of a shard's lease. Writes carry the epoch they were
/// issued under and are refused when it is no longer the current one (fencing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Position of a message within its conversation: 1, 2, 3, … without gaps.
pub type Seq = u64;

/// The client's own id for a message it sends; with the sender it forms the idempotency key, so a
/// retried send (same id) is stored once and answered with the original message id and seq.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientMsgId(String);

/// A device (one browser profile, one phone) of a user. The server keeps a delivery cursor per device
/// so that a reconnecting device receives exactly what it has not acknowledged yet.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

fn valid_client_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CLIENT_ID_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

macro_rules! client_token {
    ($name:ident, $what:literal) => {
        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, ProtocolError> {
                let s = s.into();
                if valid_client_token(&s) {
                    Ok($name(s))
                } else {
                    Err(ProtocolError::InvalidField(concat!($what, " must be 1-64 characters of [A-Za-z0-9-_.:]")))
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = ProtocolError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $name::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

client_token!(ClientMsgId, "client_msg_id");
client_token!(DeviceId, "device_id");

/// A client-chosen request id, echoed on the reply so a client can match answers to questions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReqId(String);
client_token!(ReqId, "req_id");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conversation_is_symmetric_and_distinct() {
        let a = UserId::random();
        let b = UserId::random();
        let c = UserId::random();
        assert_eq!(ConversationId::direct(a, b), ConversationId::direct(b, a));
        assert_ne!(ConversationId::direct(a, b), ConversationId::direct(a, c));
        assert!(!ConversationId::direct(a, b).is_group());
        assert!(ConversationId::new_group().is_group());
    }

    #[test]
    fn client_tokens_are_validated() {
        let check = |s: &str, ok: bool| assert_eq!(ClientMsgId::new(s).is_ok(), ok, "{s:?}");
        check("m-1", true);
        check("550e8400-e29b-41d4-a716-446655440000", true);
        check("", false);
        check("has space", false);
        check(&"x".repeat(64), true);
        check(&"x".repeat(65), false);
        check("émoji", false);
    }
}
