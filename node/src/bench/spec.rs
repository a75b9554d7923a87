//! What the coordinator of `parley bench` tells a load process (`parley bench-load`) and what the
//! load process answers, plus the latency histograms both sides share.
//!
//! The coordinator writes a [`LoadSpec`] as JSON to a file and starts the worker with `--spec`.
//! The worker answers on stdout with JSON lines ([`WorkerLine`]): `ready` once its connections
//! are open, then — after the coordinator writes `go <unix_ms>` (traffic, history) or `stop`
//! (sessions) on its stdin — one `result`. Histograms travel as HdrHistogram V2 bytes in base64,
//! so that the coordinator merges counts and computes percentiles once: percentiles of different
//! processes are never averaged.

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds from 1 µs to this bound (a minute); anything slower is
/// clamped to it, which is far past every timeout of the system anyway.
pub(crate) const HIST_MAX_US: u64 = 60_000_000;
/// Three significant digits: 0.1% resolution, enough to tell p99.9 apart from the maximum.
pub(crate) const HIST_SIGFIG: u8 = 3;

/// A new latency histogram (microseconds) with the bounds every process uses, so merging never
/// needs to resize.
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG).expect("static histogram bounds are valid")
}

/// Histogram → base64 of its V2 serialization.
pub(crate) fn encode_hist(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new().serialize(h, &mut bytes).expect("serializing into a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Base64 V2 → histogram.
pub(crate) fn decode_hist(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
    let h: Histogram<u64> =
        Deserializer::new().deserialize(&mut bytes.as_slice()).map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
    Ok(h)
}

/// Merge `from` into `into` (same bounds; values beyond them are clamped by construction).
pub(crate) fn merge_hist(into: &mut Histogram<u64>, from: &Histogram<u64>) -> anyhow::Result<()> {
    into.add(from).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))
}

/// The spec file of one load process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LoadSpec {
    /// Index of this worker (names its devices and its log lines).
    pub worker: u32,
    pub work: Work,
}

/// What a load process does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Work {
    Traffic(TrafficSpec),
    Sessions(SessionsSpec),
    History(HistorySpec),
}

/// 1:1 traffic between pairs of clients: client `2k` and `2k+1` of the list talk to each other.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TrafficSpec {
    /// Tag of the phase (its name and its number in the run: unique even when a name repeats);
    /// in every client message id and body, so that messages replayed from an earlier phase by a
    /// reconnect sync are recognised and ignored, and no send is taken for an earlier one's retry.
    pub phase: String,
    /// `ws://host:port/v1/ws` of every node (or of the relay).
    pub urls: Vec<String>,
    pub clients: Vec<ClientSpec>,
    /// Closed loop: messages in flight per client (a new send for each ack). Ignored when
    /// `rate_per_client` is set.
    pub in_flight: u32,
    /// Open loop: messages per second each client sends on a fixed schedule, whatever the acks.
    pub rate_per_client: Option<f64>,
    /// Sends before the end of the warm-up are not measured.
    pub warmup_ms: u64,
    /// Measured sending time after the warm-up.
    pub duration_ms: u64,
    /// After sending stops, how long to wait for outstanding acks and deliveries.
    pub drain_ms: u64,
    /// Reconnect (to the next URL) and resend unacked messages when a connection drops.
    pub reconnect: bool,
    /// Bytes of each message body (a send timestamp, the phase tag, padding).
    pub body_bytes: usize,
    /// Width of the time-series buckets of send→deliver latency.
    pub bucket_ms: u64,
    /// Source address of the client sockets (127.0.0.x).
    pub source: Option<std::net::IpAddr>,
    /// Group fan-out: every client is a member of this group; senders send into it and every
    /// member's deliveries (from any other member) are measured. `None`: 1:1 pairs.
    #[serde(default)]
    pub conversation: Option<String>,
}

/// One simulated client of a traffic phase.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ClientSpec {
    pub user: String,
    pub token: String,
    pub device: String,
    /// Index into `urls` of the first node to connect to.
    pub url: usize,
    /// Whether this client sends (a group's members mostly only receive).
    #[serde(default = "sends_by_default")]
    pub sends: bool,
}

fn sends_by_default() -> bool {
    true
}

/// Idle authenticated sessions held against one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SessionsSpec {
    pub url: String,
    /// Tokens to log in with, used round-robin; each session gets its own device id.
    pub tokens: Vec<String>,
    pub sessions: u32,
    /// Source addresses to bind the client sockets to, round-robin (each has its own ports).
    pub sources: Vec<std::net::IpAddr>,
    /// Handshakes in flight at once.
    pub concurrency: u32,
    /// Hold the sessions at most this long if no `stop` arrives.
    pub hold_ms: u64,
}

/// Closed-loop history page reads of one conversation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct HistorySpec {
    pub urls: Vec<String>,
    pub token: String,
    pub conversation: String,
    /// Highest seq of the conversation: pages are read before a random seq up to it.
    pub last_seq: u64,
    pub readers: u32,
    pub page: u32,
    pub warmup_ms: u64,
    pub duration_ms: u64,
}

/// One line a load process writes on stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WorkerLine {
    Ready(Ready),
    Result(Box<WorkerResult>),
}

/// Connections are open (or failed for good).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Ready {
    pub connected: u64,
    pub failed: u64,
    /// Seconds from the first connect to the last handshake.
    pub connect_secs: f64,
    pub first_error: Option<String>,
}

/// What a load process measured. Counters are summed over workers, histograms merged.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    /// Sends issued in the measured window.
    pub sent: u64,
    /// Acks that arrived in the measured window (throughput).
    pub acked_in_window: u64,
    /// Length of the measured window, ms.
    pub window_ms: u64,
    /// Sends of the measured window never acked by the end of the drain.
    pub unacked: u64,
    pub delivered: u64,
    /// `error` frames answering a send (`unavailable` ones are resent, the others counted only).
    pub errors: u64,
    pub unavailable: u64,
    pub reconnects: u64,
    /// Open loop: sends skipped because the client already had its maximum in flight.
    pub skipped: u64,
    /// Longest time between two acks of one client (or from the start to its first ack), ms.
    pub max_gap_ms: u64,
    /// send→ack of sends in the measured window, base64 V2 histogram (µs).
    pub ack_hist: String,
    /// send→deliver, same.
    pub deliver_hist: String,
    /// (bucket index since the phase start, histogram) of send→deliver by arrival time; whole
    /// phase including warm-up and drain.
    pub timeline: Vec<(u64, String)>,
    /// History reads: page round trips and short/failed pages.
    pub pages: u64,
    pub page_errors: u64,
    /// CPU time this process used (user + system), ms.
    pub cpu_ms: u64,
}
