//! Push notifications (Web Push, RFC 8030): what a browser registers, what the server tells it,
//! and the notification it decrypts. A device that is not connected learns of a new message
//! through its push service (Google's, Mozilla's, Apple's…); the message itself still arrives
//! the usual way, by reconnect sync, so a push is only ever a notification (PROTOCOL.md §5,
//! "Push notifications").

use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, MessageId, Seq, UserId};
use crate::limits::{MAX_PUSH_ENDPOINT_BYTES, MAX_PUSH_PREVIEW_BYTES};
use crate::ProtocolError;

/// `GET /v1/push/key`: the server's VAPID public key (RFC 8292), the `applicationServerKey` a
/// browser subscribes with. Every node of a cluster answers the same key, so a subscription made
/// through one node is honoured by all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushKeyResponse {
    /// Uncompressed P-256 point (65 bytes), base64url without padding.
    pub vapid_public_key: String,
}

/// `POST /v1/push/subscriptions`: a browser's `PushSubscription.toJSON()`, as it comes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PushSubscriptionRequest {
    /// The push service's URL for this subscription (`https://…`).
    pub endpoint: String,
    /// Browsers send it (usually `null`); not used: a push service answers 404/410 for an
    /// expired subscription, and the server forgets it then.
    #[serde(default, rename = "expirationTime")]
    pub expiration_time: Option<f64>,
    pub keys: PushKeys,
}

/// The subscription's keys for payload encryption (RFC 8291).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushKeys {
    /// The browser's P-256 public key, uncompressed (65 bytes), base64url.
    pub p256dh: String,
    /// The browser's authentication secret (16 bytes), base64url.
    pub auth: String,
}

/// `DELETE /v1/push/subscriptions`: forget this endpoint (the caller's own only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushUnsubscribeRequest {
    pub endpoint: String,
}

/// `PUT /v1/conversations/:id/mute`: no notifications for this conversation until
/// `muted_until_ms` (ms since the epoch; [`MUTED_FOREVER_MS`] for "always"), or again from now
/// on when it is `null`. Messages still arrive; only notifications stop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MuteRequest {
    pub muted_until_ms: Option<i64>,
}

/// "Muted until further notice": 9999-12-31T23:59:59Z.
pub const MUTED_FOREVER_MS: i64 = 253_402_300_799_000;

/// What a push carries, encrypted end to end (the push service sees only ciphertext). One
/// notification stands for every message of the conversation that arrived while the previous
/// one for it was waiting to be sent (`count`): a burst of 50 messages is not 50 pushes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushNotification {
    /// Always `"message"` today; a client ignores kinds it does not know.
    #[serde(rename = "type")]
    pub kind: String,
    pub conversation_id: ConversationId,
    /// The latest message this notification stands for.
    pub message_id: MessageId,
    pub seq: Seq,
    pub sender_id: UserId,
    pub sender_name: String,
    /// The group's name; `null` for a direct chat.
    pub group_name: Option<String>,
    /// The start of the body (at most [`MAX_PUSH_PREVIEW_BYTES`], cut at a character boundary),
    /// or `null` when the server is configured not to show message text in notifications.
    pub preview: Option<String>,
    /// The attachment's media type, if the message carries one (`image/png`…).
    pub media_mime: Option<String>,
    /// Messages of this conversation this notification stands for (at least 1).
    pub count: u32,
    pub sent_at_ms: i64,
}

/// The start of `body` for a notification: at most [`MAX_PUSH_PREVIEW_BYTES`] bytes, cut at a
/// character boundary, with `…` when cut.
pub fn preview(body: &str) -> String {
    if body.len() <= MAX_PUSH_PREVIEW_BYTES {
        return body.to_string();
    }
    let mut end = MAX_PUSH_PREVIEW_BYTES;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &body[..end])
}

impl PushSubscriptionRequest {
    /// The checks that need no cryptography or configuration: the endpoint is an absolute
    /// `https://` URL (or `http://`, which only a node configured for it accepts) of bounded
    /// length, and the keys are base64url of the right lengths. Whether the endpoint's push
    /// service is one the node will call, and whether `p256dh` is a point on the curve, the node
    /// checks.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        endpoint_origin(&self.endpoint)?;
        if base64url_len(&self.keys.p256dh) != Some(65) {
            return Err(ProtocolError::InvalidFieldDetail(
                "keys.p256dh must be a 65-byte uncompressed P-256 public key in base64url".into(),
            ));
        }
        if base64url_len(&self.keys.auth) != Some(16) {
            return Err(ProtocolError::InvalidFieldDetail("keys.auth must be 16 bytes in base64url".into()));
        }
        Ok(())
    }
}

/// The origin (`scheme://host[:port]`, lower-cased) of a push endpoint, after checking that it is
/// an absolute `http(s)` URL of at most [`MAX_PUSH_ENDPOINT_BYTES`] without user info, and with a
/// host.
pub fn endpoint_origin(endpoint: &str) -> Result<String, ProtocolError> {
    let bad = || {
        ProtocolError::InvalidFieldDetail(format!(
            "endpoint must be an absolute https:// URL of at most {MAX_PUSH_ENDPOINT_BYTES} bytes"
        ))
    };
    if endpoint.len() > MAX_PUSH_ENDPOINT_BYTES || endpoint.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad());
    }
    let (scheme, rest) = endpoint.split_once("://").ok_or_else(bad)?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return Err(bad());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    Ok(format!("{scheme}://{}", authority.to_ascii_lowercase()))
}

/// Decoded length of base64url text (padding optional), or `None` if it is not base64url.
fn base64url_len(text: &str) -> Option<usize> {
    let body = text.trim_end_matches('=');
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return None;
    }
    match body.len() % 4 {
        1 => None,
        r => Some(body.len() / 4 * 3 + r.saturating_sub(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(endpoint: &str, p256dh: &str, auth: &str) -> PushSubscriptionRequest {
        PushSubscriptionRequest {
            endpoint: endpoint.into(),
            expiration_time: None,
            keys: PushKeys { p256dh: p256dh.into(), auth: auth.into() },
        }
    }

    const P256DH: &str = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    #[test]
    fn a_browser_subscription_passes() {
        let json = format!(
            r#"{{"endpoint":"https://fcm.googleapis.com/fcm/send/abc:def","expirationTime":null,"keys":{{"p256dh":"{P256DH}","auth":"{AUTH}"}}}}"#
        );
        let s: PushSubscriptionRequest = serde_json::from_str(&json).unwrap();
        s.validate().unwrap();
        assert_eq!(endpoint_origin(&s.endpoint).unwrap(), "https://fcm.googleapis.com");
    }

    #[test]
    fn bad_endpoints_and_keys_are_refused() {
        for endpoint in [
            "fcm.googleapis.com/x",
            "ftp://host/x",
            "https:///x",
            "https://user@host/x",
            "https://host/a b",
            &format!("https://host/{}", "a".repeat(MAX_PUSH_ENDPOINT_BYTES)),
        ] {
            assert!(sub(endpoint, P256DH, AUTH).validate().is_err(), "{endpoint}");
        }
        assert!(sub("https://h/x", &P256DH[..80], AUTH).validate().is_err());
        assert!(sub("https://h/x", P256DH, "BTBZMqHH6r4Tts7J_aSIggAA").validate().is_err());
        assert!(sub("https://h/x", P256DH, "BTBZMqHH6r4Tts7J+aSIgg").validate().is_err());
        assert_eq!(endpoint_origin("HTTPS://Push.Example:8443/a?b").unwrap(), "https://push.example:8443");
    }

    #[test]
    fn previews_are_cut_at_a_character_boundary() {
        assert_eq!(preview("hi"), "hi");
        let long = "é".repeat(MAX_PUSH_PREVIEW_BYTES);
        let p = preview(&long);
        assert!(p.ends_with('…'));
        assert!(p.len() <= MAX_PUSH_PREVIEW_BYTES + '…'.len_utf8());
    }
}
