//! `parley drill`: a fault drill against a local cluster, and the judge of its outcome.
//!
//! It owns one run from start to verdict: start every `[[node]]` of `--config` as a child process
//! ([`crate::launcher`]), register simulated users over HTTP, run their clients ([`sim`]: 1:1
//! conversations, acked sends with client message ids, reconnect and resend) while a schedule
//! kills nodes with SIGKILL and freezes them with SIGSTOP past their lease ([`faults`]), then
//! check what the clients were promised against what the cluster stored and delivered
//! ([`verify`]) and report it: one progress line per second and a summary on stderr, and with
//! `--json` one JSON object on stdout. An invariant that fails makes the command fail.
//!
//! The drill talks to the nodes the way any client does (HTTP, WebSocket, `/v1/cluster`), plus two
//! read-only audits through the store itself: the lease rows and the epoch every message was
//! written under. With a Postgres store, every K-th fault can restart Postgres instead of a node,
//! through a command the operator supplies (the drill does not own the database server).

pub(crate) mod faults;
pub(crate) mod sim;
mod verify;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures_util::stream::{self, StreamExt as _};
use parley_protocol::http::{ShardView, TokenResponse};
use parley_protocol::{ConversationId, ErrorCode};
use serde::Deserialize;
use tokio::time::Instant;

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::launcher::LocalCluster;

/// Options of `parley drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Cluster configuration whose nodes the drill starts.
    #[arg(long, default_value = "cluster.toml")]
    pub config: PathBuf,
    /// Simulated clients (one user each), paired into clients/2 conversations. Must be even.
    #[arg(long, default_value_t = 100)]
    pub clients: u32,
    /// Messages per second each client sends (it waits for each ack before the next send).
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// How long clients keep sending; in-flight resends then get a grace period.
    #[arg(long, default_value_t = 60)]
    pub duration_secs: u64,
    /// A fault every this many seconds, rotating over the nodes (0 = no faults).
    #[arg(long, default_value_t = 10)]
    pub kill_every_secs: u64,
    /// Every K-th fault freezes the node (SIGSTOP past its lease, then SIGCONT) instead of
    /// killing it (0 = never freeze).
    #[arg(long, default_value_t = 0)]
    pub freeze_every: u32,
    /// Every K-th fault restarts Postgres instead of a node (0 = never). Needs a Postgres store
    /// and `--postgres-restart-cmd`.
    #[arg(long, default_value_t = 0)]
    pub postgres_every: u32,
    /// Shell command (run with `sh -c`) that restarts the Postgres the cluster uses, for example
    /// `pg_ctl restart -m fast -w -D /var/lib/postgresql/data`. It may return before Postgres is
    /// back: recovery is measured until the database answers and every shard is served.
    #[arg(long)]
    pub postgres_restart_cmd: Option<String>,
    /// How long a killed node stays down before it is started again.
    #[arg(long, default_value_t = 2_000)]
    pub restart_after_ms: u64,
    /// Where the nodes' logs go (one file per node start).
    #[arg(long, default_value = "data/drill-logs")]
    pub log_dir: PathBuf,
    /// Print the report as one JSON object on stdout (progress and summary stay on stderr).
    #[arg(long)]
    pub json: bool,
}

/// More clients than this would run into the nodes' connection limits and the drill process's own
/// open files (one socket each, plus HTTP) before telling anything about the cluster.
const MAX_CLIENTS: u32 = 10_000;
/// Above this a client's send loop is limited by ack latency rather than by its rate, and the
/// drill turns into a benchmark.
const MAX_RATE: f64 = 50.0;
/// A day: long soak runs are fine, unbounded ones are not.
const MAX_DURATION_SECS: u64 = 24 * 3600;
/// How long clients may keep resending their last unacked message after sending stops. Covers a
/// fault cycle that straddles the end (failover, restart, readiness) with room to spare.
const FINAL_GRACE: Duration = Duration::from_secs(20);
/// How far past a node's lease (and two renew intervals, the survivors' acquisition ticks) a
/// freeze lasts, so that its shards are certainly taken over while it is stopped and it wakes up
/// holding leases that are no longer its own. Measured: lease + 1.5 s was not always enough on a
/// loaded 2-core machine.
const FREEZE_PAST_LEASE: Duration = Duration::from_millis(1_500);
/// Registrations at once: each costs an argon2 hash on the node, so more only queue up there.
const REGISTER_CONCURRENCY: usize = 8;
/// Attempts per registration; the cluster is healthy then, so a few cover a slow start.
const REGISTER_ATTEMPTS: u32 = 5;
/// Final reconnect syncs and history fetches at once: enough to finish quickly, few enough not
/// to look like a load test.
const CHECK_CONCURRENCY: usize = 16;
/// A status request to a node; a frozen node never answers, and polls must not hang on it.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Password of every simulated user (meets the 8-byte minimum).
const PASSWORD: &str = "drill-password";

/// What `GET /v1/cluster` says, as far as the drill needs it.
#[derive(Clone, Debug, Deserialize)]
struct ClusterView {
    node: String,
    boot_id: String,
    shards: Vec<ShardView>,
    #[serde(default)]
    redirects: u64,
}

/// One registered simulated user (`parley bench` registers its users the same way).
pub(crate) struct DrillUser {
    pub(crate) token: String,
    pub(crate) user: parley_protocol::UserId,
    pub(crate) device: String,
}

/// Run `parley drill`.
pub async fn run(args: DrillArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    let config = Config::load(&args.config).with_context(|| format!("loading {}", args.config.display()))?;
    if config.nodes.len() < 2 && args.kill_every_secs > 0 {
        bail!("faults need at least two nodes (a survivor to fail over to); the config has {}", config.nodes.len());
    }
    let layout = crate::store_layout(&config)?;
    if args.postgres_every > 0 && !matches!(layout.home, parley_storage::StoreConfig::Postgres { .. }) {
        bail!("--postgres-every needs a Postgres store (storage.kind = \"postgres\")");
    }
    let store_kind = crate::store_summary(&layout);
    // PARLEY_DATABASE_URL and any other PARLEY_* setting reach the children by inheritance; only
    // a missing cookie is made up here, handed over through the environment like `parley up` does.
    let mut env = Vec::new();
    if config.cluster.cookie.is_none() {
        env.push(("PARLEY_COOKIE".to_string(), crate::launcher::random_cookie()));
    }
    let mut cluster = LocalCluster::new(&args.config, &config, &args.log_dir, env)?;
    say(format!(
        "starting {} nodes ({store_kind} store, {} shards); logs in {}",
        cluster.nodes.len(),
        config.cluster.shard_count,
        args.log_dir.display()
    ));
    cluster.start_all().await?;
    let nodes: Vec<Client> = cluster.nodes.iter().map(|n| n.client()).collect();

    let users = register_all(&nodes, args.clients as usize).await?;
    say(format!("registered {} users; sending for {}s", users.len(), args.duration_secs));

    let stats = Arc::new(sim::Stats::default());
    let started = Instant::now();
    let stop_sending_at = started + Duration::from_secs(args.duration_secs);
    let give_up_at = stop_sending_at + FINAL_GRACE;
    let clients: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let spec = sim::SimSpec {
                index: i,
                user: u.user,
                token: u.token.clone(),
                partner: users[i ^ 1].user,
                device: u.device.clone(),
                nodes: nodes.clone(),
                first_node: i % nodes.len(),
                interval: Duration::from_secs_f64(1.0 / args.rate),
                stop_sending_at,
                give_up_at,
                stats: stats.clone(),
            };
            tokio::spawn(sim::run(spec))
        })
        .collect();
    let progress = tokio::spawn(progress(stats.clone(), started));

    // Opened before the faults: the Postgres restart polls it to see the database answer again,
    // and the audits read lease rows and epochs through it afterwards.
    let stores = parley_storage::open_layout(&layout).await.context("opening the stores for the audit")?;
    let shard_stores = verify::open_shards(&stores, config.cluster.shard_count).await?;
    let plan = faults::FaultPlan {
        every: (args.kill_every_secs > 0).then(|| Duration::from_secs(args.kill_every_secs)),
        freeze_every: args.freeze_every,
        postgres_every: args.postgres_every,
        postgres_restart_cmd: args.postgres_restart_cmd.clone(),
        probe: Some(shard_stores[0].clone()),
        restart_after: Duration::from_millis(args.restart_after_ms),
        freeze_for: Duration::from_millis(config.cluster.lease_ttl_ms + 2 * config.cluster.renew_interval_ms)
            + FREEZE_PAST_LEASE,
    };
    let fault_log = faults::run(&mut cluster, &plan, started, stop_sending_at, &stats).await?;
    faults::ensure_all_running(&mut cluster).await?;

    let mut outcomes = Vec::with_capacity(clients.len());
    for handle in clients {
        outcomes.push(handle.await.context("a simulated client panicked")?);
    }
    // From the first send to the last client's last ack (not to the end of a fault cycle that
    // overran the sending phase).
    let send_phase = outcomes.iter().map(|o| o.finished_at).max().unwrap_or(stop_sending_at) - started;
    progress.abort();
    say(format!(
        "sending stopped after {:.1}s: {} acked, {} unacked; checking",
        send_phase.as_secs_f64(),
        stats.acked.load(Ordering::Relaxed),
        outcomes.iter().map(|o| o.unacked).sum::<u64>()
    ));

    // Delivery: every recipient reconnects with its own device and collects the reconnect sync.
    let sync_failures = stream::iter(outcomes.iter_mut())
        .map(|o| {
            let nodes = &nodes;
            async move { sim::final_sync(nodes, o).await }
        })
        .buffer_unordered(CHECK_CONCURRENCY)
        .filter(|ok| std::future::ready(!ok))
        .count()
        .await;

    let (views, settled, ownership) =
        verify::audit_ownership(&nodes, &shard_stores, config.cluster.shard_count).await?;
    if !settled {
        say("the cluster did not settle on one owner per shard; the last view was checked".to_string());
    }

    let conversations: Vec<verify::Conversation> = outcomes
        .chunks(2)
        .filter_map(|pair| match pair {
            [a, b] => Some(verify::Conversation { id: ConversationId::direct(a.user, b.user), members: [a, b] }),
            _ => None,
        })
        .collect();
    let messages = verify::messages(&nodes, &conversations).await;
    let stale_epoch_writes = verify::stale_epochs(&shard_stores, &conversations).await?;

    let report = Report {
        clients: args.clients,
        conversations: conversations.len(),
        nodes: cluster.nodes.len(),
        store: store_kind,
        duration_s: (send_phase.as_secs_f64() * 10.0).round() / 10.0,
        rate: args.rate,
        acked: stats.acked.load(Ordering::Relaxed),
        unacked: outcomes.iter().map(|o| o.unacked).sum(),
        refused: outcomes.iter().map(|o| o.refused).sum(),
        resends: stats.resends.load(Ordering::Relaxed),
        acked_lost: messages.acked_lost,
        duplicates: messages.duplicates,
        order_violations: messages.order_violations,
        undelivered: messages.undelivered,
        unverified_conversations: messages.unverified + sync_failures as u64,
        stale_epoch_writes,
        max_owners_per_shard: ownership.max_owners_per_shard,
        unowned_shards: ownership.unowned_shards,
        lease_mismatches: ownership.lease_mismatches,
        settled,
        kills: fault_log.kills,
        freezes: fault_log.freezes,
        failover_ms: fault_log.failover_ms,
        failover_timeouts: fault_log.failover_timeouts,
        freeze_takeover_ms: fault_log.freeze_takeover_ms,
        postgres_restarts: fault_log.postgres_restarts,
        postgres_recovery_ms: fault_log.postgres_recovery_ms,
        restarts_after_thaw: fault_log.restarts_after_thaw,
        redirected: views.iter().map(|v| v.redirects).sum::<u64>() + stats.unavailable.load(Ordering::Relaxed),
        max_client_gap_ms: outcomes.iter().map(|o| o.max_gap.as_millis() as u64).max().unwrap_or(0),
        log_dir: args.log_dir.display().to_string(),
        failures: Vec::new(),
    }
    .judged();

    say("stopping the cluster".to_string());
    cluster.stop_all().await;
    eprintln!("{}", report.summary());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if !report.failures.is_empty() {
        bail!("drill failed: {}", report.failures.join("; "));
    }
    Ok(())
}

fn check_args(args: &DrillArgs) -> anyhow::Result<()> {
    if args.clients < 2 || args.clients > MAX_CLIENTS || !args.clients.is_multiple_of(2) {
        bail!("--clients must be an even number in 2..={MAX_CLIENTS} (clients are paired into conversations)");
    }
    if !(args.rate > 0.0 && args.rate <= MAX_RATE) {
        bail!("--rate must be in (0, {MAX_RATE}] messages per second");
    }
    if args.postgres_every > 0 && args.postgres_restart_cmd.as_deref().is_none_or(|c| c.trim().is_empty()) {
        bail!("--postgres-every needs --postgres-restart-cmd (the drill does not own the database server)");
    }
    if args.duration_secs == 0 || args.duration_secs > MAX_DURATION_SECS {
        bail!("--duration-secs must be in 1..={MAX_DURATION_SECS}");
    }
    Ok(())
}

/// Everything the drill found. Invariant fields must be 0 (`max_owners_per_shard` at most 1).
#[derive(Debug, serde::Serialize)]
struct Report {
    clients: u32,
    conversations: usize,
    nodes: usize,
    store: String,
    /// Length of the sending phase including the last resends, seconds.
    duration_s: f64,
    rate: f64,
    acked: u64,
    /// Messages still not acked when the grace period ended (not an invariant: never promised).
    unacked: u64,
    /// Sends refused with a non-retryable error.
    refused: u64,
    resends: u64,
    acked_lost: u64,
    duplicates: u64,
    order_violations: u64,
    undelivered: u64,
    /// Conversation histories and devices' final syncs that could not be read: nothing was proven
    /// for those conversations.
    unverified_conversations: u64,
    stale_epoch_writes: u64,
    max_owners_per_shard: u32,
    unowned_shards: u32,
    /// Shards whose lease row does not name the boot of the node serving them.
    lease_mismatches: u32,
    /// Whether the nodes agreed on one live owner per shard before the checks.
    settled: bool,
    kills: u32,
    freezes: u32,
    failover_ms: Vec<u64>,
    failover_timeouts: u32,
    /// Per freeze: how long until the frozen node's shards were served elsewhere (null: not
    /// while it was frozen).
    freeze_takeover_ms: Vec<Option<u64>>,
    postgres_restarts: u32,
    /// Per Postgres restart: from running the command until the database answered again and
    /// every shard was served.
    postgres_recovery_ms: Vec<u64>,
    /// Frozen nodes that had exited when thawed and were started again.
    restarts_after_thaw: u32,
    /// Requests the nodes forwarded elsewhere plus client resends caused by `unavailable`.
    redirected: u64,
    max_client_gap_ms: u64,
    log_dir: String,
    /// One sentence per failed invariant; empty = the drill passed.
    failures: Vec<String>,
}

impl Report {
    /// Fill `failures` from the invariant fields.
    fn judged(mut self) -> Report {
        let counts = [
            ("acked_lost", self.acked_lost, "acked messages missing from history"),
            ("duplicates", self.duplicates, "messages stored more than once or with another seq than acked"),
            (
                "order_violations",
                self.order_violations,
                "gaps in a conversation's seqs or a sender's acks out of order",
            ),
            ("undelivered", self.undelivered, "acked messages their recipient never received"),
            ("stale_epoch_writes", self.stale_epoch_writes, "messages written under an older lease epoch"),
            ("unverified_conversations", self.unverified_conversations, "conversations that could not be checked"),
        ];
        for (key, n, what) in counts {
            if n > 0 {
                self.failures.push(format!("{key} = {n} ({what})"));
            }
        }
        if self.max_owners_per_shard > 1 {
            self.failures.push(format!(
                "max_owners_per_shard = {} (a shard served by several nodes)",
                self.max_owners_per_shard
            ));
        }
        if self.lease_mismatches > 0 {
            self.failures.push(format!(
                "lease_mismatches = {} (lease rows not held by the serving node)",
                self.lease_mismatches
            ));
        }
        self
    }

    fn summary(&self) -> String {
        let list = |items: Vec<String>| if items.is_empty() { "-".to_string() } else { items.join(" ") };
        let failover = list(self.failover_ms.iter().map(|m| format!("{m}ms")).collect());
        let takeover = list(
            self.freeze_takeover_ms
                .iter()
                .map(|m| m.map_or("not-while-frozen".to_string(), |m| format!("{m}ms")))
                .collect(),
        );
        let verdict =
            if self.failures.is_empty() { "PASS".to_string() } else { format!("FAIL: {}", self.failures.join("; ")) };
        format!(
            "\n== parley drill: {} clients, {} conversations, {} nodes ({} store), {:.1}s at {}/s per client ==\n\
             messages   acked {}  unacked {}  refused {}  resends {}  redirected {}  max client gap {}ms\n\
             faults     kills {}  freezes {}  failover {}  (timeouts {})  freeze takeover {}\n\
             postgres   restarts {}  recovery {}\n\
             invariants acked_lost {}  duplicates {}  order_violations {}  undelivered {}  stale_epoch_writes {}\n\
             ownership  max owners per shard {}  unowned {}  lease mismatches {}  settled {}\n\
             logs       {}\n\
             verdict    {}",
            self.clients,
            self.conversations,
            self.nodes,
            self.store,
            self.duration_s,
            self.rate,
            self.acked,
            self.unacked,
            self.refused,
            self.resends,
            self.redirected,
            self.max_client_gap_ms,
            self.kills,
            self.freezes,
            failover,
            self.failover_timeouts,
            takeover,
            self.postgres_restarts,
            list(self.postgres_recovery_ms.iter().map(|m| format!("{m}ms")).collect()),
            self.acked_lost,
            self.duplicates,
            self.order_violations,
            self.undelivered,
            self.stale_epoch_writes,
            self.max_owners_per_shard,
            self.unowned_shards,
            self.lease_mismatches,
            self.settled,
            self.log_dir,
            verdict,
        )
    }
}

/// A line on stderr (stdout is reserved for the `--json` report).
fn say(line: String) {
    eprintln!("[drill] {line}");
}

/// One progress line per second until aborted.
async fn progress(stats: Arc<sim::Stats>, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        eprintln!(
            "[drill {:>5.0}s] acked {:>7}  resends {:>5}  unavailable {:>5}  faults {}",
            started.elapsed().as_secs_f64(),
            stats.acked.load(Ordering::Relaxed),
            stats.resends.load(Ordering::Relaxed),
            stats.unavailable.load(Ordering::Relaxed),
            stats.faults.load(Ordering::Relaxed),
        );
    }
}

/// Register `count` users with names unique to this run, spread over the nodes.
pub(crate) async fn register_all(nodes: &[Client], count: usize) -> anyhow::Result<Vec<DrillUser>> {
    // Usernames: "d" + 8 hex + "-" + index stays far under the 32-character limit.
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let results: Vec<anyhow::Result<(usize, DrillUser)>> = stream::iter(0..count)
        .map(|i| {
            let node = nodes[i % nodes.len()].clone();
            let name = format!("d{run_id}-{i}");
            async move {
                let t = register_one(&node, &name).await?;
                Ok((i, DrillUser { token: t.token, user: t.user_id, device: format!("drill-{name}") }))
            }
        })
        .buffer_unordered(REGISTER_CONCURRENCY)
        .collect()
        .await;
    let mut users: Vec<(usize, DrillUser)> = results.into_iter().collect::<anyhow::Result<_>>()?;
    users.sort_by_key(|(i, _)| *i);
    Ok(users.into_iter().map(|(_, u)| u).collect())
}

/// Register, retrying transient failures; a retry that finds the name taken means the first
/// attempt succeeded without us seeing the answer, so log in instead.
async fn register_one(node: &Client, name: &str) -> anyhow::Result<TokenResponse> {
    let mut last = None;
    for attempt in 0..REGISTER_ATTEMPTS {
        let result = match node.register(name, PASSWORD).await {
            Err(e) if attempt > 0 && e.code() == Some(ErrorCode::UsernameTaken) => node.login(name, PASSWORD).await,
            other => other,
        };
        match result {
            Ok(t) => return Ok(t),
            Err(e @ ClientError::Server { code, .. }) if !code.retryable() => {
                return Err(e).with_context(|| format!("registering {name} at {}", node.base()))
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200u64 << attempt)).await;
    }
    Err(anyhow::anyhow!("registering {name} at {}: {last:?}", node.base()))
}

/// A node's `/v1/cluster`, bounded by [`STATUS_TIMEOUT`].
async fn cluster_view(node: &Client) -> anyhow::Result<ClusterView> {
    match tokio::time::timeout(STATUS_TIMEOUT, node.raw("GET", "/v1/cluster", None, None)).await {
        Err(_) => bail!("{}: /v1/cluster timed out", node.base()),
        Ok(Err(e)) => bail!("{}: {e}", node.base()),
        Ok(Ok((200, body))) => Ok(serde_json::from_value(body)?),
        Ok(Ok((status, body))) => bail!("{}: HTTP {status}: {body}", node.base()),
    }
}
