//! Media (photos, video, audio, documents): what a message carries about an uploaded file, and the
//! checks an upload's type and name must pass. The bytes themselves travel over HTTP
//! (`POST /v1/media`, `GET /v1/media/:id`, PROTOCOL.md §5, "Media"), never inside a WebSocket frame or a
//! node-to-node payload, so a message stays small however large its attachment.

use serde::{Deserialize, Serialize};

use crate::ids::MediaId;
use crate::limits::{MAX_MEDIA_NAME_BYTES, MAX_MIME_BYTES};
use crate::ProtocolError;

/// An uploaded file as messages and the upload's answer describe it. The server fills it in from
/// what it stored at upload time; a sender names only the id, so it cannot lie about the type,
/// size or checksum its recipients see. Also travels between nodes (inside `SendCommand` and
/// `MessageView`), so it follows `cluster.rs`'s rules: no optional-field skipping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRef {
    pub media_id: MediaId,
    /// The media type given at upload (`Content-Type`), lower-cased, without parameters.
    pub mime: String,
    /// Bytes.
    pub size: u64,
    /// The file name given at upload (`?name=`), if any.
    pub name: Option<String>,
    /// Lower-case hex SHA-256 of the bytes, so a client can check what it downloaded.
    pub sha256: String,
}

/// A media type as stored: `type/subtype` of RFC 6838 token characters, lower-cased, parameters
/// (`; charset=…`) dropped. Anything else is refused rather than guessed at, because recipients'
/// clients decide from it how to show the file.
pub fn normalize_mime(raw: &str) -> Result<String, ProtocolError> {
    let essence = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
    };
    match essence.split_once('/') {
        Some((kind, sub)) if essence.len() <= MAX_MIME_BYTES && token(kind) && token(sub) => Ok(essence),
        _ => Err(ProtocolError::InvalidFieldDetail(format!(
            "Content-Type must be a media type `type/subtype` of at most {MAX_MIME_BYTES} bytes"
        ))),
    }
}

/// A file name as stored: trimmed, 1 to [`MAX_MEDIA_NAME_BYTES`] bytes, no control characters and
/// no path separators (a client saving the file must not be steered into another directory).
pub fn validate_media_name(raw: &str) -> Result<String, ProtocolError> {
    let name = raw.trim();
    if name.is_empty()
        || name.len() > MAX_MEDIA_NAME_BYTES
        || name == "."
        || name == ".."
        || name.chars().any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err(ProtocolError::InvalidFieldDetail(format!(
            "name must be 1 to {MAX_MEDIA_NAME_BYTES} bytes without control characters, `/` or `\\`"
        )));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_are_normalized_or_refused() {
        assert_eq!(normalize_mime("image/PNG").unwrap(), "image/png");
        assert_eq!(normalize_mime("text/plain; charset=utf-8").unwrap(), "text/plain");
        assert_eq!(
            normalize_mime("application/vnd.openxmlformats-officedocument.wordprocessingml.document").unwrap().len(),
            71
        );
        for bad in ["", "image", "image/", "/png", "image/png/x", "ima ge/png", "image/p\"ng", "-x/y"] {
            assert!(normalize_mime(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_mime(&format!("a/{}", "b".repeat(MAX_MIME_BYTES))).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(validate_media_name("  holiday photo.jpg ").unwrap(), "holiday photo.jpg");
        assert_eq!(validate_media_name("résumé.pdf").unwrap(), "résumé.pdf");
        for bad in ["", "   ", "..", "a/b", "a\\b", "a\nb", "\u{7}"] {
            assert!(validate_media_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_media_name(&"x".repeat(MAX_MEDIA_NAME_BYTES + 1)).is_err());
    }
}
