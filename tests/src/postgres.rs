//! A real Postgres for one test: [`TestPostgres::start`] hands out a fresh, empty database.
//!
//! Two sources, chosen by the environment:
//! - `PARLEY_TEST_PG_URL` set (a server URL such as `postgres://postgres@127.0.0.1:5432/postgres`):
//!   a new database `parley_test_<uuid>` is created there and dropped again on `Drop`. Use it to
//!   share one server across a whole test run (each nextest test is its own process, so a static
//!   per-process cluster would be one cluster per test anyway).
//! - otherwise a private cluster is started from `/usr/lib/postgresql/<newest>/bin`: `initdb` into a
//!   temp dir under `/tmp`, `postgres` on a free loopback port, run as user `postgres` (Postgres
//!   refuses root), with fsync off (correctness tests only, never benchmarks). It dies with the
//!   test: killed on `Drop`, and by the kernel (`PR_SET_PDEATHSIG`) if the test process dies first.
//!
//! Used by the storage conformance suite and by any test that needs a Postgres-backed node.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Environment variable naming an already running server to create test databases on.
pub const PG_URL_ENV: &str = "PARLEY_TEST_PG_URL";

/// How long a freshly started cluster may take to accept connections. It takes ≈0.2 s on an idle
/// machine; the margin is for a loaded CI box running tests in parallel.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `Drop` waits for an immediate shutdown before it kills the postmaster outright.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts at starting the server: the free port we pick can be taken by someone else before
/// `postgres` binds it.
const START_ATTEMPTS: usize = 3;

/// One test's database; dropped (or its whole cluster stopped) when this value is dropped.
pub struct TestPostgres {
    url: String,
    source: Source,
}

enum Source {
    /// A database created on the server named by [`PG_URL_ENV`].
    Shared { server_url: String, database: String },
    /// A cluster of our own.
    Private(Cluster),
}

struct Cluster {
    child: Child,
    /// The port the server listens on, kept across restarts so that its URL stays valid.
    port: u16,
    /// Holds the data directory, the socket and the logs; removed on drop.
    base: PathBuf,
    bin: PathBuf,
    account: Account,
}

/// The unprivileged account that runs the server (`None` fields: run as ourselves).
#[derive(Clone, Copy)]
struct Account {
    uid: Option<u32>,
    gid: Option<u32>,
}

impl TestPostgres {
    /// A fresh database, from [`PG_URL_ENV`] when set, else from a private cluster.
    pub async fn start() -> anyhow::Result<TestPostgres> {
        match std::env::var(PG_URL_ENV) {
            Ok(server_url) if !server_url.is_empty() => Self::create_database(server_url).await,
            _ => Self::start_cluster().await,
        }
    }

    /// The database's URL, for `StoreConfig::Postgres` or a node's config.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A plain client on the test's database, for assertions that look at rows directly.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url).await
    }

    async fn create_database(server_url: String) -> anyhow::Result<TestPostgres> {
        let database = format!("parley_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&server_url).await.with_context(|| format!("connect to {PG_URL_ENV}"))?;
        admin.batch_execute(&format!("CREATE DATABASE {database}")).await?;
        let url = with_database(&server_url, &database)?;
        Ok(TestPostgres { url, source: Source::Shared { server_url, database } })
    }

    /// A fresh private cluster even when [`PG_URL_ENV`] is set: for a test that stops and restarts
    /// the server, which must not disturb the tests sharing that one.
    pub async fn start_private() -> anyhow::Result<TestPostgres> {
        Self::start_cluster().await
    }

    /// A shell command that stops the private server with a fast shutdown (as a Postgres restart
    /// begins) and returns once the server is back, which [`TestPostgres::revive_if_exited`]
    /// takes care of; the caller must keep calling that while the command may run. `None` for a
    /// shared server, which a test must never stop.
    pub fn restart_command(&self) -> Option<String> {
        let Source::Private(cluster) = &self.source else { return None };
        let pid_file = cluster.base.join("data").join("postmaster.pid");
        // Wait (bounded) until the old postmaster is gone, i.e. reaped by `revive_if_exited`,
        // then until the new one accepts connections.
        Some(format!(
            "set -e; pid=$(head -n 1 '{pid}'); kill -INT \"$pid\"; \
             for _ in $(seq 1 600); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.05; done; \
             for _ in $(seq 1 600); do pg_isready -q -h 127.0.0.1 -p {port} && exit 0; sleep 0.05; done; exit 1",
            pid = pid_file.display(),
            port = cluster.port,
        ))
    }

    /// If the private server has exited (a [`TestPostgres::restart_command`] stopped it), start it
    /// again on the same port and data directory. True if it was restarted.
    pub async fn revive_if_exited(&mut self) -> anyhow::Result<bool> {
        let Source::Private(cluster) = &mut self.source else { return Ok(false) };
        if cluster.child.try_wait()?.is_none() {
            return Ok(false);
        }
        let (child, _) =
            start_server(&cluster.bin, &cluster.base, &cluster.base.join("data"), cluster.account, cluster.port)
                .await?;
        cluster.child = child;
        Ok(true)
    }

    async fn start_cluster() -> anyhow::Result<TestPostgres> {
        let bin = newest_bin_dir()?;
        let account = server_account()?;
        let base = Path::new("/tmp").join(format!("parley-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&base).with_context(|| format!("create {}", base.display()))?;
        // From here on the directory is ours to remove, including on every error path.
        let mut guard = DirGuard(Some(base.clone()));
        if let (Some(uid), Some(gid)) = (account.uid, account.gid) {
            std::os::unix::fs::chown(&base, Some(uid), Some(gid))?;
        }
        let data = base.join("data");
        let status = server_command(&bin.join("initdb"), account)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "-D"])
            .arg(&data)
            .stdout(log_file(&base, "initdb.log")?)
            .stderr(log_file(&base, "initdb.log")?)
            .status()
            .context("run initdb")?;
        if !status.success() {
            bail!("initdb failed ({status}):\n{}", log_tail(&base.join("initdb.log")));
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = crate::free_port();
            match start_server(&bin, &base, &data, account, port).await {
                Ok((child, url)) => {
                    guard.0 = None;
                    let cluster = Cluster { child, port, base, bin, account };
                    return Ok(TestPostgres { url, source: Source::Private(cluster) });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("postgres did not start")))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        match &mut self.source {
            Source::Shared { server_url, database } => {
                // Drop runs inside the test's runtime, which cannot be blocked on; a scoped thread
                // with its own small runtime can.
                let (server_url, database) = (server_url.clone(), database.clone());
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                            return;
                        };
                        rt.block_on(async {
                            if let Ok(admin) = connect(&server_url).await {
                                let sql = format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
                                let _ = admin.batch_execute(&sql).await;
                            }
                        });
                    });
                });
            }
            Source::Private(cluster) => cluster.stop(),
        }
    }
}

impl Cluster {
    /// Immediate shutdown (the postmaster removes its shared memory, unlike after SIGKILL), then
    /// SIGKILL if that did not finish in time, then the directory goes.
    fn stop(&mut self) {
        let stopped = server_command(&self.bin.join("pg_ctl"), self.account)
            .args(["stop", "-m", "immediate", "-w", "-t", "5", "-D"])
            .arg(self.base.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + if stopped { STOP_TIMEOUT } else { Duration::ZERO };
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Removes a directory on drop unless disarmed (`.0 = None`).
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Connect and drive the connection on the current runtime.
async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("database URL without scheme")? + 3;
    let (head, rest) = url.split_at(scheme_end);
    let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(path_start);
    let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
    Ok(format!("{head}{authority}/{database}{query}"))
}

/// The `bin` directory of the newest installed Postgres major version.
fn newest_bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .with_context(|| format!("no Postgres under {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|v| root.join(v.to_string()).join("bin/postgres").exists())
        .max()
        .with_context(|| format!("no Postgres server binaries under {}", root.display()))?;
    Ok(root.join(newest.to_string()).join("bin"))
}

/// Who runs the server: ourselves unless we are root, which Postgres refuses; then `postgres`,
/// falling back to `nobody`.
fn server_account() -> anyhow::Result<Account> {
    // The owner of /proc/self is our effective uid; this avoids an unsafe geteuid().
    if std::fs::metadata("/proc/self")?.uid() != 0 {
        return Ok(Account { uid: None, gid: None });
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for name in ["postgres", "nobody"] {
        let found = passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == name)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        });
        if let Some((uid, gid)) = found {
            return Ok(Account { uid: Some(uid), gid: Some(gid) });
        }
    }
    bail!("running as root and neither user `postgres` nor `nobody` exists")
}

/// A command for a server binary, as `account`, from a directory it can read, dying with us.
fn server_command(program: &Path, account: Account) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir("/tmp").stdin(Stdio::null());
    if let Some(gid) = account.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = account.uid {
        cmd.uid(uid);
    }
    die_with_parent(&mut cmd);
    cmd
}

/// Make the child receive SIGKILL when the thread that spawned it exits, so a test killed by a
/// timeout leaves no server behind. (Spawn from the test's own thread, never a short-lived one.)
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child between fork and exec, where only
    // async-signal-safe calls are allowed; it calls prctl(2), which is one, allocates nothing and
    // touches no state shared with the parent. std runs it after setuid/setgid, so the credential
    // change cannot clear the death signal again.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A log file in `dir` (appended to), for a child's stdout or stderr: inheriting the test's
/// would make nextest report the child as a leak.
fn log_file(dir: &Path, name: &str) -> anyhow::Result<File> {
    Ok(File::options().create(true).append(true).open(dir.join(name))?)
}

/// The end of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Start `postgres` on `port` and wait until it accepts connections.
async fn start_server(
    bin: &Path,
    base: &Path,
    data: &Path,
    account: Account,
    port: u16,
) -> anyhow::Result<(Child, String)> {
    let log = base.join("postgres.log");
    let mut child = server_command(&bin.join("postgres"), account)
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(base)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"])
        .stdout(log_file(base, "postgres.log")?)
        .stderr(log_file(base, "postgres.log")?)
        .spawn()
        .context("spawn postgres")?;
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("postgres exited during startup ({status}):\n{}", log_tail(&log));
        }
        if let Ok(client) = connect(&url).await {
            if client.simple_query("SELECT 1").await.is_ok() {
                return Ok((child, url));
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("postgres not ready after {READY_TIMEOUT:?}:\n{}", log_tail(&log));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        let check = |url: &str, want: &str| assert_eq!(with_database(url, "t1").unwrap(), want, "{url}");
        check("postgres://postgres@127.0.0.1:5432/postgres", "postgres://postgres@127.0.0.1:5432/t1");
        check("postgres://u:p@h:1", "postgres://u:p@h:1/t1");
        check("postgres://u@h:1/db?sslmode=disable", "postgres://u@h:1/t1?sslmode=disable");
        check("postgresql://h?x=1", "postgresql://h/t1?x=1");
    }
}
