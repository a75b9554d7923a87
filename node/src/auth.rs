//! Accounts and tokens: argon2id password hashes, opaque random bearer tokens stored by hash.
//!
//! Hashing is CPU-heavy by design (≈20-50 ms), so it runs on the blocking pool, never on a
//! runtime worker that is also pumping WebSockets.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use parley_protocol::limits::{MAX_PASSWORD_LEN, MAX_USERNAME_LEN, MIN_PASSWORD_LEN, MIN_USERNAME_LEN};
use parley_protocol::ErrorCode;
use rand::RngCore;

use crate::error::{NodeError, NodeResult};

/// Check a username against the documented rules (see `limits.rs`).
pub fn validate_username(name: &str) -> NodeResult<()> {
    let ok_len = (MIN_USERNAME_LEN..=MAX_USERNAME_LEN).contains(&name.len());
    let ok_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(NodeError::client(
            ErrorCode::InvalidField,
            format!("username must be {MIN_USERNAME_LEN}-{MAX_USERNAME_LEN} characters of [a-z0-9_.-]"),
        ))
    }
}

pub fn validate_password(password: &str) -> NodeResult<()> {
    if (MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&password.len()) {
        Ok(())
    } else {
        Err(NodeError::client(
            ErrorCode::InvalidField,
            format!("password must be {MIN_PASSWORD_LEN}-{MAX_PASSWORD_LEN} bytes"),
        ))
    }
}

/// argon2id PHC string of `password`.
pub async fn hash_password(password: String) -> NodeResult<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| NodeError::Actor(format!("argon2: {e}")))
    })
    .await
    .map_err(|e| NodeError::Actor(e.to_string()))?
}

/// Whether `password` matches the stored PHC string.
pub async fn verify_password(password: String, phc: String) -> NodeResult<bool> {
    tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&phc).map_err(|e| NodeError::Actor(format!("stored hash: {e}")))?;
        Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await
    .map_err(|e| NodeError::Actor(e.to_string()))?
}

/// A fresh bearer token: 32 random bytes (256 bits), base64url. Unguessable; opaque to clients.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_rules() {
        for (name, ok) in [("alice", true), ("a_b.c-1", true), ("ab", false), ("Alice", false), ("a b", false)] {
            assert_eq!(validate_username(name).is_ok(), ok, "{name}");
        }
        assert!(validate_username(&"a".repeat(33)).is_err());
    }

    #[tokio::test]
    async fn hash_and_verify() {
        let h = hash_password("correct horse".into()).await.unwrap();
        assert!(verify_password("correct horse".into(), h.clone()).await.unwrap());
        assert!(!verify_password("wrong horse".into(), h).await.unwrap());
        assert_ne!(new_token(), new_token());
    }
}
