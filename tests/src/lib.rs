//! Test harness for Parley's end-to-end tests: real node processes ([`node`]), a real Postgres
//! ([`postgres`]), a real Redis ([`redis`]) and scratch directories ([`TempDir`]). Tests live in
//! `tests/tests/*.rs` and drive the `parley` binary from outside, through the typed client in
//! `parley_node::client`.

pub mod backend;
pub mod browser;
pub mod cluster;
pub mod node;
pub mod postgres;
pub mod push;
pub mod redis;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The repository's `ui/` directory: every test node serves the real browser UI from it.
pub fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("ui")
}

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

/// Ports handed out by [`free_port`]: below Linux's ephemeral range (32768-60999 by default), so
/// no outgoing connection of any process can be given one of them by the kernel.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A reservation older than this is stale (its test is long over) and the port may be reused.
const PORT_RESERVATION_TTL: Duration = Duration::from_secs(30 * 60);

/// A TCP port on 127.0.0.1 that is free and reserved for the calling test.
///
/// Why not "bind port 0, read it, release it": that port comes from the ephemeral range, and in the
/// moment between the release and the node binding it, any process's outgoing connection (a
/// parallel test's client, Postgres, Redis) can be given it — CI saw a node exit at start with
/// its port taken. Here the port is outside that range, checked free by binding it, and reserved
/// across the parallel test processes by creating a file exclusively under the temp dir, so two
/// tests are never handed the same port.
pub fn free_port() -> u16 {
    use std::time::SystemTime;
    let dir = std::env::temp_dir().join("parley-test-ports");
    std::fs::create_dir_all(&dir).expect("port reservation dir");
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let start = uuid::Uuid::new_v4().as_u128() as u32 % span;
    for i in 0..span {
        let port = TEST_PORTS.start + ((start + i) % span) as u16;
        let marker = dir.join(port.to_string());
        let stale = std::fs::metadata(&marker)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() > PORT_RESERVATION_TTL);
        if stale {
            let _ = std::fs::remove_file(&marker);
        }
        if std::fs::OpenOptions::new().write(true).create_new(true).open(&marker).is_err() {
            continue; // reserved by another test (or a stale file another process just took over)
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free test port in {TEST_PORTS:?}")
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
