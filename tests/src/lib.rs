//! Test harness for Parley's end-to-end tests: real node processes ([`node`]), a real Postgres
//! ([`postgres`]), a real Redis ([`redis`]) and scratch directories ([`TempDir`]). Tests live in
//! `tests/tests/*.rs` and drive the `parley` binary from outside, through the typed client in
//! `parley_node::client`.

pub mod cluster;
pub mod node;
pub mod postgres;
pub mod redis;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A scratch directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `cond` every 50 ms until it holds or `timeout` passes; instead of sleeps in tests.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; a small race with other processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A user record for storage-level checks: a fresh id, `name`, and a placeholder password hash
/// (these checks never verify passwords).
pub fn user_record(name: &str) -> parley_storage::UserRecord {
    parley_storage::UserRecord {
        id: parley_protocol::UserId::random(),
        username: name.to_string(),
        password_hash: format!("$argon2id$fake${name}"),
        created_at_ms: parley_storage::now_ms(),
    }
}
