//! A private Redis for one test: [`TestRedis::start`] runs `redis-server` on a free loopback port
//! with a scratch directory, no persistence (a restart comes back empty, like a crashed cache),
//! and ties it to the test: killed on `Drop`, and by the kernel (`PR_SET_PDEATHSIG`) if the test
//! process dies first. [`TestRedis::stop`] (kill -9) and [`TestRedis::restart`] (same port, so
//! URLs stay valid) let a test take Redis away under a running cache.
//!
//! Used by the history cache tests (`tests/tests/cache.rs`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::node::spawn_tied;
use crate::{free_port, TempDir};

/// The server binary (Debian's `redis-server` package).
const REDIS_SERVER: &str = "redis-server";

/// How long a fresh server may take to answer PING. It takes ≈20 ms on an idle machine; the margin
/// is for a loaded CI box running tests in parallel.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at starting the server: the free port we pick can be taken by someone else before
/// `redis-server` binds it.
const START_ATTEMPTS: usize = 3;

/// One test's Redis; killed when dropped.
pub struct TestRedis {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    starts: u32,
}

impl TestRedis {
    /// A fresh, empty server on a free loopback port.
    pub async fn start() -> anyhow::Result<TestRedis> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let mut redis = TestRedis { port: free_port(), dir: TempDir::new("parley-redis"), child: None, starts: 0 };
            match redis.spawn().await {
                Ok(()) => return Ok(redis),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// `redis://127.0.0.1:<port>/`, valid across restarts.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kill the server (SIGKILL) and wait until it is gone: everything it held is lost.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start a stopped server again on the same port, empty, and wait until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = self.dir.path().join(format!("redis-{}.log", self.starts));
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        let child = spawn_tied(&mut cmd, &log).with_context(|| format!("spawn {REDIS_SERVER}"))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("redis-server exited during startup ({status}):\n{}", std::fs::read_to_string(&log)?);
            }
            if ping(self.port) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                self.stop();
                bail!("redis-server not ready after {READY_TIMEOUT:?}:\n{}", std::fs::read_to_string(&log)?);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a server on `port` answers PING (inline command, one short blocking exchange).
fn ping(port: u16) -> bool {
    let exchange = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    exchange().unwrap_or(false)
}
