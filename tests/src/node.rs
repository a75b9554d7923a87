//! Real `parley` node processes for tests: [`NodeProcess::start`] writes a config, spawns the
//! binary on free loopback ports, and waits for `/readyz`. Processes die with the test (killed on
//! drop, and by the kernel through `PR_SET_PDEATHSIG` if the test process dies first); their output
//! goes to a log file (never the test's stdout, which nextest would report as a leak).

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use parley_node::client::Client;

use crate::{free_port, TempDir};

/// How long a node may take from spawn to `/readyz` = 200. Startup opens every shard's store and
/// takes its lease: about 1-3 s on an idle machine; the margin is for a loaded CI box.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Which store a test node uses.
#[derive(Clone, Debug)]
pub enum Storage {
    /// SQLite files in this directory (shared by nodes given the same one).
    Embedded(PathBuf),
    /// Postgres database URL.
    Postgres(String),
}

/// How to start a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub name: String,
    pub storage: Storage,
    /// Few shards keep startup fast; behaviour does not depend on the count.
    pub shard_count: u16,
    pub lease_ttl_ms: u64,
    /// Extra TOML appended to the generated config (e.g. a `[limits]` table).
    pub extra_toml: String,
    /// The node entry's `advertise_http`, if any.
    pub advertise_http: Option<String>,
}

impl NodeOptions {
    pub fn new(name: &str, storage: Storage) -> Self {
        NodeOptions {
            name: name.into(),
            storage,
            shard_count: 8,
            lease_ttl_ms: 3_000,
            extra_toml: String::new(),
            advertise_http: None,
        }
    }
}

/// The `parley` binary next to the test executable (`target/<profile>/parley`), or `PARLEY_BIN`.
pub fn parley_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("PARLEY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable has no profile dir")?;
    let bin = profile_dir.join("parley");
    if !bin.exists() {
        bail!("{} not found: build it first (`cargo build --bins`)", bin.display());
    }
    Ok(bin)
}

/// Spawn `cmd` so that it dies with the test process.
pub fn spawn_tied(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    parley_node::launcher::die_with_parent(cmd);
    Ok(cmd.spawn()?)
}

/// One running (or stopped) node process.
pub struct NodeProcess {
    pub options: NodeOptions,
    pub http: SocketAddr,
    child: Option<Child>,
    dir: TempDir,
    config: PathBuf,
    starts: u32,
}

impl NodeProcess {
    /// Write the config, spawn the node, wait until it is ready.
    pub async fn start(options: NodeOptions) -> anyhow::Result<NodeProcess> {
        let dir = TempDir::new(&format!("parley-node-{}", options.name));
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let cluster_port = free_port();
        let (storage_toml, _) = match &options.storage {
            Storage::Embedded(path) => (format!("kind = \"embedded\"\ndir = \"{}\"\n", path.display()), ()),
            Storage::Postgres(_) => ("kind = \"postgres\"\npool_size = 4\n".to_string(), ()),
        };
        let text = format!(
            "[cluster]\nshard_count = {}\nlease_ttl_ms = {}\nrenew_interval_ms = {}\n\n[storage]\n{}\n{}\n\n[[node]]\nname = \"{}\"\nhttp = \"{}\"\ncluster = \"127.0.0.1:{}\"\n",
            options.shard_count,
            options.lease_ttl_ms,
            (options.lease_ttl_ms / 3).max(1),
            storage_toml,
            options.extra_toml,
            options.name,
            http,
            cluster_port,
        );
        let mut text = text;
        if let Some(advertised) = &options.advertise_http {
            text.push_str(&format!("advertise_http = \"{advertised}\"\n"));
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, text)?;
        let mut node = NodeProcess { options, http, child: None, dir, config, starts: 0 };
        node.spawn()?;
        node.wait_ready().await?;
        Ok(node)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = self.log_path();
        let mut cmd = Command::new(parley_bin()?);
        cmd.args(["node", "--config"]).arg(&self.config).args(["--name", &self.options.name]);
        cmd.env("RUST_LOG", "info,parley_node=debug").env_remove("PARLEY_DATABASE_URL").env_remove("PARLEY_STORAGE");
        cmd.env("PARLEY_UI_DIR", crate::ui_dir());
        if let Storage::Postgres(url) = &self.options.storage {
            cmd.env("PARLEY_DATABASE_URL", url);
        }
        cmd.current_dir(self.dir.path());
        self.child = Some(spawn_tied(&mut cmd, &log)?);
        Ok(())
    }

    /// The config file the node runs with (a test may edit it before a restart).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The log of the current (latest) start.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("node-{}.log", self.starts))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn client(&self) -> Client {
        Client::new(self.base_url())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Poll `/readyz` until every shard is routed.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("node {} exited during startup ({status}); log:\n{}", self.options.name, self.log());
                }
            }
            if let Ok((200, _)) = client.raw("GET", "/readyz", None, None).await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("node {} not ready after {READY_TIMEOUT:?}; log:\n{}", self.options.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no drain, no lease release — a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit (graceful drain), at most `timeout`.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("node not running")?;
        signal(child.id(), libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                bail!("node did not exit within {timeout:?} of SIGTERM; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start the same node again (same name, ports and store) and wait until ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()?;
        self.wait_ready().await
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub use parley_node::launcher::{freeze, signal};

/// Run a `parley` subcommand that prints one JSON report on stdout (`drill`, `bench`) and wait
/// for it, at most `timeout`. Its stdout and stderr go to `<dir>/<name>.out` and `.err` (where a
/// failing test finds the evidence); the `PARLEY_*` environment of the test run is removed so the
/// command uses the store its own config names. While it runs, `pg` (if given) is restarted
/// whenever the command's restart command stops it. Returns the exit status and the report (the
/// last stdout line that is a JSON object), or why there is none.
pub async fn run_json_report(
    mut cmd: Command,
    dir: &Path,
    name: &str,
    timeout: Duration,
    mut pg: Option<&mut crate::postgres::TestPostgres>,
) -> Result<(ExitStatus, serde_json::Value), String> {
    let stdout_path = dir.join(format!("{name}.out"));
    let stderr_path = dir.join(format!("{name}.err"));
    for (key, _) in std::env::vars() {
        if key.starts_with("PARLEY_") && key != "PARLEY_BIN" {
            cmd.env_remove(key);
        }
    }
    let file = |p: &Path| File::create(p).map_err(|e| format!("create {}: {e}", p.display()));
    cmd.stdin(Stdio::null()).stdout(file(&stdout_path)?).stderr(file(&stderr_path)?);
    parley_node::launcher::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| format!("spawn parley {name}: {e}"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait for {name}: {e}"))? {
            break status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{name} still running after {timeout:?}"));
        }
        if let Some(pg) = pg.as_deref_mut() {
            pg.revive_if_exited().await.map_err(|e| format!("restarting postgres: {e:#}"))?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    // The last line that is a JSON object, in case a log line ever lands on stdout too.
    let report =
        stdout.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok().filter(|v| v.is_object()));
    report.map(|r| (status, r)).ok_or_else(|| format!("no JSON report on stdout (exit {status})"))
}
