//! Parley's wire vocabulary: every type that crosses a process boundary is defined here and only here.
//!
//! Owns: identifiers ([`ids`]), the shard map ([`shard`]), client WebSocket/HTTP frames ([`frames`],
//! [`http`]), stable error codes ([`error`]), documented limits ([`limits`]), node-to-node payloads
//! ([`cluster`]) and the binary codec ([`codec`]). Pure data: no tokio, no IO, so that every other crate
//! (and any third-party client) can depend on it cheaply. The protocol is documented for humans in
//! `protocol/PROTOCOL.md`; a change to a type here is a change to that document.

pub mod cluster;
pub mod codec;
pub mod error;
pub mod frames;
pub mod http;
pub mod ids;
pub mod limits;
pub mod media;
pub mod privacy;
pub mod push;
pub mod shard;

pub use error::{ErrorCode, ProtocolError};
pub use ids::{ClientMsgId, ConversationId, DeviceId, Epoch, MediaId, MessageId, Seq, ShardId, UserId};

/// The client protocol version spoken by this build. A client announces its version in `hello`;
/// any other value is refused with `unsupported_protocol` so that old clients fail loudly, not subtly.
pub const PROTOCOL_VERSION: u32 = 1;
