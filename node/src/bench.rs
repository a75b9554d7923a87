//! `parley bench`: the benchmark of a real local cluster, driven over real WebSockets from
//! separate load processes, and its report.
//!
//! The coordinator (this module) owns one run: it describes the machine ([`machine`]), seeds a
//! long conversation through the storage crate ([`seed`]), starts every node of a generated
//! cluster config as a child process ([`crate::launcher`]), registers users over HTTP, and then
//! runs the selected scenarios one after the other, each bounded in time:
//!
//! - `sessions` — idle authenticated sessions per node (RSS per session, connect rate);
//! - `relay` — the bare relay ([`relay`], `parley relay`) under the same closed loop as `durable`,
//!   measured right before it: the ceiling Parley is compared with;
//! - `durable` — closed loop: N clients with W messages in flight each; max msg/s and latency;
//! - `open` — open loop at fixed rates: send→ack and send→deliver percentiles, CPU per message;
//! - `group` — group fan-out: one group of `--group-members` members, a few of them sending into
//!   it at fixed rates; deliveries per second and send→deliver percentiles over every member;
//! - `failover` — open loop while nodes are killed with SIGKILL in turn (the drill's fault cycle,
//!   [`crate::drill::faults`]): time until every shard is served again, longest client gap;
//! - `history` — page reads of the seeded conversation;
//! - `media` — photo uploads with and without the thumbnail the server makes ([`media`]).
//!
//! Load comes from `parley bench-load` children ([`load`]), each with its share of the clients and
//! a source address of its own (127.0.0.x), so no process nears its open-file limit. They report
//! counters and HdrHistograms ([`spec`]), merged here. Progress goes to stderr; the table to stdout (stderr with
//! `--json`, which prints one JSON object on stdout); a latency-over-time SVG ([`plot`]) is written
//! next to the run's logs or where `--plot` says.

mod load;
mod machine;
mod media;
mod plot;
mod relay;
mod seed;
mod spec;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use parley_storage::StoreConfig;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

pub use load::{run_blocking as run_load_blocking, LoadArgs};
pub use relay::{run_blocking as run_relay_blocking, RelayArgs};

use crate::client::Client;
use crate::launcher::LocalCluster;
use machine::{Machine, Snapshot};
use spec::{
    decode_hist, merge_hist, new_hist, ClientSpec, HistorySpec, LoadSpec, Ready, SessionsSpec, TrafficSpec, Work,
    WorkerLine, WorkerResult,
};

/// Options of `parley bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run, comma-separated: relay, durable, open, sessions, group, failover, history.
    #[arg(long, default_value = "relay,durable,open,sessions,group,failover,history")]
    pub scenarios: String,
    /// Nodes of the bench cluster (generated config; all on this host).
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Shards of the bench cluster.
    #[arg(long, default_value_t = 64)]
    pub shards: u16,
    /// Run against Postgres at this URL (a fresh database is best) instead of the embedded store.
    #[arg(long, env = "PARLEY_BENCH_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// Postgres connections per node.
    #[arg(long, default_value_t = 16)]
    pub pool_size: usize,
    /// Postgres group commits each node keeps in flight (`storage.commit_slots`).
    #[arg(long, default_value_t = parley_storage::DEFAULT_COMMIT_SLOTS)]
    pub commit_slots: usize,
    /// Traffic clients (one user and one WebSocket each, paired into 1:1 conversations). Even.
    #[arg(long, default_value_t = 1_000)]
    pub clients: u32,
    /// Closed loops (relay, durable): messages in flight per client, comma-separated windows. The
    /// relay and the cluster run once per window, back to back, and the report's headline numbers
    /// (`relay_msgs_per_s`, `durable_msgs_per_s`, `ratio_to_relay`) are those of the window where
    /// the cluster did best: its closed-loop maximum, against the relay at the same window.
    #[arg(long, default_value = "1,4,16")]
    pub in_flight: String,
    /// Load processes sharing the traffic clients.
    #[arg(long, default_value_t = 2)]
    pub load_processes: u32,
    /// Measured seconds of each traffic phase (after a warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Unmeasured warm-up before each traffic phase, ms.
    #[arg(long, default_value_t = 1_000)]
    pub warmup_ms: u64,
    /// Open-loop total rates (msg/s), comma-separated; one phase each.
    #[arg(long, default_value = "10000,25000,50000")]
    pub rates: String,
    /// Message body size, bytes (send timestamp + phase tag + padding).
    #[arg(long, default_value_t = 40)]
    pub body_bytes: usize,
    /// Idle sessions to open against each node.
    #[arg(long, default_value_t = 19_000)]
    pub sessions_per_node: u32,
    /// Users the sessions log in as (argon2 registration is slow: keep this modest); each session
    /// has its own device id.
    #[arg(long, default_value_t = 1_000)]
    pub session_users: u32,
    /// Group fan-out: members of the bench group (each one user, one WebSocket), at most
    /// `MAX_GROUP_MEMBERS`.
    #[arg(long, default_value_t = 1_024)]
    pub group_members: u32,
    /// Group fan-out: how many of the members send (the others only receive).
    #[arg(long, default_value_t = 8)]
    pub group_senders: u32,
    /// Group fan-out: messages per second into the group, comma-separated; one phase each. Every
    /// message is delivered to each of the other members, so deliveries/s ≈ rate × (members − 1).
    #[arg(long, default_value = "10,50,100")]
    pub group_rates: String,
    /// Failover phase: total open-loop rate while nodes are killed. Well under the box's capacity
    /// on purpose: each kill adds reconnects (with their sync), resends and a node's restart on
    /// top of the traffic, and on a 2-core box running everything at 5,000 msg/s the backlog of
    /// one kill is not worked off before the next, so the measured gap is that backlog rather
    /// than the failover (BENCHMARKS.md, session 6, has both).
    #[arg(long, default_value_t = 2_000)]
    pub failover_rate: u32,
    /// Failover phase length, seconds.
    #[arg(long, default_value_t = 30)]
    pub failover_secs: u64,
    /// A kill -9 every this many seconds during the failover phase (rotating over the nodes).
    #[arg(long, default_value_t = 8)]
    pub kill_every_secs: u64,
    /// A killed node is started again this long after its kill.
    #[arg(long, default_value_t = 2_000)]
    pub restart_after_ms: u64,
    /// Messages seeded into the history conversation (through the storage crate, before the
    /// nodes start).
    #[arg(long, default_value_t = 1_000_000)]
    pub history_messages: u64,
    /// Concurrent history readers (closed loop, one page request in flight each).
    #[arg(long, default_value_t = 8)]
    pub history_readers: u32,
    /// Uploads of the `media` scenario's photo, of each kind (picture, opaque bytes).
    #[arg(long, default_value_t = 24)]
    pub media_uploads: u32,
    /// Uploads in flight at once in the `media` scenario.
    #[arg(long, default_value_t = 4)]
    pub media_concurrency: u32,
    /// First port of the cluster (HTTP ports from here, node-to-node ports from here + 100, the
    /// relay at here + 99); 0 picks free ports.
    #[arg(long, default_value_t = 0)]
    pub port_base: u16,
    /// Directory of the runs (config, data, logs, specs); each run gets its own subdirectory.
    #[arg(long, default_value = "data/bench")]
    pub work_dir: PathBuf,
    /// Where to write the latency-over-time SVG (default: in the run's directory).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Most uploads of each kind in the `media` scenario (it runs bounded in count, not time).
const MAX_MEDIA_UPLOADS: u32 = 200;

/// Every scenario, in the order they run: sessions first (their users have no conversations yet,
/// so a session's reconnect sync is empty), relay right before durable so the two share the
/// machine's state, group fan-out after the 1:1 loops, failover after the steady-state numbers,
/// history, then media (uploads, which the other phases never make).
const SCENARIOS: &[&str] = &["sessions", "relay", "durable", "open", "group", "failover", "history", "media"];
/// Traffic clients per run: beyond this the load processes, not the nodes, are the subject.
const MAX_CLIENTS: u32 = 20_000;
const MAX_LOAD_PROCESSES: u32 = 32;
/// Ten minutes per phase: long runs are fine, unbounded ones are not.
const MAX_PHASE_SECS: u64 = 600;
/// Under the 20,000 open files a process may have on our machines, minus the node's own files
/// (shard databases, listeners, peers).
const MAX_SESSIONS_PER_NODE: u32 = 19_900;
/// A node's connection limit during the bench: the session target is meant to reach the open-file
/// ceiling, not a configured one.
const BENCH_MAX_CONNECTIONS: u32 = 19_950;
/// Sessions one load process holds: well under its own 20,000 open files.
const SESSIONS_PER_WORKER: u32 = 9_500;
/// Session handshakes in flight per sessions worker.
const SESSION_CONNECT_CONCURRENCY: u32 = 200;
const MAX_HISTORY_MESSAGES: u64 = 50_000_000;
const MAX_RATE: u64 = 1_000_000;
/// Lease TTL of the bench cluster: the project's default (a frozen node is replaced after it; a
/// killed one at once).
const LEASE_TTL_MS: u64 = 3_000;
/// Time-series bucket of send→deliver latency in the chart.
const BUCKET_MS: u64 = 100;
/// After a traffic phase stops sending, how long clients wait for outstanding acks.
const DRAIN_MS: u64 = 3_000;
/// Failover phase: clients keep waiting for resent messages this long after sending stops (a
/// kill near the end needs its failover and reconnects to finish).
const FAILOVER_DRAIN_MS: u64 = 10_000;
/// Between `go` and the agreed start, so every load process starts on the same millisecond.
const GO_DELAY: Duration = Duration::from_millis(300);
/// How long load processes may take to open their connections.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Beyond a phase's own length, how long its results may take to arrive.
const RESULT_MARGIN: Duration = Duration::from_secs(30);
/// How long nodes may take to close the sessions of the sessions phase before the next phase.
const SESSIONS_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Source addresses of load sockets: 127.0.0.(FIRST_SOURCE + worker index), one per process, so
/// that each process has the ephemeral ports of an address to itself.
const FIRST_SOURCE: u8 = 2;
/// How long the relay may take to listen.
const RELAY_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Run `parley bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let scenarios = check_args(&args)?;
    let has = |s: &str| scenarios.iter().any(|x| x == s);
    let bench_start = Instant::now();
    let bench_start_ms = parley_storage::now_ms();
    let mut machine = Machine::probe();
    let snapshot = Snapshot::take();
    let run_dir = args.work_dir.join(format!("run-{}", bench_start_ms / 1000));
    std::fs::create_dir_all(run_dir.join("logs")).with_context(|| format!("creating {}", run_dir.display()))?;
    let run_dir = run_dir.canonicalize()?;
    let ctx = Ctx { run_dir: run_dir.clone(), bench_start, bench_start_ms };
    say(format!("run directory {}", run_dir.display()));

    let store = match &args.postgres_url {
        Some(url) => {
            StoreConfig::Postgres { url: url.clone(), pool_size: args.pool_size, commit_slots: args.commit_slots }
        }
        None => StoreConfig::Embedded { dir: run_dir.join("data") },
    };
    let store_kind = if args.postgres_url.is_some() { "postgres" } else { "embedded" };
    let mut report = Report {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        store: store_kind,
        nodes: args.nodes,
        shards: args.shards,
        clients: args.clients,
        in_flight: 0,
        body_bytes: args.body_bytes,
        load_processes: args.load_processes,
        scenarios: scenarios.clone(),
        groups: if has("group") { "measured: see group_fanout" } else { "not measured: scenario not selected" },
        ..Report::default()
    };
    let mut plot_series = Vec::new();
    let mut kills_for_plot = Vec::new();

    let needs_cluster = ["sessions", "durable", "open", "group", "failover", "history", "media"].iter().any(|s| has(s));
    let seeded = if has("history") {
        say(format!("seeding {} history messages through the storage crate", args.history_messages));
        let s = seed::history(&store, args.shards, args.history_messages, args.body_bytes, say).await?;
        say(format!("seeded {} messages in {:.1}s ({:.0}/s)", s.messages, s.secs, s.messages as f64 / s.secs));
        Some(s)
    } else {
        None
    };

    let ports = Ports::pick(args.port_base, args.nodes)?;
    let mut cluster = None;
    let mut users = Vec::new();
    let mut postmaster = None;
    if needs_cluster {
        let config_path = run_dir.join("cluster.toml");
        std::fs::write(&config_path, cluster_toml(&args, &ports))?;
        let config = crate::config::Config::load(&config_path)?;
        let mut env = vec![
            ("PARLEY_COOKIE".to_string(), crate::launcher::random_cookie()),
            ("PARLEY_MAX_CONNECTIONS".to_string(), BENCH_MAX_CONNECTIONS.to_string()),
        ];
        if let Some(url) = &args.postgres_url {
            env.push(("PARLEY_DATABASE_URL".to_string(), url.clone()));
            env.push(("PARLEY_STORAGE".to_string(), "postgres".to_string()));
            postmaster = postmaster_pid(url).await;
        }
        let mut c = LocalCluster::new(&config_path, &config, &run_dir.join("logs"), env)?;
        say(format!("starting {} nodes ({store_kind} store, {} shards)", c.nodes.len(), args.shards));
        c.start_all().await?;
        let clients: Vec<Client> = c.nodes.iter().map(|n| n.client()).collect();
        let wanted = args.clients.max(if has("sessions") { args.session_users } else { 0 }).max(if has("group") {
            args.group_members
        } else {
            0
        }) as usize;
        let t = Instant::now();
        users = crate::drill::register_all(&clients, wanted).await?;
        say(format!("registered {} users in {:.1}s", users.len(), t.elapsed().as_secs_f64()));
        cluster = Some(c);
    }

    if has("sessions") {
        let c = cluster.as_mut().context("sessions need the cluster")?;
        let tokens: Vec<String> = users.iter().take(args.session_users as usize).map(|u| u.token.clone()).collect();
        let r = sessions_phase(&ctx, &args, c, &tokens).await?;
        report.sessions_held = Some(r.held_server);
        report.rss_bytes_per_session = r.rss_bytes_per_session;
        report.sessions = Some(r);
        // Fresh node processes for the traffic phases: a node that held 19k sessions keeps their
        // memory (the allocator does not give it back), which is not what traffic should run on.
        say("restarting the nodes after the sessions phase".to_string());
        c.stop_all().await;
        c.start_all().await?;
    }

    let traffic_users: Vec<TrafficUser> = users
        .iter()
        .take(args.clients as usize)
        .map(|u| TrafficUser { user: u.user.to_string(), token: u.token.clone(), device: u.device.clone() })
        .collect();
    let node_urls: Vec<String> = ports.http.iter().map(|p| format!("ws://127.0.0.1:{p}/v1/ws")).collect();

    // No closed loop asked for (say `--scenarios open`): no windows, no rows, no headline.
    let windows = if has("relay") || has("durable") { parse_windows(&args.in_flight)? } else { Vec::new() };
    for &window in &windows {
        // Phase names carry the window when there are several.
        let named = |base: &str| if windows.len() > 1 { format!("{base}-w{window}") } else { base.to_string() };
        let mut row = ClosedLoopRow { in_flight: window, ..ClosedLoopRow::default() };
        if has("relay") {
            let r = relay_phase(&ctx, &args, ports.relay, window, &named("relay")).await?;
            row.relay_msgs_per_s = Some(r.msgs_per_s);
            plot_series.push(r.series());
            report.phases.push(r);
        }
        if has("durable") {
            let pids = Probes::of(cluster.as_ref(), postmaster, args.postgres_url.as_deref());
            let settled = settle(&pids).await;
            let mode = Mode { in_flight: window, rate: None, reconnect: false, group: None };
            let name = named("durable");
            let mut r =
                traffic_phase(&ctx, &args, &name, &node_urls, &traffic_users, mode, args.duration_secs, &pids).await?;
            r.settle_ms = settled;
            row.durable_msgs_per_s = Some(r.msgs_per_s);
            plot_series.push(r.series());
            report.phases.push(r);
        }
        if let (Some(relay), Some(durable)) = (row.relay_msgs_per_s, row.durable_msgs_per_s) {
            row.ratio_to_relay = (relay > 0.0).then(|| round(durable / relay, 3));
        }
        report.closed_loop.push(row);
    }
    // The headline: the window where the cluster did best (or the relay, when it ran alone).
    let best = report
        .closed_loop
        .iter()
        .max_by(|a, b| {
            let key = |r: &ClosedLoopRow| r.durable_msgs_per_s.or(r.relay_msgs_per_s).unwrap_or(0.0);
            key(a).total_cmp(&key(b))
        })
        .cloned();
    if let Some(best) = best {
        report.in_flight = best.in_flight;
        report.relay_msgs_per_s = best.relay_msgs_per_s;
        report.durable_msgs_per_s = best.durable_msgs_per_s;
        report.ratio_to_relay = best.ratio_to_relay;
    }
    if has("open") {
        for rate in parse_rates(&args.rates)? {
            let pids = Probes::of(cluster.as_ref(), postmaster, args.postgres_url.as_deref());
            let settled = settle(&pids).await;
            let per_client = rate as f64 / traffic_users.len().max(1) as f64;
            let mode = Mode { in_flight: 0, rate: Some(per_client), reconnect: false, group: None };
            let name = format!("open-{rate}");
            let mut r =
                traffic_phase(&ctx, &args, &name, &node_urls, &traffic_users, mode, args.duration_secs, &pids).await?;
            r.rate_target = Some(rate);
            r.settle_ms = settled;
            // No deliveries, no percentile: a 0 would read as a perfect score.
            if rate == 10_000 && r.delivered > 0 {
                report.p99_deliver_ms_at_10k = Some(r.deliver_ms.p99_ms);
            }
            plot_series.push(r.series());
            report.phases.push(r);
        }
    }
    if has("group") {
        let members: Vec<TrafficUser> = users
            .iter()
            .take(args.group_members as usize)
            .map(|u| TrafficUser { user: u.user.to_string(), token: u.token.clone(), device: u.device.clone() })
            .collect();
        let c = cluster.as_ref().context("group fan-out needs the cluster")?;
        let others: Vec<parley_protocol::UserId> =
            users.iter().skip(1).take(members.len() - 1).map(|u| u.user).collect();
        let group = c.nodes[0]
            .client()
            .create_group(&users[0].token, "bench fan-out", &others)
            .await
            .context("creating the bench group")?;
        say(format!("group {} of {} members", group.conversation_id, group.members.len()));
        let senders = args.group_senders.min(members.len() as u32);
        let mut fanout = GroupFanout { members: group.members.len() as u32, senders, ..GroupFanout::default() };
        for rate in parse_rates(&args.group_rates)? {
            let pids = Probes::of(cluster.as_ref(), postmaster, args.postgres_url.as_deref());
            let settled = settle(&pids).await;
            let mode = Mode {
                in_flight: 0,
                rate: Some(rate as f64 / senders as f64),
                reconnect: false,
                group: Some((group.conversation_id, senders)),
            };
            let name = format!("group-{rate}");
            let mut r =
                traffic_phase(&ctx, &args, &name, &node_urls, &members, mode, args.duration_secs, &pids).await?;
            r.rate_target = Some(rate);
            r.settle_ms = settled;
            if r.deliveries_per_s > fanout.deliveries_per_s {
                fanout.deliveries_per_s = r.deliveries_per_s;
                fanout.rate_target = Some(rate);
                fanout.p99_deliver_ms = (r.delivered > 0).then_some(r.deliver_ms.p99_ms);
            }
            plot_series.push(r.series());
            report.phases.push(r);
        }
        report.group_fanout = Some(fanout);
    }
    if has("failover") {
        let settled = settle(&Probes::of(cluster.as_ref(), postmaster, args.postgres_url.as_deref())).await;
        let c = cluster.as_mut().context("failover needs the cluster")?;
        let (mut r, f) = failover_phase(&ctx, &args, c, &node_urls, &traffic_users).await?;
        kills_for_plot = f.kills_at.iter().map(|(at, name)| (*at, format!("kill -9 {name}"))).collect();
        report.failover_ms_p50 = f.p50_ms;
        r.settle_ms = settled;
        plot_series.push(r.series());
        report.phases.push(r);
        report.failover = Some(f);
    }
    if let Some(s) = &seeded {
        settle(&Probes::of(cluster.as_ref(), postmaster, args.postgres_url.as_deref())).await;
        let r = history_phase(&ctx, &args, &node_urls, s).await?;
        report.history = Some(r);
    }
    if has("media") {
        let c = cluster.as_ref().context("media needs the cluster")?;
        let user = users.first().context("media needs a user")?;
        let clients: Vec<Client> = c.nodes.iter().map(|n| n.client()).collect();
        let r = media::phase(&clients, &user.token, args.media_uploads, args.media_concurrency).await?;
        report.media = Some(r);
    }

    machine.finish(&snapshot);
    if let Some(mut c) = cluster.take() {
        say("stopping the cluster".to_string());
        c.stop_all().await;
    }
    report.machine = machine;
    let plot_path = args.plot.clone().unwrap_or_else(|| run_dir.join("latency.svg"));
    if plot_series.iter().any(|s| !s.points.is_empty()) {
        if let Some(parent) = plot_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let title = format!(
            "Parley bench {}: p99 send→deliver per {BUCKET_MS} ms ({} nodes, {store_kind}, {} clients)",
            &report.date[..10],
            args.nodes,
            args.clients
        );
        std::fs::write(&plot_path, plot::svg(&title, &plot_series, &kills_for_plot))?;
        report.plot = Some(plot_path.display().to_string());
    }
    report.run_dir = run_dir.display().to_string();
    let table = report.table();
    if args.json {
        eprintln!("{table}");
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{table}");
    }
    Ok(())
}

fn check_args(args: &BenchArgs) -> anyhow::Result<Vec<String>> {
    let wanted: Vec<String> =
        args.scenarios.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    for s in &wanted {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!("unknown scenario `{s}`; known: {}", SCENARIOS.join(", "));
        }
    }
    if args.clients < 2 || args.clients > MAX_CLIENTS || !args.clients.is_multiple_of(2) {
        bail!("--clients must be an even number in 2..={MAX_CLIENTS}");
    }
    if args.load_processes == 0 || args.load_processes > MAX_LOAD_PROCESSES {
        bail!("--load-processes must be in 1..={MAX_LOAD_PROCESSES}");
    }
    if args.duration_secs == 0 || args.duration_secs > MAX_PHASE_SECS || args.failover_secs > MAX_PHASE_SECS {
        bail!("--duration-secs and --failover-secs must be in 1..={MAX_PHASE_SECS}");
    }
    parse_windows(&args.in_flight)?;
    if args.sessions_per_node > MAX_SESSIONS_PER_NODE {
        bail!("--sessions-per-node must be at most {MAX_SESSIONS_PER_NODE} (open-file limit of a node)");
    }
    if args.history_messages == 0 || args.history_messages > MAX_HISTORY_MESSAGES {
        bail!("--history-messages must be in 1..={MAX_HISTORY_MESSAGES}");
    }
    // Bounded in count: each upload is a 12-megapixel photo held in memory until it is sent.
    if args.media_uploads == 0
        || args.media_uploads > MAX_MEDIA_UPLOADS
        || args.media_concurrency == 0
        || args.media_concurrency > 16
    {
        bail!("--media-uploads must be in 1..={MAX_MEDIA_UPLOADS} and --media-concurrency in 1..=16");
    }
    if wanted.iter().any(|s| s == "group") {
        let max = parley_protocol::limits::MAX_GROUP_MEMBERS as u32;
        if args.group_members < 2 || args.group_members > max {
            bail!("--group-members must be in 2..={max}");
        }
        if args.group_senders == 0 || args.group_senders > args.group_members {
            bail!("--group-senders must be in 1..=--group-members");
        }
        parse_rates(&args.group_rates)?;
    }
    if args.nodes == 0 || args.nodes > 16 {
        bail!("--nodes must be in 1..=16");
    }
    if wanted.iter().any(|s| s == "failover") && args.nodes < 2 {
        bail!("failover needs at least two nodes");
    }
    if !(16..=parley_protocol::limits::MAX_BODY_BYTES).contains(&args.body_bytes) {
        bail!("--body-bytes must be in 16..={}", parley_protocol::limits::MAX_BODY_BYTES);
    }
    parse_rates(&args.rates)?;
    // Run in the canonical order whatever order they were given in.
    Ok(SCENARIOS.iter().filter(|s| wanted.iter().any(|w| w == *s)).map(|s| s.to_string()).collect())
}

fn parse_rates(text: &str) -> anyhow::Result<Vec<u64>> {
    let rates: Vec<u64> = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<u64>().with_context(|| format!("rate `{s}` is not a number")))
        .collect::<anyhow::Result<_>>()?;
    if rates.iter().any(|&r| r == 0 || r > MAX_RATE) {
        bail!("--rates must be in 1..={MAX_RATE} msg/s");
    }
    Ok(rates)
}

/// A line on stderr (stdout is for the report).
fn say(line: String) {
    eprintln!("[bench] {line}");
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// What every phase needs to know about the run.
struct Ctx {
    run_dir: PathBuf,
    bench_start: Instant,
    bench_start_ms: i64,
}

/// The ports of the bench cluster and relay.
struct Ports {
    http: Vec<u16>,
    cluster: Vec<u16>,
    relay: u16,
}

impl Ports {
    fn pick(base: u16, nodes: u16) -> anyhow::Result<Ports> {
        if base != 0 {
            return Ok(Ports {
                http: (0..nodes).map(|i| base + i).collect(),
                cluster: (0..nodes).map(|i| base + 100 + i).collect(),
                relay: base + 99,
            });
        }
        let free = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
        Ok(Ports {
            http: (0..nodes).map(|_| free()).collect::<anyhow::Result<_>>()?,
            cluster: (0..nodes).map(|_| free()).collect::<anyhow::Result<_>>()?,
            relay: free()?,
        })
    }
}

fn cluster_toml(args: &BenchArgs, ports: &Ports) -> String {
    // Postgres reaches the nodes through PARLEY_STORAGE / PARLEY_DATABASE_URL in their environment
    // (a URL may carry a password: never in the file); the file itself says embedded.
    let mut toml = format!(
        "# Generated by `parley bench`. With --postgres-url the nodes get PARLEY_STORAGE=postgres and\n\
         # PARLEY_DATABASE_URL from the environment, which override [storage].\n\
         [cluster]\nshard_count = {}\nlease_ttl_ms = {LEASE_TTL_MS}\nrenew_interval_ms = {}\n\n\
         [storage]\nkind = \"embedded\"\ndir = \"data\"\npool_size = {}\ncommit_slots = {}\n\n[limits]\nmax_connections = {BENCH_MAX_CONNECTIONS}\n",
        args.shards,
        LEASE_TTL_MS / 3,
        args.pool_size,
        args.commit_slots
    );
    for i in 0..ports.http.len() {
        toml.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\nhttp = \"127.0.0.1:{}\"\ncluster = \"127.0.0.1:{}\"\n",
            i + 1,
            ports.http[i],
            ports.cluster[i]
        ));
    }
    toml
}

/// A connection to the Postgres at `url` for the bench's own queries (its driver task runs until
/// the client is dropped); `None` when it cannot connect.
async fn pg_connect(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// The postmaster of the Postgres at `url` (parent of our backend), to read its CPU time.
async fn postmaster_pid(url: &str) -> Option<u32> {
    let client = pg_connect(url).await?;
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.ok()?.get(0);
    machine::parent_of(pid as u32)
}

/// What a phase samples around its window: the processes whose CPU it charges to the server side,
/// and the nodes whose unplanned cluster events (`/v1/cluster` → `events`) it counts.
#[derive(Clone, Default)]
struct Probes {
    server: Vec<u32>,
    postmaster: Option<u32>,
    /// The Postgres the cluster writes to, for its checkpoints (see [`settle`]).
    postgres_url: Option<String>,
    nodes: Vec<Client>,
}

impl Probes {
    fn of(cluster: Option<&LocalCluster>, postmaster: Option<u32>, postgres_url: Option<&str>) -> Probes {
        Probes {
            server: cluster.map(|c| c.nodes.iter().filter_map(|n| n.pid()).collect()).unwrap_or_default(),
            postmaster,
            postgres_url: postgres_url.map(str::to_string),
            nodes: cluster.map(|c| c.nodes.iter().map(|n| n.client()).collect()).unwrap_or_default(),
        }
    }

    /// Checkpoints Postgres has completed so far (timed and requested); `None` without Postgres
    /// or when it cannot say.
    async fn checkpoints(&self) -> Option<u64> {
        let client = pg_connect(self.postgres_url.as_deref()?).await?;
        // Postgres 17 moved the counters from pg_stat_bgwriter to pg_stat_checkpointer.
        let n: i64 = match client.query_one("SELECT num_timed + num_requested FROM pg_stat_checkpointer", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => client
                .query_one("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter", &[])
                .await
                .ok()?
                .get(0),
        };
        u64::try_from(n).ok()
    }

    /// Have Postgres write out every change made so far (`CHECKPOINT`), so that the next phase does
    /// not pay for a checkpoint that earlier phases' writes made due.
    async fn checkpoint(&self) {
        let Some(url) = self.postgres_url.as_deref() else { return };
        let done = match pg_connect(url).await {
            Some(client) => tokio::time::timeout(CHECKPOINT_TIMEOUT, client.batch_execute("CHECKPOINT"))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            None => Err("cannot connect".to_string()),
        };
        if let Err(why) = done {
            say(format!("CHECKPOINT before the phase failed ({why}); the phase may pay for the previous ones' writes"));
        }
    }

    /// (peers declared silent, shards lost) summed over the nodes so far; `None` without nodes or
    /// when one of them did not answer (a phase then reports no count rather than a low one).
    async fn events(&self) -> Option<(u64, u64)> {
        if self.nodes.is_empty() {
            return None;
        }
        let mut sum = (0, 0);
        for node in &self.nodes {
            let (200, body) = node.raw("GET", "/v1/cluster", None, None).await.ok()? else { return None };
            sum.0 += body["events"]["peers_declared_silent"].as_u64()?;
            sum.1 += body["events"]["shards_lost"].as_u64()?;
        }
        Some(sum)
    }

    /// (server ms, postgres ms, whole machine busy ms) so far.
    fn sample(&self) -> (f64, f64, f64) {
        let pg = self.postmaster.map(|p| machine::total_cpu_ms(&machine::with_children(p))).unwrap_or(0.0);
        (machine::total_cpu_ms(&self.server), pg, machine::machine_busy_ms())
    }
}

/// A phase starts on a quiet cluster: the nodes and Postgres together below this many cores busy.
/// An idle cluster (heartbeats, lease renewals) uses a few hundredths of a core; a node still
/// working off the previous phase's backlog uses one or more.
const QUIET_CORES: f64 = 0.25;
/// ... over a window this long.
const QUIET_WINDOW: Duration = Duration::from_millis(500);
/// Waiting for quiet gives up after this long (the phase then starts anyway, and its `settle_ms`
/// says so).
const SETTLE_MAX: Duration = Duration::from_secs(60);
/// A `CHECKPOINT` before a phase gives up after this long (a few hundred MB of dirty pages take
/// seconds on this machine's disk).
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(120);

/// Wait until the nodes and Postgres are quiet, so that a phase does not measure the previous
/// one's leftovers (a phase's numbers must not depend on the order of phases). The time waited
/// (`None` without processes to watch).
///
/// With Postgres, the wait starts with a `CHECKPOINT`. Without it, a phase after a busy one could
/// meet a checkpoint that the busy phase's WAL made due (`max_wal_size`): the checkpointer then
/// writes hundreds of MB of dirty pages during the phase (session 18: 355 MB in 4.6 s in the last
/// seconds of the 10k msg/s phase right after the closed loops, whose deliver p99 tripled).
/// Each phase still reports the checkpoints that happen during it (`postgres_checkpoints`).
async fn settle(probes: &Probes) -> Option<u64> {
    if probes.server.is_empty() {
        return None;
    }
    let started = Instant::now();
    probes.checkpoint().await;
    let (mut server, mut pg, _) = probes.sample();
    loop {
        tokio::time::sleep(QUIET_WINDOW).await;
        let (s, p, _) = probes.sample();
        let cores = (s - server + p - pg) / QUIET_WINDOW.as_millis() as f64;
        (server, pg) = (s, p);
        if cores < QUIET_CORES || started.elapsed() >= SETTLE_MAX {
            let waited = started.elapsed().saturating_sub(QUIET_WINDOW);
            if waited >= QUIET_WINDOW {
                say(format!("waited {:.1}s for the cluster to go quiet ({cores:.2} cores busy)", waited.as_secs_f64()));
            }
            return Some(waited.as_millis() as u64);
        }
    }
}

/// One registered user as the traffic phases use it.
#[derive(Clone)]
struct TrafficUser {
    user: String,
    token: String,
    device: String,
}

/// How a traffic phase drives its clients.
#[derive(Clone, Copy)]
struct Mode {
    in_flight: u32,
    /// Open loop: msg/s per sending client.
    rate: Option<f64>,
    reconnect: bool,
    /// Group fan-out: every client is a member of this group and the first `senders` send.
    group: Option<(parley_protocol::ConversationId, u32)>,
}

/// Latency percentiles, ms.
#[derive(Clone, Debug, Default, Serialize)]
struct Percentiles {
    count: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| round(us as f64 / 1000.0, 3);
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// One traffic phase's numbers.
#[derive(Clone, Debug, Default, Serialize)]
struct PhaseReport {
    name: String,
    /// "relay" or "parley".
    target: &'static str,
    /// "closed" or "open".
    loop_kind: &'static str,
    clients: u64,
    connect_failures: u64,
    first_connect_error: Option<String>,
    in_flight: Option<u32>,
    rate_target: Option<u64>,
    measured_secs: f64,
    /// Acks received in the measured window per second.
    msgs_per_s: f64,
    /// Deliveries (pushed messages a recipient measured) of messages sent in the window, per
    /// second of the window: about `msgs_per_s` for 1:1, × (members − 1) for a group.
    deliveries_per_s: f64,
    sent: u64,
    unacked: u64,
    delivered: u64,
    errors: u64,
    unavailable: u64,
    reconnects: u64,
    skipped: u64,
    max_client_gap_ms: u64,
    ack_ms: Percentiles,
    deliver_ms: Percentiles,
    /// CPU of the server processes (nodes, or the relay) per acked message, µs.
    server_cpu_us_per_msg: Option<f64>,
    /// CPU of Postgres (postmaster and its children) per acked message, µs.
    postgres_cpu_us_per_msg: Option<f64>,
    /// Cores the server processes kept busy on average during the window.
    server_cores_busy: Option<f64>,
    postgres_cores_busy: Option<f64>,
    /// Cores the whole machine kept busy during the window (all processes, ours and others): on a
    /// shared box, the difference to server + postgres + load is what else ran.
    machine_cores_busy: Option<f64>,
    /// CPU of the load processes per acked message (whole phase incl. connect and drain), µs.
    load_cpu_us_per_msg: Option<f64>,
    /// Over the whole phase (connect to drain), summed over the nodes: live-looking peers declared
    /// down for not answering heartbeats, and shards lost without a planned hand-off. Both should
    /// be 0 in a phase without faults; overload that starves the control plane shows here first.
    peers_declared_silent: Option<u64>,
    shards_lost: Option<u64>,
    /// Checkpoints Postgres completed over the whole phase (connect to drain); `None` without
    /// Postgres. A checkpoint writes every page changed since the one before, so a phase with one
    /// paid for disk writes that a phase without one did not (each phase starts right after a
    /// `CHECKPOINT`: see [`settle`]).
    postgres_checkpoints: Option<u64>,
    /// How long the phase waited, before it started, for the nodes and Postgres to go quiet
    /// ([`settle`]); `None` for phases that do not wait (relay, or without a cluster).
    settle_ms: Option<u64>,
    /// (seconds since the bench started, p99 send→deliver ms) per bucket.
    #[serde(skip)]
    timeline: Vec<(f64, f64)>,
}

impl PhaseReport {
    fn series(&self) -> plot::Series {
        plot::Series { label: self.name.clone(), points: self.timeline.clone() }
    }
}

/// A group of load processes.
struct Workers {
    procs: Vec<Worker>,
}

struct Worker {
    index: usize,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    log: PathBuf,
}

impl Workers {
    /// Start one `parley bench-load` per spec.
    fn spawn(ctx: &Ctx, tag: &str, specs: Vec<LoadSpec>) -> anyhow::Result<Workers> {
        let bin = std::env::var_os("PARLEY_BIN").map(PathBuf::from).map_or_else(std::env::current_exe, Ok)?;
        let dir = ctx.run_dir.join("specs");
        std::fs::create_dir_all(&dir)?;
        let mut procs = Vec::new();
        for (index, spec) in specs.into_iter().enumerate() {
            let path = dir.join(format!("{tag}-{index}.json"));
            std::fs::write(&path, serde_json::to_vec(&spec)?)?;
            let log = ctx.run_dir.join("logs").join(format!("load-{tag}-{index}.log"));
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg("bench-load").arg("--spec").arg(&path).env("RUST_LOG", "warn");
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(std::fs::File::create(&log)?);
            crate::launcher::die_with_parent(&mut cmd);
            let mut cmd = tokio::process::Command::from(cmd);
            cmd.kill_on_drop(true);
            let mut child = cmd.spawn().with_context(|| format!("spawning {}", bin.display()))?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            procs.push(Worker { index, child, stdin, lines: tokio::io::BufReader::new(stdout).lines(), log });
        }
        Ok(Workers { procs })
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|w| w.child.id()).collect()
    }

    /// The next protocol line of every worker, each within `timeout`.
    async fn next_all(&mut self, timeout: Duration) -> anyhow::Result<Vec<WorkerLine>> {
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        for w in &mut self.procs {
            loop {
                let line = tokio::time::timeout_at(deadline, w.lines.next_line())
                    .await
                    .map_err(|_| anyhow::anyhow!("load process {} silent for {timeout:?}", w.index))?
                    .with_context(|| format!("reading load process {}", w.index))?;
                let Some(line) = line else {
                    let log = std::fs::read_to_string(&w.log).unwrap_or_default();
                    bail!("load process {} exited early; its log ({}):\n{log}", w.index, w.log.display());
                };
                // Anything that is not a protocol line (a stray log line) is skipped.
                if let Ok(parsed) = serde_json::from_str::<WorkerLine>(&line) {
                    out.push(parsed);
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn ready(&mut self, timeout: Duration) -> anyhow::Result<Vec<Ready>> {
        self.next_all(timeout)
            .await?
            .into_iter()
            .map(|l| match l {
                WorkerLine::Ready(r) => Ok(r),
                WorkerLine::Result(_) => bail!("a load process sent its result before `ready`"),
            })
            .collect()
    }

    async fn results(&mut self, timeout: Duration) -> anyhow::Result<Vec<WorkerResult>> {
        let results = self
            .next_all(timeout)
            .await?
            .into_iter()
            .map(|l| match l {
                WorkerLine::Result(r) => Ok(*r),
                WorkerLine::Ready(_) => bail!("a load process sent `ready` twice"),
            })
            .collect();
        for w in &mut self.procs {
            let _ = tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await;
        }
        results
    }

    async fn tell_all(&mut self, line: &str) -> anyhow::Result<()> {
        for w in &mut self.procs {
            w.stdin.write_all(format!("{line}\n").as_bytes()).await?;
            w.stdin.flush().await?;
        }
        Ok(())
    }
}

/// Sum of the workers' results, histograms merged.
struct Merged {
    r: WorkerResult,
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    timeline: BTreeMap<u64, Histogram<u64>>,
}

fn merge(results: &[WorkerResult]) -> anyhow::Result<Merged> {
    let mut m = Merged { r: WorkerResult::default(), ack: new_hist(), deliver: new_hist(), timeline: BTreeMap::new() };
    for w in results {
        m.r.sent += w.sent;
        m.r.acked_in_window += w.acked_in_window;
        m.r.window_ms = m.r.window_ms.max(w.window_ms);
        m.r.unacked += w.unacked;
        m.r.delivered += w.delivered;
        m.r.errors += w.errors;
        m.r.unavailable += w.unavailable;
        m.r.reconnects += w.reconnects;
        m.r.skipped += w.skipped;
        m.r.max_gap_ms = m.r.max_gap_ms.max(w.max_gap_ms);
        m.r.pages += w.pages;
        m.r.page_errors += w.page_errors;
        m.r.cpu_ms += w.cpu_ms;
        if !w.ack_hist.is_empty() {
            merge_hist(&mut m.ack, &decode_hist(&w.ack_hist)?)?;
        }
        if !w.deliver_hist.is_empty() {
            merge_hist(&mut m.deliver, &decode_hist(&w.deliver_hist)?)?;
        }
        for (bucket, h) in &w.timeline {
            let h = decode_hist(h)?;
            match m.timeline.get_mut(bucket) {
                Some(into) => merge_hist(into, &h)?,
                None => {
                    m.timeline.insert(*bucket, h);
                }
            }
        }
    }
    Ok(m)
}

/// Pairs of clients spread over the load processes, each client on a pseudo-random node; or, for
/// a group, its members spread the same way.
fn traffic_specs(
    args: &BenchArgs,
    phase: &str,
    urls: &[String],
    users: &[TrafficUser],
    mode: Mode,
    duration_secs: u64,
    drain_ms: u64,
) -> Vec<LoadSpec> {
    // The tag is unique within the run even when a phase's name repeats (`--rates 10000,10000`):
    // with the bare name, the second phase's client message ids were the first one's, so the
    // server answered every send as a duplicate of the earlier phase's message and delivered none.
    static PHASES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let tag = format!("{phase}.{}", PHASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let k = (args.load_processes as usize).min(users.len() / 2).max(1);
    let mut per_worker: Vec<Vec<ClientSpec>> = vec![Vec::new(); k];
    // Pairs: users 2p and 2p+1 chat with each other and share a worker (an odd last user sits
    // out). A group: members go round-robin over the workers, and the first `senders` send.
    let (clients, worker_slot): (usize, fn(usize) -> usize) = match mode.group {
        Some(_) => (users.len(), |i| i),
        None => (users.len() / 2 * 2, |i| i / 2),
    };
    for (i, u) in users.iter().enumerate().take(clients) {
        // fnv1a of the index: a uniform, reproducible spread over the nodes.
        let url = (parley_protocol::shard::fnv1a(&(i as u64).to_le_bytes()) % urls.len() as u64) as usize;
        per_worker[worker_slot(i) % k].push(ClientSpec {
            user: u.user.clone(),
            token: u.token.clone(),
            device: u.device.clone(),
            url,
            sends: mode.group.is_none_or(|(_, senders)| (i as u32) < senders),
        });
    }
    per_worker
        .into_iter()
        .enumerate()
        .map(|(w, clients)| LoadSpec {
            worker: w as u32,
            work: Work::Traffic(TrafficSpec {
                phase: tag.clone(),
                urls: urls.to_vec(),
                clients,
                in_flight: mode.in_flight,
                rate_per_client: mode.rate,
                warmup_ms: args.warmup_ms,
                duration_ms: duration_secs * 1000,
                drain_ms,
                reconnect: mode.reconnect,
                body_bytes: args.body_bytes,
                bucket_ms: BUCKET_MS,
                source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, FIRST_SOURCE + (w % 200) as u8))),
                conversation: mode.group.map(|(c, _)| c.to_string()),
            }),
        })
        .collect()
}

/// Start load processes, let them connect, start them together, sample CPU over the measured
/// window, and merge what they report. `during` runs concurrently with the phase (the failover
/// phase's kills), from the agreed start.
#[allow(clippy::too_many_arguments)]
async fn traffic_phase(
    ctx: &Ctx,
    args: &BenchArgs,
    phase: &str,
    urls: &[String],
    users: &[TrafficUser],
    mode: Mode,
    duration_secs: u64,
    pids: &Probes,
) -> anyhow::Result<PhaseReport> {
    run_traffic(ctx, args, phase, urls, users, mode, duration_secs, DRAIN_MS, pids, |_| async { Ok(()) }).await
}

#[allow(clippy::too_many_arguments)]
async fn run_traffic<F, Fut>(
    ctx: &Ctx,
    args: &BenchArgs,
    phase: &str,
    urls: &[String],
    users: &[TrafficUser],
    mode: Mode,
    duration_secs: u64,
    drain_ms: u64,
    pids: &Probes,
    during: F,
) -> anyhow::Result<PhaseReport>
where
    F: FnOnce(Instant) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let specs = traffic_specs(args, phase, urls, users, mode, duration_secs, drain_ms);
    let events_before = pids.events().await;
    let checkpoints_before = pids.checkpoints().await;
    let mut workers = Workers::spawn(ctx, phase, specs)?;
    let ready = workers.ready(READY_TIMEOUT).await?;
    let connected: u64 = ready.iter().map(|r| r.connected).sum();
    let failed: u64 = ready.iter().map(|r| r.failed).sum();
    let first_error = ready.iter().find_map(|r| r.first_error.clone());
    say(format!(
        "{phase}: {connected} clients connected in {:.1}s ({failed} failed){}",
        ready.iter().map(|r| r.connect_secs).fold(0.0, f64::max),
        first_error.as_ref().map(|e| format!("; first error: {e}")).unwrap_or_default()
    ));
    let start_ms = parley_storage::now_ms() + GO_DELAY.as_millis() as i64;
    let start = Instant::now() + GO_DELAY;
    let phase_start_secs = (start_ms - ctx.bench_start_ms) as f64 / 1000.0;
    workers.tell_all(&format!("go {start_ms}")).await?;
    let measure_from = start + Duration::from_millis(args.warmup_ms);
    let measure_to = measure_from + Duration::from_secs(duration_secs);
    let sampling = async {
        tokio::time::sleep_until(measure_from).await;
        let before = pids.sample();
        tokio::time::sleep_until(measure_to).await;
        let after = pids.sample();
        (after.0 - before.0, after.1 - before.1, after.2 - before.2)
    };
    let progress = async {
        let mut tick = tokio::time::interval_at(start + Duration::from_secs(5), Duration::from_secs(5));
        loop {
            tick.tick().await;
            say(format!("{phase}: {:.0}s", start.elapsed().as_secs_f64()));
        }
    };
    let ((cpu, during_result), _) = tokio::select! {
        both = async { tokio::join!(sampling, during(start)) } => (both, ()),
        _ = progress => unreachable!("the progress loop never ends"),
    };
    during_result?;
    let load_pids = workers.pids();
    let wait = Duration::from_millis(args.warmup_ms + drain_ms) + Duration::from_secs(duration_secs) + RESULT_MARGIN;
    let results = workers.results(wait).await?;
    drop(load_pids);
    let events = match (events_before, pids.events().await) {
        (Some(b), Some(a)) => Some((a.0.saturating_sub(b.0), a.1.saturating_sub(b.1))),
        _ => None,
    };
    let checkpoints = match (checkpoints_before, pids.checkpoints().await) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let m = merge(&results)?;
    let secs = duration_secs as f64;
    let acked = m.r.acked_in_window;
    let per_msg = |cpu_ms: f64| (acked > 0 && cpu_ms > 0.0).then(|| round(cpu_ms * 1000.0 / acked as f64, 2));
    let r = PhaseReport {
        name: phase.to_string(),
        target: if phase == "relay" { "relay" } else { "parley" },
        loop_kind: if mode.rate.is_some() { "open" } else { "closed" },
        clients: users.len() as u64,
        connect_failures: failed,
        first_connect_error: first_error,
        in_flight: mode.rate.is_none().then_some(mode.in_flight),
        rate_target: None,
        measured_secs: secs,
        msgs_per_s: round(acked as f64 / secs, 1),
        deliveries_per_s: round(m.r.delivered as f64 / secs, 1),
        sent: m.r.sent,
        unacked: m.r.unacked,
        delivered: m.r.delivered,
        errors: m.r.errors,
        unavailable: m.r.unavailable,
        reconnects: m.r.reconnects,
        skipped: m.r.skipped,
        max_client_gap_ms: m.r.max_gap_ms,
        ack_ms: Percentiles::of(&m.ack),
        deliver_ms: Percentiles::of(&m.deliver),
        server_cpu_us_per_msg: per_msg(cpu.0),
        postgres_cpu_us_per_msg: pids.postmaster.and_then(|_| per_msg(cpu.1)),
        server_cores_busy: (!pids.server.is_empty()).then(|| round(cpu.0 / (secs * 1000.0), 2)),
        postgres_cores_busy: pids.postmaster.map(|_| round(cpu.1 / (secs * 1000.0), 2)),
        machine_cores_busy: Some(round(cpu.2 / (secs * 1000.0), 2)),
        load_cpu_us_per_msg: per_msg(m.r.cpu_ms as f64),
        peers_declared_silent: events.map(|e| e.0),
        shards_lost: events.map(|e| e.1),
        postgres_checkpoints: checkpoints,
        settle_ms: None,
        timeline: m
            .timeline
            .iter()
            .map(|(b, h)| {
                (
                    round(phase_start_secs + (*b * BUCKET_MS) as f64 / 1000.0, 2),
                    round(h.value_at_quantile(0.99) as f64 / 1000.0, 3),
                )
            })
            .collect(),
    };
    say(format!(
        "{phase}: {:.0} msg/s  ack p50/p99 {}/{} ms  deliver p50/p99 {}/{} ms  unacked {}  errors {}{}",
        r.msgs_per_s,
        r.ack_ms.p50_ms,
        r.ack_ms.p99_ms,
        r.deliver_ms.p50_ms,
        r.deliver_ms.p99_ms,
        r.unacked,
        r.errors,
        events
            .map(|(silent, lost)| format!("  peers declared silent {silent}  shards lost {lost}"))
            .unwrap_or_default()
    ));
    Ok(r)
}

async fn relay_phase(ctx: &Ctx, args: &BenchArgs, port: u16, window: u32, name: &str) -> anyhow::Result<PhaseReport> {
    let bin = std::env::var_os("PARLEY_BIN").map(PathBuf::from).map_or_else(std::env::current_exe, Ok)?;
    let log = ctx.run_dir.join("logs").join("relay.log");
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("relay").arg("--listen").arg(format!("127.0.0.1:{port}"));
    cmd.stdin(Stdio::null()).stdout(std::fs::File::create(&log)?).stderr(std::fs::File::create(&log)?);
    crate::launcher::die_with_parent(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut relay = cmd.spawn().context("spawning the relay")?;
    let deadline = Instant::now() + RELAY_READY_TIMEOUT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() >= deadline {
            bail!("the relay is not listening after {RELAY_READY_TIMEOUT:?}; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The relay's users are made up: its tokens are the user ids.
    let users: Vec<TrafficUser> = (0..args.clients)
        .map(|i| {
            let id = parley_protocol::UserId::random().to_string();
            TrafficUser { user: id.clone(), token: id, device: format!("relay-{i}") }
        })
        .collect();
    let pids = Probes { server: relay.id().into_iter().collect(), ..Probes::default() };
    let urls = vec![format!("ws://127.0.0.1:{port}/v1/ws")];
    let mode = Mode { in_flight: window, rate: None, reconnect: false, group: None };
    let r = traffic_phase(ctx, args, name, &urls, &users, mode, args.duration_secs, &pids).await;
    let _ = relay.kill().await;
    r
}

/// What the sessions phase measured.
#[derive(Clone, Debug, Default, Serialize)]
struct SessionsReport {
    target_per_node: u32,
    users: usize,
    load_processes: usize,
    /// Handshakes the load processes completed (welcome + sync_done).
    held_client: u64,
    /// Sessions the nodes themselves reported (`/v1/cluster`), summed.
    held_server: u64,
    held_per_node: Vec<u64>,
    failed: u64,
    first_error: Option<String>,
    /// Completed handshakes per second over all load processes (wall time of the slowest).
    connect_per_s: f64,
    rss_before_bytes: Vec<u64>,
    rss_after_bytes: Vec<u64>,
    /// Node RSS growth divided by the sessions it held, averaged over the nodes.
    rss_bytes_per_session: Option<f64>,
}

async fn sessions_phase(
    ctx: &Ctx,
    args: &BenchArgs,
    cluster: &mut LocalCluster,
    tokens: &[String],
) -> anyhow::Result<SessionsReport> {
    let nodes: Vec<(String, Option<u32>, Client)> =
        cluster.nodes.iter().map(|n| (format!("ws://{}/v1/ws", n.http), n.pid(), n.client())).collect();
    let rss_before: Vec<u64> = nodes.iter().map(|(_, pid, _)| pid.and_then(machine::rss_bytes).unwrap_or(0)).collect();
    let per_worker_count = args.sessions_per_node.div_ceil(SESSIONS_PER_WORKER).max(1);
    let mut specs = Vec::new();
    for (url, _, _) in &nodes {
        for w in 0..per_worker_count {
            let share =
                args.sessions_per_node / per_worker_count + u32::from(w < args.sessions_per_node % per_worker_count);
            let index = specs.len() as u32;
            specs.push(LoadSpec {
                worker: index,
                work: Work::Sessions(SessionsSpec {
                    url: url.clone(),
                    tokens: tokens.to_vec(),
                    sessions: share,
                    sources: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, FIRST_SOURCE + 20 + (index % 200) as u8))],
                    concurrency: SESSION_CONNECT_CONCURRENCY,
                    hold_ms: READY_TIMEOUT.as_millis() as u64 * 2,
                }),
            });
        }
    }
    say(format!(
        "sessions: opening {} per node on {} nodes from {} load processes ({} users)",
        args.sessions_per_node,
        nodes.len(),
        specs.len(),
        tokens.len()
    ));
    let load_processes = specs.len();
    let mut workers = Workers::spawn(ctx, "sessions", specs)?;
    let ready = workers.ready(READY_TIMEOUT).await?;
    // Let the nodes settle (session actors started, buffers allocated) before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after: Vec<u64> = nodes.iter().map(|(_, pid, _)| pid.and_then(machine::rss_bytes).unwrap_or(0)).collect();
    let mut held_per_node = Vec::new();
    for (_, _, client) in &nodes {
        held_per_node.push(node_sessions(client).await.unwrap_or(0));
    }
    workers.tell_all("stop").await?;
    let _ = workers.results(RESULT_MARGIN).await?;
    let held_client: u64 = ready.iter().map(|r| r.connected).sum();
    let wall = ready.iter().map(|r| r.connect_secs).fold(0.0, f64::max);
    let per_session: Vec<f64> = rss_before
        .iter()
        .zip(&rss_after)
        .zip(&held_per_node)
        .filter(|(_, &held)| held > 0)
        .map(|((b, a), &held)| a.saturating_sub(*b) as f64 / held as f64)
        .collect();
    let r = SessionsReport {
        target_per_node: args.sessions_per_node,
        users: tokens.len(),
        load_processes,
        held_client,
        held_server: held_per_node.iter().sum(),
        held_per_node,
        failed: ready.iter().map(|r| r.failed).sum(),
        first_error: ready.iter().find_map(|r| r.first_error.clone()),
        connect_per_s: if wall > 0.0 { round(held_client as f64 / wall, 1) } else { 0.0 },
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_bytes_per_session: (!per_session.is_empty())
            .then(|| round(per_session.iter().sum::<f64>() / per_session.len() as f64, 0)),
    };
    say(format!(
        "sessions: held {} (nodes say {:?}), {} failed{}, {:.0} handshakes/s, {} bytes RSS per session",
        r.held_client,
        r.held_per_node,
        r.failed,
        r.first_error.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        r.connect_per_s,
        r.rss_bytes_per_session.map_or("?".to_string(), |b| format!("{b:.0}"))
    ));
    // The next phases want idle nodes: wait until the sessions are gone.
    let deadline = Instant::now() + SESSIONS_DRAIN_TIMEOUT;
    for (_, _, client) in &nodes {
        while node_sessions(client).await.unwrap_or(0) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(r)
}

/// The `sessions` count a node reports in `/v1/cluster`.
async fn node_sessions(client: &Client) -> Option<u64> {
    match client.raw("GET", "/v1/cluster", None, None).await {
        Ok((200, body)) => body["sessions"].as_u64(),
        _ => None,
    }
}

/// What the failover phase measured.
#[derive(Clone, Debug, Default, Serialize)]
struct FailoverReport {
    kills: u32,
    /// Per kill: ms from the kill until an observer saw every shard served by a live node.
    failover_ms: Vec<u64>,
    p50_ms: Option<u64>,
    max_ms: Option<u64>,
    timeouts: u32,
    /// Longest time one client went without an ack while it had messages outstanding.
    max_client_gap_ms: u64,
    /// (seconds since the bench started, node) of each kill.
    kills_at: Vec<(f64, String)>,
}

async fn failover_phase(
    ctx: &Ctx,
    args: &BenchArgs,
    cluster: &mut LocalCluster,
    urls: &[String],
    users: &[TrafficUser],
) -> anyhow::Result<(PhaseReport, FailoverReport)> {
    let per_client = args.failover_rate as f64 / users.len().max(1) as f64;
    let mode = Mode { in_flight: 0, rate: Some(per_client), reconnect: true, group: None };
    let mut log = crate::drill::faults::FaultLog::default();
    let plan = crate::drill::faults::FaultPlan {
        every: Some(Duration::from_secs(args.kill_every_secs.max(1))),
        freeze_every: 0,
        restart_after: Duration::from_millis(args.restart_after_ms),
        freeze_for: Duration::from_millis(LEASE_TTL_MS),
        postgres_every: 0,
        postgres_restart_cmd: None,
        probe: None,
    };
    let stats = crate::drill::sim::Stats::default();
    let warmup = Duration::from_millis(args.warmup_ms);
    let duration = Duration::from_secs(args.failover_secs);
    let log_ref = &mut log;
    let cluster_ref = &mut *cluster;
    let mut r = run_traffic(
        ctx,
        args,
        "failover",
        urls,
        users,
        mode,
        args.failover_secs,
        FAILOVER_DRAIN_MS,
        &Probes::default(),
        |start| async move {
            let from = start + warmup;
            *log_ref = crate::drill::faults::run(cluster_ref, &plan, from, from + duration, &stats).await?;
            Ok(())
        },
    )
    .await?;
    crate::drill::faults::ensure_all_running(cluster).await?;
    r.rate_target = Some(args.failover_rate as u64);
    let mut sorted = log.failover_ms.clone();
    sorted.sort_unstable();
    let kills = log
        .killed
        .iter()
        .map(|(at, name)| (round(at.duration_since(ctx.bench_start).as_secs_f64(), 2), name.clone()))
        .collect();
    let f = FailoverReport {
        kills: log.kills,
        p50_ms: sorted.get(sorted.len().saturating_sub(1) / 2).copied(),
        max_ms: sorted.last().copied(),
        failover_ms: log.failover_ms,
        timeouts: log.failover_timeouts,
        max_client_gap_ms: r.max_client_gap_ms,
        kills_at: kills,
    };
    Ok((r, f))
}

/// What the history phase measured.
#[derive(Clone, Debug, Default, Serialize)]
struct HistoryReport {
    /// Messages stored in the conversation read.
    messages: u64,
    seed_secs: f64,
    page: u32,
    readers: u32,
    pages: u64,
    page_errors: u64,
    pages_per_s: f64,
    latency: Percentiles,
}

/// A page size the issue names: 100 messages.
const HISTORY_PAGE: u32 = 100;

async fn history_phase(
    ctx: &Ctx,
    args: &BenchArgs,
    urls: &[String],
    seeded: &seed::Seeded,
) -> anyhow::Result<HistoryReport> {
    let spec = LoadSpec {
        worker: 0,
        work: Work::History(HistorySpec {
            urls: urls.to_vec(),
            token: seeded.token.clone(),
            conversation: seeded.conversation.to_string(),
            last_seq: seeded.messages,
            readers: args.history_readers,
            page: HISTORY_PAGE,
            warmup_ms: args.warmup_ms,
            duration_ms: args.duration_secs * 1000,
        }),
    };
    let mut workers = Workers::spawn(ctx, "history", vec![spec])?;
    let ready = workers.ready(READY_TIMEOUT).await?;
    if let Some(e) = ready.iter().find_map(|r| r.first_error.clone()) {
        say(format!("history: a reader failed to connect: {e}"));
    }
    let start_ms = parley_storage::now_ms() + GO_DELAY.as_millis() as i64;
    workers.tell_all(&format!("go {start_ms}")).await?;
    let wait = Duration::from_millis(args.warmup_ms) + Duration::from_secs(args.duration_secs) + RESULT_MARGIN;
    let m = merge(&workers.results(wait).await?)?;
    let r = HistoryReport {
        messages: seeded.messages,
        seed_secs: round(seeded.secs, 1),
        page: HISTORY_PAGE,
        readers: args.history_readers,
        pages: m.r.pages,
        page_errors: m.r.page_errors,
        pages_per_s: round(m.r.pages as f64 / args.duration_secs as f64, 1),
        latency: Percentiles::of(&m.ack),
    };
    say(format!(
        "history: {} pages of {} from {} messages, p50/p99 {}/{} ms, {} errors",
        r.pages, r.page, r.messages, r.latency.p50_ms, r.latency.p99_ms, r.page_errors
    ));
    Ok(r)
}

/// The relay and the cluster at one closed-loop window.
#[derive(Clone, Debug, Default, Serialize)]
struct ClosedLoopRow {
    in_flight: u32,
    relay_msgs_per_s: Option<f64>,
    durable_msgs_per_s: Option<f64>,
    ratio_to_relay: Option<f64>,
}

/// `--in-flight`: windows in 1..=1000, at least one, none twice.
fn parse_windows(list: &str) -> anyhow::Result<Vec<u32>> {
    let mut windows = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let w: u32 = part.parse().map_err(|_| anyhow::anyhow!("--in-flight: `{part}` is not a number"))?;
        if w == 0 || w > 1_000 || windows.contains(&w) {
            bail!("--in-flight: windows must be distinct and in 1..=1000");
        }
        windows.push(w);
    }
    if windows.is_empty() {
        bail!("--in-flight needs at least one window");
    }
    Ok(windows)
}

/// The report: the keys the issue asks for at the top, the details below.
#[derive(Debug, Default, Serialize)]
struct Report {
    date: String,
    machine: Machine,
    store: &'static str,
    nodes: u16,
    shards: u16,
    clients: u32,
    /// The closed-loop window of the headline numbers below (see `closed_loop` for every window).
    in_flight: u32,
    body_bytes: usize,
    load_processes: u32,
    scenarios: Vec<String>,
    closed_loop: Vec<ClosedLoopRow>,
    relay_msgs_per_s: Option<f64>,
    durable_msgs_per_s: Option<f64>,
    ratio_to_relay: Option<f64>,
    p99_deliver_ms_at_10k: Option<f64>,
    sessions_held: Option<u64>,
    rss_bytes_per_session: Option<f64>,
    failover_ms_p50: Option<u64>,
    groups: &'static str,
    group_fanout: Option<GroupFanout>,
    phases: Vec<PhaseReport>,
    sessions: Option<SessionsReport>,
    failover: Option<FailoverReport>,
    history: Option<HistoryReport>,
    media: Option<media::MediaReport>,
    plot: Option<String>,
    run_dir: String,
}

/// The group fan-out phases in brief: the phase that delivered the most, and its p99.
#[derive(Clone, Debug, Default, Serialize)]
struct GroupFanout {
    members: u32,
    senders: u32,
    /// Offered msg/s into the group of that phase.
    rate_target: Option<u64>,
    deliveries_per_s: f64,
    p99_deliver_ms: Option<f64>,
}

impl Report {
    fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
        let m = &self.machine;
        let mut out = format!(
            "\n== parley bench {} — {} nodes, {} store, {} shards, {} clients ==\n\
             machine  {} × {} cores, {:.1} GiB, kernel {}, load {} → {}\n\n",
            self.date,
            self.nodes,
            self.store,
            self.shards,
            self.clients,
            m.cpu_model,
            m.cores,
            m.memory_bytes as f64 / (1u64 << 30) as f64,
            m.kernel,
            m.loadavg_start,
            m.loadavg_end
        );
        out.push_str(&format!(
            "{:<12} {:>6} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7}\n",
            "phase",
            "loop",
            "msg/s",
            "dlv/s",
            "ack p50",
            "ack p99",
            "dlv p50",
            "dlv p90",
            "dlv p99",
            "dlv p99.9",
            "dlv max",
            "srv µs",
            "pg µs",
            "box cores",
            "events"
        ));
        for p in &self.phases {
            let mut events = match (p.peers_declared_silent, p.shards_lost) {
                (Some(silent), Some(lost)) => format!("{silent}/{lost}"),
                _ => "-".to_string(),
            };
            if let Some(n) = p.postgres_checkpoints {
                events.push_str(&format!("/{n}"));
            }
            out.push_str(&format!(
                "{:<12} {:>6} {:>10.0} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7}\n",
                p.name,
                p.loop_kind,
                p.msgs_per_s,
                p.deliveries_per_s,
                p.ack_ms.p50_ms,
                p.ack_ms.p99_ms,
                p.deliver_ms.p50_ms,
                p.deliver_ms.p90_ms,
                p.deliver_ms.p99_ms,
                p.deliver_ms.p999_ms,
                p.deliver_ms.max_ms,
                opt(p.server_cpu_us_per_msg),
                opt(p.postgres_cpu_us_per_msg),
                opt(p.machine_cores_busy),
                events,
            ));
        }
        out.push_str(
            "events: peers declared silent / shards lost, summed over the nodes (0/0 without faults) \
             [/ Postgres checkpoints during the phase]\n",
        );
        let waits: Vec<String> = self
            .phases
            .iter()
            .filter_map(|p| p.settle_ms.map(|ms| format!("{} {:.1}s", p.name, ms as f64 / 1000.0)))
            .collect();
        if !waits.is_empty() {
            out.push_str(&format!("waited for a quiet cluster before: {}\n", waits.join(", ")));
        }
        out.push('\n');
        if self.closed_loop.len() > 1 {
            for row in &self.closed_loop {
                out.push_str(&format!(
                    "closed loop, {:>4} in flight per client: relay {} msg/s, durable {} msg/s, ratio {}\n",
                    row.in_flight,
                    opt(row.relay_msgs_per_s),
                    opt(row.durable_msgs_per_s),
                    opt(row.ratio_to_relay)
                ));
            }
        }
        out.push_str(&format!(
            "relay {} msg/s, durable {} msg/s, ratio {}{}; p99 send→deliver at 10k: {} ms\n",
            opt(self.relay_msgs_per_s),
            opt(self.durable_msgs_per_s),
            opt(self.ratio_to_relay),
            if self.closed_loop.is_empty() {
                String::new()
            } else {
                format!(" (best window: {} in flight)", self.in_flight)
            },
            opt(self.p99_deliver_ms_at_10k)
        ));
        if let Some(s) = &self.sessions {
            out.push_str(&format!(
                "sessions {} held (per node {:?}, target {}), {} failed, {} B RSS/session, {:.0} handshakes/s\n",
                s.held_server,
                s.held_per_node,
                s.target_per_node,
                s.failed,
                opt(s.rss_bytes_per_session),
                s.connect_per_s
            ));
        }
        if let Some(f) = &self.failover {
            out.push_str(&format!(
                "failover {} kills, ms {:?}, p50 {} max {}, longest client gap {} ms\n",
                f.kills,
                f.failover_ms,
                f.p50_ms.map_or("-".into(), |v| v.to_string()),
                f.max_ms.map_or("-".into(), |v| v.to_string()),
                f.max_client_gap_ms
            ));
        }
        if let Some(h) = &self.history {
            out.push_str(&format!(
                "history  {} msgs stored, {}-message pages p50 {} ms p99 {} ms ({} pages/s, {} errors)\n",
                h.messages, h.page, h.latency.p50_ms, h.latency.p99_ms, h.pages_per_s, h.page_errors
            ));
        }
        if let Some(m) = &self.media {
            out.push_str(&format!(
                "media    {} uploads of a {} JPEG ({} B), {} at a time: as a picture p50 {} ms p99 {} ms ({}/s), \
                 as bytes p50 {} ms p99 {} ms ({}/s); thumbnail {} B; {} errors\n",
                m.uploads,
                m.photo_pixels,
                m.photo_bytes,
                m.concurrency,
                m.picture.latency.p50_ms,
                m.picture.latency.p99_ms,
                m.picture.uploads_per_s,
                m.opaque.latency.p50_ms,
                m.opaque.latency.p99_ms,
                m.opaque.uploads_per_s,
                m.thumbnail_bytes.map_or("-".into(), |b| b.to_string()),
                m.picture.errors + m.opaque.errors
            ));
        }
        match &self.group_fanout {
            Some(g) => out.push_str(&format!(
                "groups   {} members, {} sending: best {} deliveries/s at {} msg/s, p99 send→deliver {} ms\n",
                g.members,
                g.senders,
                g.deliveries_per_s,
                g.rate_target.map_or("-".into(), |r| r.to_string()),
                opt(g.p99_deliver_ms)
            )),
            None => out.push_str(&format!("groups   {}\n", self.groups)),
        }
        if let Some(p) = &self.plot {
            out.push_str(&format!("plot     {p}\n"));
        }
        out.push_str(&format!("run dir  {}\n", self.run_dir));
        out
    }
}
