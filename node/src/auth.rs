//! Accounts and tokens: argon2id password hashes, opaque random bearer tokens stored by hash.
//!
//! Hashing is CPU- and memory-heavy by design (≈20-50 ms, 19 MiB), so it runs on the blocking
//! pool, never on a runtime worker that is also pumping WebSockets, and at most one hash per core
//! at a time.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use parley_protocol::limits::{MAX_PASSWORD_LEN, MAX_USERNAME_LEN, MIN_PASSWORD_LEN, MIN_USERNAME_LEN};
use parley_protocol::ErrorCode;
use rand::RngCore;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::Semaphore;

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

/// How long a registration or login waits for a hashing slot before it is refused as
/// `unavailable` (retryable): a flood of logins is answered, not queued without end.
pub const HASH_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Password hashes computed at once: one per core. Why: each argon2id hash works in a 19 MiB
/// buffer on a blocking-pool thread, and that pool grows to 512 threads — unbounded, a burst of
/// registrations or logins (or an attacker's) could take ≈10 GB of memory and every core from the
/// WebSocket runtime. More hashes at once than cores would not finish sooner anyway.
fn hash_slots() -> &'static Semaphore {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
}

/// Run one argon2 computation in a hashing slot, on the blocking pool. The slot goes with the
/// computation, not with the caller: a request dropped mid-hash (its client left) cannot free a
/// slot while its hash still runs.
async fn with_hash_slot<T: Send + 'static>(work: impl FnOnce() -> NodeResult<T> + Send + 'static) -> NodeResult<T> {
    let slot = tokio::time::timeout(HASH_QUEUE_TIMEOUT, hash_slots().acquire())
        .await
        .map_err(|_| NodeError::client(ErrorCode::Unavailable, "too many logins at once; retry shortly"))?
        .map_err(|e| NodeError::Actor(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
    .map_err(|e| NodeError::Actor(e.to_string()))?
}

/// argon2id PHC string of `password`.
pub async fn hash_password(password: String) -> NodeResult<String> {
    with_hash_slot(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| NodeError::Actor(format!("argon2: {e}")))
    })
    .await
}

/// Whether `password` matches the stored PHC string.
pub async fn verify_password(password: String, phc: String) -> NodeResult<bool> {
    with_hash_slot(move || {
        let parsed = PasswordHash::new(&phc).map_err(|e| NodeError::Actor(format!("stored hash: {e}")))?;
        Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await
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

    /// However many hashes are asked for at once, no more than one per core run at a time (and
    /// all of them run). Without the slots, the blocking pool runs all 3 × cores at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashes_run_at_most_one_per_core_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let slots = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (active, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks: Vec<_> = (0..3 * slots)
            .map(|_| {
                let (active, most) = (active.clone(), most.clone());
                tokio::spawn(with_hash_slot(move || {
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                    active.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }))
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!((1..=slots).contains(&most), "{most} hashes ran at once with {slots} slots");
    }

    #[tokio::test]
    async fn hash_and_verify() {
        let h = hash_password("correct horse".into()).await.unwrap();
        assert!(verify_password("correct horse".into(), h.clone()).await.unwrap());
        assert!(!verify_password("wrong horse".into(), h).await.unwrap());
        assert_ne!(new_token(), new_token());
    }
}
