//! Stable, client-visible error codes. The code (snake_case) is the contract; the human message next
//! to it may change. Internal failures are reported as `internal` or `unavailable`, never with their
//! details (those go to the server log).

use serde::{Deserialize, Serialize};

/// Every error code a client can receive, over WebSocket (`error` frame) or HTTP (JSON body).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame or body is not valid JSON, or a field has the wrong type.
    BadJson,
    /// The frame's `type` is not one this server knows.
    UnknownFrame,
    /// The frame exceeds `MAX_FRAME_BYTES` (or the HTTP body `MAX_HTTP_BODY_BYTES`).
    FrameTooLarge,
    /// A binary frame, or bytes that are not UTF-8.
    InvalidUtf8,
    /// A field is present but its value is not acceptable (too long, bad characters, empty body…).
    InvalidField,
    /// The message body exceeds `MAX_BODY_BYTES`.
    BodyTooLarge,
    /// No token was given, or a frame other than `hello` arrived before authentication.
    NotAuthenticated,
    /// The token is unknown, revoked, or expired.
    BadToken,
    /// Username or password is wrong.
    BadCredentials,
    /// Registration with a username that is already taken.
    UsernameTaken,
    /// The client speaks a protocol version this server does not.
    UnsupportedProtocol,
    /// A request names a sender that is not the authenticated user.
    SpoofedSender,
    /// A user id that does not exist.
    UnknownUser,
    /// A conversation id that does not exist or of which the user is not a member
    /// (the two are indistinguishable on purpose: membership is not disclosed).
    UnknownConversation,
    /// The server cannot serve this right now (shard moving, node draining, store down). Retry
    /// with the same client message id; the outcome of the earlier attempt may be unknown.
    Unavailable,
    /// The client is sending faster than allowed.
    RateLimited,
    /// The session's outbox overflowed because the client did not read; it is disconnected.
    SlowConsumer,
    /// Unknown route (HTTP 404).
    NotFound,
    /// A known route asked with a method it does not serve (HTTP 405).
    MethodNotAllowed,
    /// Something failed inside the server; details are in the server log.
    Internal,
    /// The user may not do this: a group change by a member who is not the group's owner.
    /// (Appended: node-to-node bytes encode this enum by variant index.)
    Forbidden,
    /// A `media_id` that names no upload (appended, as above).
    UnknownMedia,
    /// An upload larger than `MAX_MEDIA_BYTES` (appended, as above).
    MediaTooLarge,
    /// An upload that would take the user's stored uploads past their quota
    /// (`limits.media_quota_bytes`); deleting uploads frees room (appended, as above).
    MediaQuotaExceeded,
    /// Adding a contact past `MAX_CONTACTS`; removing one makes room (appended, as above).
    TooManyContacts,
}

impl ErrorCode {
    /// The HTTP status this code maps to — the single place where that decision is made.
    pub fn http_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            BadJson | UnknownFrame | InvalidUtf8 | InvalidField | UnsupportedProtocol => 400,
            FrameTooLarge | BodyTooLarge | MediaTooLarge | MediaQuotaExceeded => 413,
            NotAuthenticated | BadToken | BadCredentials => 401,
            SpoofedSender | Forbidden => 403,
            UnknownUser | UnknownConversation | NotFound | UnknownMedia => 404,
            MethodNotAllowed => 405,
            UsernameTaken | TooManyContacts => 409,
            RateLimited => 429,
            Unavailable | SlowConsumer => 503,
            Internal => 500,
        }
    }

    /// Whether retrying the same request later can succeed.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal)
    }

    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadJson => "bad_json",
            UnknownFrame => "unknown_frame",
            FrameTooLarge => "frame_too_large",
            InvalidUtf8 => "invalid_utf8",
            InvalidField => "invalid_field",
            BodyTooLarge => "body_too_large",
            NotAuthenticated => "not_authenticated",
            BadToken => "bad_token",
            BadCredentials => "bad_credentials",
            UsernameTaken => "username_taken",
            UnsupportedProtocol => "unsupported_protocol",
            SpoofedSender => "spoofed_sender",
            UnknownUser => "unknown_user",
            UnknownConversation => "unknown_conversation",
            Unavailable => "unavailable",
            RateLimited => "rate_limited",
            SlowConsumer => "slow_consumer",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Internal => "internal",
            Forbidden => "forbidden",
            UnknownMedia => "unknown_media",
            MediaTooLarge => "media_too_large",
            MediaQuotaExceeded => "media_quota_exceeded",
            TooManyContacts => "too_many_contacts",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol crate's error: decoding and validation failures.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
    #[error("{0}")]
    InvalidFieldDetail(String),
    #[error("malformed frame: {0}")]
    BadJson(String),
    #[error("unknown frame type `{0}`")]
    UnknownFrame(String),
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    #[error("undecodable binary payload: {0}")]
    Codec(String),
    #[error("unsupported payload version {0}")]
    UnsupportedVersion(u16),
}

impl ProtocolError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::InvalidField(_) | ProtocolError::InvalidFieldDetail(_) => ErrorCode::InvalidField,
            ProtocolError::BadJson(_) => ErrorCode::BadJson,
            ProtocolError::UnknownFrame(_) => ErrorCode::UnknownFrame,
            ProtocolError::FrameTooLarge(_) => ErrorCode::FrameTooLarge,
            ProtocolError::Codec(_) | ProtocolError::UnsupportedVersion(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_names() {
        for code in [ErrorCode::BadJson, ErrorCode::UnknownConversation, ErrorCode::Unavailable] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
