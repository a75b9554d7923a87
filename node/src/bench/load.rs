//! `parley bench-load`: one load process of `parley bench` (hidden subcommand).
//!
//! It reads a [`LoadSpec`] from the file named by `--spec`, opens its WebSockets, says `ready` on
//! stdout, waits for the coordinator's `go <unix_ms>` (or `stop`) on stdin, runs, and writes one
//! `result` line (see [`super::spec`]). It runs on a single-threaded runtime: on a small machine one
//! thread per load process wastes less CPU on cross-thread wake-ups than a pool, and the
//! coordinator scales load by starting more processes.
//!
//! Latency clocks: the send time is taken from the system clock (µs since the Unix epoch) and put
//! into the message body, so the recipient — possibly in another load process on the same host —
//! computes send→deliver against the same clock. Open-loop sends are timed from their *scheduled*
//! instant, so a stalled server shows up as latency instead of silently slowing the load
//! (coordinated omission).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures_util::stream::{self, StreamExt as _};
use futures_util::SinkExt as _;
use hdrhistogram::Histogram;
use parley_protocol::frames::ClientFrame;
use parley_protocol::{DeviceId, PROTOCOL_VERSION};
use serde::Deserialize;
use tokio::io::AsyncBufReadExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::machine;
use super::spec::{
    encode_hist, new_hist, HistorySpec, LoadSpec, Ready, SessionsSpec, TrafficSpec, Work, WorkerLine, WorkerResult,
};

/// Options of `parley bench-load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The JSON spec file written by the coordinator.
    #[arg(long)]
    pub spec: PathBuf,
}

/// Handshakes (TCP + WebSocket upgrade + hello) in flight at once per traffic or history worker:
/// enough to open a thousand clients in well under a second, few enough not to trip the accept
/// backlog of a node.
const CONNECT_CONCURRENCY: usize = 64;
/// A handshake (TCP, upgrade, hello → welcome, and for sessions the reconnect sync) slower than
/// this counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Open loop: a client with this many unacked messages skips its next sends (counted) instead of
/// queueing without bound when the server stalls.
const OPEN_LOOP_MAX_IN_FLIGHT: usize = 5_000;
/// Pause between reconnect attempts of one client while a node is down.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// An `unavailable` send is resent after a pause (same client message id): the shard is moving.
/// The pause starts here and doubles while answers stay `unavailable`, up to [`RESEND_PAUSE_MAX`];
/// an ack resets it. Without the back-off, a thousand clients resending every few milliseconds
/// through a failover would be a retry storm on the surviving nodes (and not what a real client
/// does).
const RESEND_PAUSE: Duration = Duration::from_millis(25);
const RESEND_PAUSE_MAX: Duration = Duration::from_millis(400);
/// A client tells the server what this device holds (`delivered`, cumulative) at most this often,
/// as the protocol asks of every client. Without it every reconnect sync would replay up to
/// `MAX_SYNC_PER_CONVERSATION` messages the client already had — after the open-loop phases, a
/// thousand messages per client per kill, which is what the failover phase measured in a full
/// run instead of the failover (BENCHMARKS.md, session 8). Once a second keeps the receipts at
/// a small fraction of the frames (≈1 per 10-13 messages received at the measured rates).
const DELIVERED_EVERY: Duration = Duration::from_secs(1);
/// How long the coordinator may take to say `go` after `ready`; past it the worker gives up
/// rather than holding sockets forever.
const GO_TIMEOUT: Duration = Duration::from_secs(600);
/// A group member leaves this long after the last frame it got once the sending stopped (it
/// cannot know how many deliveries are still on their way).
const GROUP_QUIET: Duration = Duration::from_secs(1);
/// Time-series histograms need less precision than the totals: two significant digits.
const TIMELINE_SIGFIG: u8 = 2;

type Ws = WebSocketStream<TcpStream>;

/// Entry point: build a single-threaded runtime on a thread of its own and run the spec there.
pub fn run_blocking(args: LoadArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.spec).with_context(|| format!("reading {}", args.spec.display()))?;
    let spec: LoadSpec = serde_json::from_str(&text).context("parsing the load spec")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        match spec.work {
            Work::Traffic(t) => traffic(spec.worker, t).await,
            Work::Sessions(s) => sessions(spec.worker, s).await,
            Work::History(h) => history(spec.worker, h).await,
        }
    })
}

/// Write one protocol line on stdout (the coordinator reads it; nothing else goes there).
fn emit(line: &WorkerLine) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(line)?)?;
    out.flush()?;
    Ok(())
}

/// Wait for the coordinator's next command line on stdin (`None`: stdin closed or timeout).
async fn command(lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>) -> Option<String> {
    match tokio::time::timeout(GO_TIMEOUT, lines.next_line()).await {
        Ok(Ok(Some(l))) => Some(l),
        _ => None,
    }
}

fn stdin_lines() -> tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>> {
    tokio::io::BufReader::new(tokio::io::stdin()).lines()
}

/// Microseconds since the Unix epoch: the clock every load process on the host shares.
fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// The monotonic instant of a Unix time in µs (for sleeping until the agreed start).
fn instant_at(unix_us: i64) -> Instant {
    let delta = unix_us - now_us();
    if delta <= 0 {
        Instant::now()
    } else {
        Instant::now() + Duration::from_micros(delta as u64)
    }
}

/// TCP (bound to `source` when given) + WebSocket upgrade.
async fn open_ws(url: &str, source: Option<IpAddr>) -> anyhow::Result<Ws> {
    let host = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("not a ws:// url: {url}"))?;
    let addr: SocketAddr = host.parse().with_context(|| format!("{host} is not an ip:port"))?;
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).with_context(|| format!("binding {ip}"))?;
    }
    let stream = socket.connect(addr).await.with_context(|| format!("connecting {addr}"))?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(super::relay::ws_config()))
        .await
        .context("websocket upgrade")?;
    Ok(ws)
}

/// The parts of a server frame the load processes look at, borrowed from the text.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    /// A pushed message (`message` frames), or the human-readable text of an `error` frame.
    #[serde(default, borrow)]
    message: Option<MessageField<'a>>,
    #[serde(default, borrow)]
    req_id: Option<Cow<'a, str>>,
    /// A page's messages (`history`), or a count (`sync_done`).
    #[serde(default)]
    messages: Option<MessagesField>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessagesField {
    List(Vec<serde::de::IgnoredAny>),
    Count(#[allow(dead_code)] u64),
}

#[derive(Deserialize)]
struct IncomingMessage<'a> {
    seq: u64,
    #[serde(borrow)]
    conversation_id: Cow<'a, str>,
    #[serde(borrow)]
    sender: Cow<'a, str>,
    #[serde(borrow)]
    body: Cow<'a, str>,
}

/// The `message` key means a message object in `message` frames and a sentence in `error` frames.
/// Typed as only the object, every error frame failed to parse and was dropped — `unavailable`
/// answers were never seen, so their sends waited for the next reconnect instead of being resent.
/// A hand-written visitor (not `#[serde(untagged)]`) keeps the hot path zero-copy: untagged enums
/// buffer the value before trying each variant.
enum MessageField<'a> {
    Message(IncomingMessage<'a>),
    Text,
}

impl<'de: 'a, 'a> Deserialize<'de> for MessageField<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = MessageField<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message object or an error text")
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MessageField::Text)
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
                let message = IncomingMessage::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(MessageField::Message(message))
            }
        }
        deserializer.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

/// Open a socket and authenticate; with `until_sync_done`, also wait for the reconnect sync to end
/// (what a real client does before it counts as online).
async fn handshake(
    url: &str,
    source: Option<IpAddr>,
    token: &str,
    device: &str,
    until_sync_done: bool,
) -> anyhow::Result<Ws> {
    let attempt = async {
        let mut ws = open_ws(url, source).await?;
        let hello = ClientFrame::Hello {
            protocol: PROTOCOL_VERSION,
            token: token.to_string(),
            device_id: DeviceId::new(device)?,
        };
        ws.send(Message::text(hello.encode())).await?;
        let mut welcomed = false;
        while let Some(msg) = ws.next().await {
            let Message::Text(text) = msg? else { continue };
            let frame: Incoming<'_> = serde_json::from_str(text.as_str())?;
            match frame.kind.as_ref() {
                "welcome" if !until_sync_done => return Ok(ws),
                "welcome" => welcomed = true,
                "sync_done" if welcomed => return Ok(ws),
                "error" => bail!("hello refused: {text}"),
                _ => {}
            }
        }
        bail!("connection closed during the handshake")
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await.map_err(|_| anyhow::anyhow!("handshake timed out"))?
}

/// What every traffic client of this process adds to, behind one (uncontended: single-threaded
/// runtime) lock.
struct Shared {
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    timeline: Vec<Histogram<u64>>,
    result: WorkerResult,
}

impl Shared {
    fn deliver_at(&mut self, bucket: usize, latency_us: u64) {
        while self.timeline.len() <= bucket {
            self.timeline.push(
                Histogram::new_with_bounds(1, super::spec::HIST_MAX_US, TIMELINE_SIGFIG)
                    .expect("static histogram bounds are valid"),
            );
        }
        self.timeline[bucket].saturating_record(latency_us);
    }
}

/// The phase clock of a traffic run, in µs since the Unix epoch.
#[derive(Clone, Copy)]
struct Clock {
    start: i64,
    measure_from: i64,
    stop_sending: i64,
    give_up: i64,
    bucket_us: i64,
}

async fn traffic(worker: u32, spec: TrafficSpec) -> anyhow::Result<()> {
    if spec.conversation.is_none() && !spec.clients.len().is_multiple_of(2) {
        bail!("traffic clients come in pairs; got {}", spec.clients.len());
    }
    let spec = Arc::new(spec);
    let connect_started = Instant::now();
    let opened: Vec<(usize, anyhow::Result<Ws>)> = stream::iter(0..spec.clients.len())
        .map(|i| {
            let spec = spec.clone();
            async move {
                let c = &spec.clients[i];
                (i, handshake(&spec.urls[c.url % spec.urls.len()], spec.source, &c.token, &c.device, false).await)
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut ready = Ready { connect_secs: connect_started.elapsed().as_secs_f64(), ..Ready::default() };
    let mut sockets: Vec<Option<Ws>> = (0..spec.clients.len()).map(|_| None).collect();
    for (i, r) in opened {
        match r {
            Ok(ws) => {
                ready.connected += 1;
                sockets[i] = Some(ws);
            }
            Err(e) => {
                ready.failed += 1;
                ready.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    emit(&WorkerLine::Ready(ready))?;
    let mut lines = stdin_lines();
    let Some(go) = command(&mut lines).await else { bail!("worker {worker}: no `go` from the coordinator") };
    let start_ms: i64 =
        go.strip_prefix("go ").and_then(|s| s.trim().parse().ok()).context("expected `go <unix_ms>`")?;
    let start = start_ms * 1000;
    let measure_from = start + spec.warmup_ms as i64 * 1000;
    let clock = Clock {
        start,
        measure_from,
        stop_sending: measure_from + spec.duration_ms as i64 * 1000,
        give_up: measure_from + (spec.duration_ms + spec.drain_ms) as i64 * 1000,
        bucket_us: spec.bucket_ms.max(1) as i64 * 1000,
    };
    let shared = Arc::new(Mutex::new(Shared {
        ack: new_hist(),
        deliver: new_hist(),
        timeline: Vec::new(),
        result: WorkerResult { window_ms: spec.duration_ms, ..WorkerResult::default() },
    }));
    let mut tasks = Vec::new();
    for (i, ws) in sockets.into_iter().enumerate() {
        let Some(ws) = ws else { continue };
        let client = TrafficClient::new(spec.clone(), i, clock, shared.clone());
        tasks.push(tokio::spawn(client.run(ws)));
    }
    for t in tasks {
        t.await.context("a traffic client panicked")?;
    }
    let shared = Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("clients still running"))?;
    let shared = shared.into_inner().map_err(|_| anyhow::anyhow!("poisoned stats"))?;
    let mut result = shared.result;
    result.ack_hist = encode_hist(&shared.ack);
    result.deliver_hist = encode_hist(&shared.deliver);
    result.timeline = shared
        .timeline
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .map(|(b, h)| (b as u64, encode_hist(h)))
        .collect();
    result.cpu_ms = machine::self_cpu_ms();
    emit(&WorkerLine::Result(Box::new(result)))
}

/// One simulated client of a traffic phase.
struct TrafficClient {
    spec: Arc<TrafficSpec>,
    index: usize,
    /// 1:1: the partner, whose messages are measured. Group: this client's own user, whose
    /// messages are not (every other member's are).
    partner_user: String,
    /// Whether this client sends at all (see [`ClientSpec::sends`](super::spec::ClientSpec)).
    sends: bool,
    /// When the last frame arrived: a group member stays until the traffic has been quiet for
    /// [`GROUP_QUIET`] after the sending stopped.
    last_frame: Instant,
    url: usize,
    clock: Clock,
    shared: Arc<Mutex<Shared>>,
    /// Unacked sends: id → send time (µs; the scheduled time in open loop).
    pending: HashMap<u64, i64>,
    /// `unavailable` answers to resend (same id) at `resend_at`.
    resend: Vec<u64>,
    resend_at: Option<Instant>,
    /// The pause before the next resend (see [`RESEND_PAUSE`]).
    resend_pause: Duration,
    next_id: u64,
    /// Highest seq of the partner's messages seen (pushes can repeat after a reconnect).
    seen_seq: u64,
    /// The conversation with the partner (learned from its first message) and the highest seq
    /// this device has told the server it holds.
    conversation: Option<String>,
    delivered_seq: u64,
    last_ack_us: i64,
    max_gap_us: i64,
    padding: String,
}

impl TrafficClient {
    fn new(spec: Arc<TrafficSpec>, index: usize, clock: Clock, shared: Arc<Mutex<Shared>>) -> Self {
        let partner_user = match spec.conversation {
            Some(_) => spec.clients[index].user.clone(),
            None => spec.clients[index ^ 1].user.clone(),
        };
        let url = spec.clients[index].url;
        let sends = spec.clients[index].sends;
        let conversation = spec.conversation.clone();
        // Body: "<send µs, 16 digits> <phase> " + padding to the requested size.
        let fixed = 16 + 1 + spec.phase.len() + 1;
        let padding = "x".repeat(spec.body_bytes.saturating_sub(fixed).max(1));
        TrafficClient {
            spec,
            index,
            partner_user,
            sends,
            last_frame: Instant::now(),
            url,
            clock,
            shared,
            pending: HashMap::new(),
            resend: Vec::new(),
            resend_at: None,
            resend_pause: RESEND_PAUSE,
            next_id: 0,
            seen_seq: 0,
            conversation,
            delivered_seq: 0,
            last_ack_us: clock.measure_from,
            max_gap_us: 0,
            padding,
        }
    }

    fn frame(&self, id: u64, sent_us: i64) -> String {
        let target = match &self.spec.conversation {
            Some(group) => format!(r#""conversation_id":"{group}""#),
            None => format!(r#""to":"{}""#, self.partner_user),
        };
        format!(
            r#"{{"type":"send","client_msg_id":"{}-{id}",{target},"body":"{sent_us:016} {} {}"}}"#,
            self.spec.phase, self.spec.phase, self.padding
        )
    }

    /// Whether a pushed message is one this client measures.
    fn measures(&self, m: &IncomingMessage<'_>) -> bool {
        match &self.spec.conversation {
            Some(group) => m.conversation_id == group.as_str() && m.sender != self.partner_user,
            None => m.sender == self.partner_user,
        }
    }

    /// A group member is done once the sending stopped and nothing came for a while.
    fn quiet_at(&self) -> Instant {
        self.last_frame.max(instant_at(self.clock.stop_sending)) + GROUP_QUIET
    }

    /// Issue a new message (its send time is `sent_us`).
    async fn send_new(&mut self, ws: &mut Ws, sent_us: i64) -> bool {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, sent_us);
        if sent_us >= self.clock.measure_from && sent_us < self.clock.stop_sending {
            self.lock().result.sent += 1;
        }
        ws.send(Message::text(self.frame(id, sent_us))).await.is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn in_window(&self, sent_us: i64) -> bool {
        sent_us >= self.clock.measure_from && sent_us < self.clock.stop_sending
    }

    async fn run(mut self, ws: Ws) {
        let mut ws = Some(ws);
        let clock = self.clock;
        tokio::time::sleep_until(instant_at(clock.start)).await;
        let start_instant = Instant::now();
        let open_period = self.spec.rate_per_client.map(|r| Duration::from_secs_f64(1.0 / r));
        // Spread the clients' schedules over one period so that they do not send in lockstep.
        let mut ticker = open_period.map(|p| {
            let offset = p.mul_f64((self.index as f64 * 0.618_033_988_7).fract());
            tokio::time::interval_at(start_instant + offset, p)
        });
        if !self.sends {
            ticker = None;
        }
        if ticker.is_none() && self.sends {
            if let Some(w) = ws.as_mut() {
                for _ in 0..self.spec.in_flight.max(1) {
                    if !self.send_new(w, now_us()).await {
                        break;
                    }
                }
            }
        }
        let stop_sending = instant_at(clock.stop_sending);
        let give_up = instant_at(clock.give_up);
        let mut delivered_tick = tokio::time::interval(DELIVERED_EVERY);
        delivered_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sending = Instant::now() < stop_sending;
            // Every member of a group (senders too) listens until the deliveries stop: a sender
            // whose own acks are in may still have other senders' last messages on their way.
            let listening = self.spec.conversation.is_some() && Instant::now() < self.quiet_at();
            if !sending && self.pending.is_empty() && !listening {
                break;
            }
            let Some(w) = ws.as_mut() else {
                if !self.spec.reconnect || Instant::now() >= give_up {
                    break;
                }
                ws = self.reconnect(give_up).await;
                continue;
            };
            tokio::select! {
                msg = w.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        if !self.on_text(w, text.as_str()).await {
                            ws = None;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => ws = None,
                    Some(Ok(_)) => {}
                },
                at = async { ticker.as_mut().expect("guarded by the branch condition").tick().await }, if sending && ticker.is_some() => {
                    let scheduled = clock.start + (at - start_instant).as_micros() as i64;
                    if self.pending.len() >= OPEN_LOOP_MAX_IN_FLIGHT {
                        self.lock().result.skipped += 1;
                    } else if !self.send_new(w, scheduled).await {
                        ws = None;
                    }
                }
                _ = tokio::time::sleep_until(self.resend_at.unwrap_or(give_up)), if self.resend_at.is_some() => {
                    self.resend_at = None;
                    let ids = std::mem::take(&mut self.resend);
                    for id in ids {
                        if let Some(&sent) = self.pending.get(&id) {
                            if w.send(Message::text(self.frame(id, sent))).await.is_err() {
                                ws = None;
                                break;
                            }
                        }
                    }
                }
                _ = delivered_tick.tick() => {
                    if !self.acknowledge_delivered(w).await {
                        ws = None;
                    }
                }
                _ = tokio::time::sleep_until(stop_sending), if sending => {}
                _ = tokio::time::sleep_until(self.quiet_at()), if !sending && listening => {}
                _ = tokio::time::sleep_until(give_up) => break,
            }
        }
        let end = now_us().min(clock.stop_sending);
        let gap = (end - self.last_ack_us).max(0);
        let unacked = self.pending.values().filter(|&&s| self.in_window(s)).count() as u64;
        let mut shared = self.lock();
        shared.result.unacked += unacked;
        let max_gap = self.max_gap_us.max(if self.pending.is_empty() { 0 } else { gap });
        shared.result.max_gap_ms = shared.result.max_gap_ms.max((max_gap / 1000) as u64);
    }

    /// Tell the server this device holds the partner's messages up to `seen_seq` (if that moved);
    /// `false` when the connection is unusable.
    async fn acknowledge_delivered(&mut self, ws: &mut Ws) -> bool {
        let Some(conversation) = self.conversation.as_deref() else { return true };
        if self.seen_seq <= self.delivered_seq {
            return true;
        }
        self.delivered_seq = self.seen_seq;
        let frame =
            format!(r#"{{"type":"delivered","conversation_id":"{conversation}","seq":{}}}"#, self.delivered_seq);
        ws.send(Message::text(frame)).await.is_ok()
    }

    /// Handle one server frame; `false` when the connection is unusable.
    async fn on_text(&mut self, ws: &mut Ws, text: &str) -> bool {
        self.last_frame = Instant::now();
        let Ok(frame) = serde_json::from_str::<Incoming<'_>>(text) else { return true };
        let now = now_us();
        match frame.kind.as_ref() {
            "ack" => {
                let Some(id) = frame.client_msg_id.as_deref().and_then(|c| self.own_id(c)) else { return true };
                let Some(sent) = self.pending.remove(&id) else { return true };
                self.resend_pause = RESEND_PAUSE;
                if now >= self.clock.measure_from && now <= self.clock.stop_sending {
                    self.max_gap_us = self.max_gap_us.max(now - self.last_ack_us.max(self.clock.measure_from));
                    self.last_ack_us = now;
                }
                let measured = self.in_window(sent);
                {
                    let mut shared = self.lock();
                    if now >= self.clock.measure_from && now <= self.clock.stop_sending {
                        shared.result.acked_in_window += 1;
                    }
                    if measured {
                        shared.ack.saturating_record((now - sent).max(1) as u64);
                    }
                }
                // Closed loop: one new send per ack while the phase lasts.
                if self.spec.rate_per_client.is_none() && now < self.clock.stop_sending {
                    return self.send_new(ws, now).await;
                }
            }
            "message" => {
                let Some(MessageField::Message(m)) = frame.message else { return true };
                if !self.measures(&m) || m.seq <= self.seen_seq {
                    return true;
                }
                self.seen_seq = m.seq;
                if self.conversation.is_none() {
                    self.conversation = Some(m.conversation_id.into_owned());
                }
                let mut parts = m.body.splitn(3, ' ');
                let (Some(sent), Some(phase)) = (parts.next(), parts.next()) else { return true };
                if phase != self.spec.phase {
                    return true;
                }
                let Ok(sent) = sent.parse::<i64>() else { return true };
                let latency = (now - sent).max(1) as u64;
                let bucket = ((now - self.clock.start).max(0) / self.clock.bucket_us) as usize;
                let measured = self.in_window(sent);
                let mut shared = self.lock();
                shared.deliver_at(bucket, latency);
                if measured {
                    shared.result.delivered += 1;
                    shared.deliver.saturating_record(latency);
                }
            }
            "error" => {
                let Some(id) = frame.client_msg_id.as_deref().and_then(|c| self.own_id(c)) else { return true };
                if frame.code.as_deref() == Some("unavailable") {
                    self.lock().result.unavailable += 1;
                    self.resend.push(id);
                    if self.resend_at.is_none() {
                        self.resend_at = Some(Instant::now() + self.resend_pause);
                        self.resend_pause = (self.resend_pause * 2).min(RESEND_PAUSE_MAX);
                    }
                } else {
                    self.lock().result.errors += 1;
                    self.pending.remove(&id);
                }
            }
            _ => {}
        }
        true
    }

    fn own_id(&self, client_msg_id: &str) -> Option<u64> {
        let (phase, n) = client_msg_id.rsplit_once('-')?;
        if phase != self.spec.phase {
            return None;
        }
        n.parse().ok()
    }

    /// Connect to the next node (rotating) until one takes us or `give_up`; then resend everything
    /// unacked with its original id, in order.
    async fn reconnect(&mut self, give_up: Instant) -> Option<Ws> {
        let c = self.spec.clients[self.index].clone();
        while Instant::now() < give_up {
            self.url = (self.url + 1) % self.spec.urls.len();
            let attempt = handshake(&self.spec.urls[self.url], self.spec.source, &c.token, &c.device, false);
            match tokio::time::timeout_at(give_up, attempt).await {
                Ok(Ok(mut ws)) => {
                    self.lock().result.reconnects += 1;
                    let mut ids: Vec<(u64, i64)> = self.pending.iter().map(|(&id, &s)| (id, s)).collect();
                    ids.sort_unstable();
                    self.resend.clear();
                    self.resend_at = None;
                    for (id, sent) in ids {
                        if ws.send(Message::text(self.frame(id, sent))).await.is_err() {
                            break;
                        }
                    }
                    return Some(ws);
                }
                _ => tokio::time::sleep(RECONNECT_PAUSE).await,
            }
        }
        None
    }
}

async fn sessions(worker: u32, spec: SessionsSpec) -> anyhow::Result<()> {
    if spec.tokens.is_empty() {
        bail!("sessions need at least one token");
    }
    let spec = Arc::new(spec);
    let started = Instant::now();
    let opened: Vec<anyhow::Result<Ws>> = stream::iter(0..spec.sessions as usize)
        .map(|j| {
            let spec = spec.clone();
            async move {
                let source = (!spec.sources.is_empty()).then(|| spec.sources[j % spec.sources.len()]);
                let device = format!("s{worker}-{j}");
                handshake(&spec.url, source, &spec.tokens[j % spec.tokens.len()], &device, true).await
            }
        })
        .buffer_unordered(spec.concurrency.max(1) as usize)
        .collect()
        .await;
    let mut ready = Ready { connect_secs: started.elapsed().as_secs_f64(), ..Ready::default() };
    let mut holders = Vec::new();
    for r in opened {
        match r {
            Ok(mut ws) => {
                ready.connected += 1;
                // Keep reading: that answers the server's keep-alive pings.
                holders.push(tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }));
            }
            Err(e) => {
                ready.failed += 1;
                ready.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    emit(&WorkerLine::Ready(ready))?;
    let mut lines = stdin_lines();
    let _ = tokio::time::timeout(Duration::from_millis(spec.hold_ms), command(&mut lines)).await;
    for h in &holders {
        h.abort();
    }
    emit(&WorkerLine::Result(Box::new(WorkerResult { cpu_ms: machine::self_cpu_ms(), ..WorkerResult::default() })))
}

async fn history(worker: u32, spec: HistorySpec) -> anyhow::Result<()> {
    let spec = Arc::new(spec);
    let mut ready = Ready::default();
    let started = Instant::now();
    let mut sockets = Vec::new();
    for r in 0..spec.readers as usize {
        // A new device replays the conversation's newest messages (reconnect sync) first.
        let device = format!("h{worker}-{r}");
        match handshake(&spec.urls[r % spec.urls.len()], None, &spec.token, &device, true).await {
            Ok(ws) => {
                ready.connected += 1;
                sockets.push(ws);
            }
            Err(e) => {
                ready.failed += 1;
                ready.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    ready.connect_secs = started.elapsed().as_secs_f64();
    emit(&WorkerLine::Ready(ready))?;
    let mut lines = stdin_lines();
    let Some(go) = command(&mut lines).await else { bail!("worker {worker}: no `go` from the coordinator") };
    let start_ms: i64 =
        go.strip_prefix("go ").and_then(|s| s.trim().parse().ok()).context("expected `go <unix_ms>`")?;
    let measure_from = start_ms * 1000 + spec.warmup_ms as i64 * 1000;
    let stop = measure_from + spec.duration_ms as i64 * 1000;
    let shared = Arc::new(Mutex::new(Shared {
        ack: new_hist(),
        deliver: new_hist(),
        timeline: Vec::new(),
        result: WorkerResult { window_ms: spec.duration_ms, ..WorkerResult::default() },
    }));
    let mut tasks = Vec::new();
    for (r, mut ws) in sockets.into_iter().enumerate() {
        let spec = spec.clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(instant_at(start_ms * 1000)).await;
            let mut n: u64 = 0;
            while now_us() < stop {
                n += 1;
                let req_id = format!("h{r}-{n}");
                let lowest = spec.page as u64 + 1;
                let before = if spec.last_seq + 1 > lowest {
                    rand::Rng::gen_range(&mut rand::thread_rng(), lowest..=spec.last_seq + 1)
                } else {
                    lowest
                };
                let frame = format!(
                    r#"{{"type":"history","req_id":"{req_id}","conversation_id":"{}","before_seq":{before},"limit":{}}}"#,
                    spec.conversation, spec.page
                );
                let sent = now_us();
                if ws.send(Message::text(frame)).await.is_err() {
                    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).result.page_errors += 1;
                    return;
                }
                let got = loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            let Ok(f) = serde_json::from_str::<Incoming<'_>>(t.as_str()) else { continue };
                            if f.req_id.as_deref() == Some(req_id.as_str()) {
                                break Some(f.kind == "history" && matches!(&f.messages, Some(MessagesField::List(m)) if m.len() == spec.page as usize));
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break None,
                    }
                };
                let done = now_us();
                let mut s = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match got {
                    None => {
                        s.result.page_errors += 1;
                        return;
                    }
                    Some(false) => s.result.page_errors += 1,
                    Some(true) if sent >= measure_from => {
                        s.result.pages += 1;
                        s.ack.saturating_record((done - sent).max(1) as u64);
                    }
                    Some(true) => {}
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("a history reader panicked")?;
    }
    let shared = Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("readers still running"))?;
    let shared = shared.into_inner().map_err(|_| anyhow::anyhow!("poisoned stats"))?;
    let mut result = shared.result;
    result.ack_hist = encode_hist(&shared.ack);
    result.cpu_ms = machine::self_cpu_ms();
    emit(&WorkerLine::Result(Box::new(result)))
}

#[cfg(test)]
mod tests {
    use parley_protocol::frames::{MessageView, ServerFrame};
    use parley_protocol::{ClientMsgId, ConversationId, ErrorCode, MessageId, UserId};

    use super::{Incoming, MessageField};

    fn wire(frame: &ServerFrame) -> String {
        serde_json::to_string(frame).expect("server frames serialize")
    }

    /// The load client must see `unavailable` answers (it resends on them); it used to drop every
    /// error frame because their `message` is a sentence, not a message object.
    #[test]
    fn error_frames_are_understood() {
        let text = wire(&ServerFrame::Error {
            code: ErrorCode::Unavailable,
            message: "shard 7 is moving; retry".into(),
            client_msg_id: Some(ClientMsgId::new("failover-42").unwrap()),
            req_id: None,
        });
        let frame: Incoming<'_> = serde_json::from_str(&text).expect("an error frame parses");
        assert_eq!(frame.kind, "error");
        assert_eq!(frame.code.as_deref(), Some("unavailable"));
        assert_eq!(frame.client_msg_id.as_deref(), Some("failover-42"));
        assert!(matches!(frame.message, Some(MessageField::Text)));
    }

    #[test]
    fn pushed_messages_are_understood() {
        let (a, b) = (UserId::random(), UserId::random());
        let text = wire(&ServerFrame::Message {
            message: MessageView {
                message_id: MessageId::new(),
                conversation_id: ConversationId::direct(a, b),
                seq: 17,
                sender: a,
                client_msg_id: ClientMsgId::new("durable-3").unwrap(),
                body: "0000001795313380 durable \"quoted\" xx".into(),
                sent_at_ms: 1,
                media: None,
            },
        });
        let frame: Incoming<'_> = serde_json::from_str(&text).expect("a message frame parses");
        assert_eq!(frame.kind, "message");
        let Some(MessageField::Message(m)) = frame.message else { panic!("no message object") };
        assert_eq!(m.seq, 17);
        assert_eq!(m.sender, a.to_string());
        assert_eq!(m.body, "0000001795313380 durable \"quoted\" xx");
    }
}
