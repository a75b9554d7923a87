//! The fault schedule of `parley drill`: kill -9 and freeze nodes of the local cluster in turn,
//! measure how long the cluster takes to serve every shard again, and bring the node back.
//!
//! Faults run one at a time, each as a full cycle — kill, failover, restart after
//! `--restart-after-ms`, readiness; or SIGSTOP for longer than a lease, SIGCONT, readiness — so
//! at most one node is down at any moment and every failover has a survivor to be measured on.
//! A cycle that straddles the end of the sending phase is finished, never abandoned: the checks
//! afterwards need every node running.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use parley_storage::ShardStore;

use tokio::time::Instant;

use super::sim::Stats;
use super::{cluster_view, say};
use crate::client::Client;
use crate::launcher::{freeze as freeze_pid, signal, LocalCluster, READY_TIMEOUT};

/// Failover is sampled this often: fine enough for the millisecond figures of a local cluster,
/// coarse enough that the polling is not a load of its own.
const FAILOVER_POLL: Duration = Duration::from_millis(20);
/// Give up measuring a failover after this long (recorded as a timeout). Far beyond the lease
/// TTL, so it only triggers when takeover is broken.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// The operator's Postgres restart command must finish within this (a `pg_ctl restart -w` takes
/// about a second; a checkpoint of a large database can take longer).
const POSTGRES_RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the cluster may take to serve every shard once Postgres was restarted: it must notice
/// (a failed renew or commit), stop the shards it can no longer prove it owns, and re-acquire
/// them when the database answers. Far beyond a lease TTL, so it only trips when recovery is broken.
const POSTGRES_RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// When and how to fault.
pub struct FaultPlan {
    /// Time between faults; `None` = no faults.
    pub every: Option<Duration>,
    /// Every k-th fault is a freeze (0 = never).
    pub freeze_every: u32,
    pub restart_after: Duration,
    /// How long a frozen node stays stopped (its lease TTL plus a margin).
    pub freeze_for: Duration,
    /// Every k-th fault restarts Postgres with `postgres_restart_cmd` (0 = never).
    pub postgres_every: u32,
    pub postgres_restart_cmd: Option<String>,
    /// A shard store used to see the database answer again after a restart (needed only when
    /// `postgres_every` > 0).
    pub probe: Option<Arc<dyn ShardStore>>,
}

/// What the schedule did.
#[derive(Debug, Default)]
pub struct FaultLog {
    pub kills: u32,
    pub freezes: u32,
    /// One entry per kill: milliseconds until every shard was served by another node (the
    /// timeout's length if that never happened).
    pub failover_ms: Vec<u64>,
    pub failover_timeouts: u32,
    /// When each kill happened and which node it hit (for `parley bench`'s chart).
    pub killed: Vec<(Instant, String)>,
    pub freeze_takeover_ms: Vec<Option<u64>>,
    pub restarts_after_thaw: u32,
    pub postgres_restarts: u32,
    pub postgres_recovery_ms: Vec<u64>,
}

/// Run the schedule from `start` until `end`, finishing the cycle in progress.
pub async fn run(
    cluster: &mut LocalCluster,
    plan: &FaultPlan,
    start: Instant,
    end: Instant,
    stats: &Stats,
) -> anyhow::Result<FaultLog> {
    let mut log = FaultLog::default();
    let Some(every) = plan.every else {
        tokio::time::sleep_until(end).await;
        return Ok(log);
    };
    let mut k: u32 = 0;
    loop {
        // On the beat of the schedule; if a cycle overran it, at once.
        let at = (start + every * (k + 1)).max(Instant::now());
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        k += 1;
        let victim = (k as usize - 1) % cluster.nodes.len();
        stats.faults.fetch_add(1, Ordering::Relaxed);
        if plan.postgres_every > 0 && k.is_multiple_of(plan.postgres_every) {
            restart_postgres(cluster, plan, &mut log).await?;
        } else if plan.freeze_every > 0 && k.is_multiple_of(plan.freeze_every) {
            freeze(cluster, victim, plan, &mut log).await?;
        } else {
            kill(cluster, victim, plan, &mut log).await?;
        }
    }
    tokio::time::sleep_until(end).await;
    Ok(log)
}

/// Start any node that is not running (a cycle cut short by an error path, a node that died on
/// its own) and wait until every node is ready.
pub async fn ensure_all_running(cluster: &mut LocalCluster) -> anyhow::Result<()> {
    for i in 0..cluster.nodes.len() {
        if !cluster.nodes[i].is_running() {
            say(format!("{} is not running; starting it", cluster.nodes[i].name));
            cluster.spawn(i)?;
        }
        cluster.nodes[i].wait_ready(READY_TIMEOUT).await?;
    }
    Ok(())
}

async fn kill(cluster: &mut LocalCluster, victim: usize, plan: &FaultPlan, log: &mut FaultLog) -> anyhow::Result<()> {
    let name = cluster.nodes[victim].name.clone();
    let observer = cluster.nodes[(victim + 1) % cluster.nodes.len()].client();
    let killed_at = Instant::now();
    cluster.nodes[victim].kill9();
    log.kills += 1;
    log.killed.push((killed_at, name.clone()));
    let failover = served_without(&observer, &name, killed_at, killed_at + FAILOVER_TIMEOUT).await;
    match failover {
        Some(d) => {
            log.failover_ms.push(d.as_millis() as u64);
            say(format!("kill -9 {name}: every shard served again after {}ms", d.as_millis()));
        }
        None => {
            log.failover_ms.push(FAILOVER_TIMEOUT.as_millis() as u64);
            log.failover_timeouts += 1;
            say(format!("kill -9 {name}: shards still not served elsewhere after {FAILOVER_TIMEOUT:?}"));
        }
    }
    // The restart waits for the failover measurement: a node back too early would take its shards
    // back and the measurement would never end.
    tokio::time::sleep_until(killed_at + plan.restart_after).await;
    cluster.spawn(victim)?;
    cluster.nodes[victim].wait_ready(READY_TIMEOUT).await?;
    say(format!("{name} restarted and ready {}ms after the kill", killed_at.elapsed().as_millis()));
    Ok(())
}

async fn freeze(cluster: &mut LocalCluster, victim: usize, plan: &FaultPlan, log: &mut FaultLog) -> anyhow::Result<()> {
    let name = cluster.nodes[victim].name.clone();
    let Some(pid) = cluster.nodes[victim].pid() else {
        say(format!("{name} is not running; skipping its freeze"));
        return Ok(());
    };
    let observer = cluster.nodes[(victim + 1) % cluster.nodes.len()].client();
    let frozen_at = Instant::now();
    // Wait for the whole group stop, so that "frozen" means no thread of it runs any more.
    if !tokio::task::spawn_blocking(move || freeze_pid(pid, Duration::from_secs(5))).await.unwrap_or(false) {
        say(format!("{name}: not every thread reported stopped within 5s; freezing anyway"));
    }
    log.freezes += 1;
    // Nothing between SIGSTOP and SIGCONT may return early: a node left stopped would hang the
    // checks (and, through its flock and leases, the cluster).
    let takeover = served_without(&observer, &name, frozen_at, frozen_at + plan.freeze_for).await;
    tokio::time::sleep_until(frozen_at + plan.freeze_for).await;
    signal(pid, libc::SIGCONT);
    log.freeze_takeover_ms.push(takeover.map(|d| d.as_millis() as u64));
    say(format!(
        "froze {name} for {}ms; its shards served elsewhere after {}",
        plan.freeze_for.as_millis(),
        takeover.map_or("(not while frozen)".to_string(), |d| format!("{}ms", d.as_millis()))
    ));
    if let Err(e) = cluster.nodes[victim].wait_ready(READY_TIMEOUT).await {
        // A node may decide, on waking with stale leases, to exit; that is allowed (its
        // supervisor escalates) as long as nothing it held is lost. Bring it back.
        say(format!("{name} after thaw: {e:#}; starting it again"));
        log.restarts_after_thaw += 1;
        cluster.spawn(victim)?;
        cluster.nodes[victim].wait_ready(READY_TIMEOUT).await?;
    }
    Ok(())
}

/// Run the operator's restart command, then wait until the database answers and every node
/// serves every shard again; the time from the command's start is the recovery time.
async fn restart_postgres(cluster: &mut LocalCluster, plan: &FaultPlan, log: &mut FaultLog) -> anyhow::Result<()> {
    let Some(cmd) = plan.postgres_restart_cmd.as_deref() else {
        bail!("a Postgres restart is scheduled but no --postgres-restart-cmd was given");
    };
    let Some(probe) = plan.probe.as_ref() else {
        bail!("a Postgres restart is scheduled but there is no store to probe");
    };
    let started = Instant::now();
    let mut child = tokio::process::Command::new("sh");
    child.arg("-c").arg(cmd).stdin(std::process::Stdio::null()).kill_on_drop(true);
    // Whatever the command prints goes to stderr with the progress: stdout carries the report.
    if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        child.stdout(std::process::Stdio::from(fd));
    }
    match tokio::time::timeout(POSTGRES_RESTART_TIMEOUT, child.status()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => bail!("the Postgres restart command failed ({status}): {cmd}"),
        Ok(Err(e)) => bail!("running the Postgres restart command `{cmd}`: {e}"),
        Err(_) => bail!("the Postgres restart command did not finish within {POSTGRES_RESTART_TIMEOUT:?}: {cmd}"),
    }
    log.postgres_restarts += 1;
    let deadline = started + POSTGRES_RECOVERY_TIMEOUT;
    while probe.lease_info().await.is_err() {
        if Instant::now() >= deadline {
            bail!("Postgres did not answer within {POSTGRES_RECOVERY_TIMEOUT:?} of its restart");
        }
        tokio::time::sleep(FAILOVER_POLL).await;
    }
    let mut pending: Vec<Client> = cluster.nodes.iter().map(|n| n.client()).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for node in pending {
            if !all_served(&node, None).await {
                still.push(node);
            }
        }
        pending = still;
        if !pending.is_empty() {
            if Instant::now() >= deadline {
                bail!("shards not served again within {POSTGRES_RECOVERY_TIMEOUT:?} of a Postgres restart");
            }
            tokio::time::sleep(FAILOVER_POLL).await;
        }
    }
    let took = started.elapsed();
    log.postgres_recovery_ms.push(took.as_millis() as u64);
    say(format!("restarted Postgres: the database answers and every shard is served after {}ms", took.as_millis()));
    Ok(())
}

/// Whether `observer` sees every shard served (`healthy`), by a node other than `gone` if given.
async fn all_served(observer: &Client, gone: Option<&str>) -> bool {
    cluster_view(observer).await.is_ok_and(|view| {
        !view.shards.is_empty()
            && view.shards.iter().all(|s| s.status == "healthy" && s.owner.as_deref().is_some_and(|o| Some(o) != gone))
    })
}

/// Poll `observer` until every shard is served (`healthy`) by a node other than `gone`; the time
/// from `since` (the fault), or `None` if `deadline` passed first.
async fn served_without(observer: &Client, gone: &str, since: Instant, deadline: Instant) -> Option<Duration> {
    loop {
        if all_served(observer, Some(gone)).await {
            return Some(since.elapsed());
        }
        if Instant::now() + FAILOVER_POLL >= deadline {
            return None;
        }
        tokio::time::sleep(FAILOVER_POLL).await;
    }
}
