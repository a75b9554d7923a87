//! Local clusters of `parley node` child processes, for `parley up`, `parley drill` and the tests.
//!
//! Children die with their launcher (`PR_SET_PDEATHSIG`), write to their own log files, and are
//! controlled by plain signals by PID: SIGKILL (crash), SIGSTOP/SIGCONT (freeze), SIGTERM (drain).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::client::Client;
use crate::config::Config;

/// How long a node may take from spawn to `/readyz` = 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Ask the kernel to SIGKILL the child when the spawning thread exits, so that no node outlives
/// the launcher (or a test killed by a timeout).
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent;
    // it is the only call made between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Send `sig` to a process this launcher started.
pub fn signal(pid: u32, sig: i32) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the pid of a child we spawned; no memory is involved.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// SIGSTOP a process we started and wait until every one of its threads has stopped.
///
/// kill(2) only queues the signal: one thread dequeues it and then stops the others, so for a
/// while another thread can still read a socket and commit a write. A test or drill that must
/// know "from here on the process does nothing" waits for the whole group stop; returns whether
/// it was seen within `timeout` (it is not when the process has already exited).
pub fn freeze(pid: u32, timeout: Duration) -> bool {
    signal(pid, libc::SIGSTOP);
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if all_threads_stopped(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Whether every thread of `pid` is in state `T` (stopped by a signal), from /proc/<pid>/task.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { return false };
        // The state follows the last ')' (the command name may itself contain parentheses).
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
        if state != Some('T') {
            return false;
        }
        any = true;
    }
    any
}

/// One node process of a local cluster.
pub struct LocalNode {
    pub name: String,
    pub http: std::net::SocketAddr,
    child: Option<Child>,
    log_dir: PathBuf,
    starts: u32,
    /// Extra `parley node` arguments and environment (a node that joins through seeds).
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
}

/// A local cluster: one child process per `[[node]]` of a config file.
pub struct LocalCluster {
    pub nodes: Vec<LocalNode>,
    bin: PathBuf,
    config_path: PathBuf,
    env: Vec<(String, String)>,
}

impl LocalNode {
    pub fn client(&self) -> Client {
        Client::new(format!("http://{}", self.http))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_dir.join(format!("{}-{}.log", self.name, self.starts))
    }

    /// The last lines of this start's log. Quoted in startup errors because the log directory is
    /// often temporary (a test's) and gone by the time anyone reads the error.
    fn log_tail(&self) -> String {
        const LINES: usize = 15;
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LINES)..].join("\n")
    }

    /// Crash it: SIGKILL, no drain.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Graceful stop: SIGTERM, wait up to `timeout`, then SIGKILL.
    pub async fn stop(&mut self, timeout: Duration) {
        let Some(mut c) = self.child.take() else { return };
        signal(c.id(), libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "node {} exited ({status}); {}, ending:\n{}",
                        self.name,
                        self.log_path().display(),
                        self.log_tail()
                    );
                }
            }
            if let Ok((200, _)) = client.raw("GET", "/readyz", None, None).await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("node {} not ready after {timeout:?}; see {}", self.name, self.log_path().display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl LocalCluster {
    /// Prepare (not start) one process per node of `config_path`. `env` is added to each child's
    /// environment (e.g. the cookie, `PARLEY_DATABASE_URL`).
    pub fn new(
        config_path: &Path,
        config: &Config,
        log_dir: &Path,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(log_dir)?;
        let bin = std::env::var_os("PARLEY_BIN").map(PathBuf::from).map_or_else(std::env::current_exe, Ok)?;
        let nodes = config
            .nodes
            .iter()
            .map(|n| LocalNode {
                name: n.name.clone(),
                http: n.http,
                child: None,
                log_dir: log_dir.to_path_buf(),
                starts: 0,
                extra_args: Vec::new(),
                extra_env: Vec::new(),
            })
            .collect();
        Ok(LocalCluster { nodes, bin, config_path: config_path.to_path_buf(), env })
    }

    /// Spawn node `i` (again).
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        node.kill9();
        node.starts += 1;
        let log = File::create(node.log_path()).with_context(|| format!("creating {}", node.log_path().display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("node").arg("--config").arg(&self.config_path).args(["--name", &node.name]);
        cmd.args(&node.extra_args);
        cmd.envs(self.env.iter().chain(&node.extra_env).map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        die_with_parent(&mut cmd);
        node.child = Some(cmd.spawn().with_context(|| format!("spawning {}", self.bin.display()))?);
        Ok(())
    }

    /// Add (not start) a node the config does not list, which joins through `seeds`; returns its
    /// index. Used to show that membership is not limited to the config file.
    pub fn add_joiner(
        &mut self,
        name: &str,
        http: std::net::SocketAddr,
        cluster: std::net::SocketAddr,
        seeds: &[String],
    ) -> usize {
        let log_dir = self.nodes.first().map_or_else(|| PathBuf::from("."), |n| n.log_dir.clone());
        self.nodes.push(LocalNode {
            name: name.to_string(),
            http,
            child: None,
            log_dir,
            starts: 0,
            extra_args: vec!["--http".into(), http.to_string(), "--cluster".into(), cluster.to_string()],
            extra_env: vec![("PARLEY_SEEDS".into(), seeds.join(","))],
        });
        self.nodes.len() - 1
    }

    /// Spawn every node and wait until all are ready.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        for node in &mut self.nodes {
            node.wait_ready(READY_TIMEOUT).await?;
        }
        Ok(())
    }

    /// The value of a variable this launcher passes to its children.
    pub fn env_value(&self, name: &str) -> Option<String> {
        self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    pub async fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.stop(Duration::from_secs(20)).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill9();
        }
    }
}

/// A random cookie for a cluster whose operator gave none (`parley up`): 32 random bytes, hex.
pub fn random_cookie() -> String {
    (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}
