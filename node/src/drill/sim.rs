//! One simulated client of `parley drill`: a user with one device and one WebSocket, sending to
//! its partner at a fixed rate and receiving the partner's messages, as a well-behaved app would.
//!
//! It owns the client side of the delivery contract (PROTOCOL.md §4): one send in flight at a
//! time (so the order of its acks is defined), the same `client_msg_id` on every retry, a
//! reconnect to the next node after `unavailable`, a timeout or a closed socket, dedupe of pushed
//! messages by `message_id`, and cumulative `delivered` acks for the seqs it holds without a gap.
//! What it was promised (acks) and what it received are handed to `verify` at the end.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parley_protocol::frames::{ClientFrame, MessageView, ServerFrame};
use parley_protocol::{ClientMsgId, ConversationId, ErrorCode, MessageId, Seq, UserId};
use tokio::time::Instant;

use crate::client::{Client, ClientError, Connection};

/// How long a send waits for its ack before the outcome counts as unknown and it is resent
/// elsewhere. Well under the server's own shard call timeout (10 s), so a client notices a frozen
/// node before the node itself gives up.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting and `hello` → `welcome`. A frozen node accepts TCP (the kernel does) but never
/// answers the upgrade; this bounds the wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause after a refused attempt or after every node failed to connect, so that a client waiting
/// out a failover does not spin.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// A `delivered` frame is tiny; if it cannot be written in this time the socket is stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The final reconnect sync of one device: welcome, the replay, `sync_done`.
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);
/// Final sync attempts, each on the next node; a sync can report a conversation as truncated
/// when its shard could not answer, and a retry a moment later gets it.
const SYNC_ATTEMPTS: usize = 5;

/// Counters every client adds to, read by the progress line and the report.
#[derive(Default)]
pub struct Stats {
    pub acked: AtomicU64,
    pub resends: AtomicU64,
    /// Resends caused by an `unavailable` answer.
    pub unavailable: AtomicU64,
    pub faults: AtomicU64,
}

/// What a client needs to run.
pub struct SimSpec {
    pub index: usize,
    pub user: UserId,
    pub token: String,
    pub partner: UserId,
    pub device: String,
    /// Every node, in config order; the client starts at `first_node` and moves on on failure.
    pub nodes: Vec<Client>,
    pub first_node: usize,
    /// Time between sends (1 / rate).
    pub interval: Duration,
    pub stop_sending_at: Instant,
    /// After this, an unacked message is abandoned.
    pub give_up_at: Instant,
    pub stats: Arc<Stats>,
}

/// An acked message, as the ack described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentRecord {
    pub client_msg_id: String,
    pub seq: Seq,
    pub message_id: MessageId,
}

/// What a client was promised and what it received.
pub struct SimOutcome {
    pub user: UserId,
    pub token: String,
    pub device: String,
    pub first_node: usize,
    /// Acked messages in send order.
    pub sent: Vec<SentRecord>,
    /// Messages abandoned without an ack at `give_up_at`.
    pub unacked: u64,
    /// Messages refused with a non-retryable error.
    pub refused: u64,
    /// Longest time from a send's first failed attempt to its ack.
    pub max_gap: Duration,
    /// When the client stopped (its last message acked or abandoned).
    pub finished_at: Instant,
    pub inbox: Inbox,
}

/// The receiving side of one device in one conversation.
pub struct Inbox {
    pub conversation: ConversationId,
    /// Every message of the conversation this device was given (live or by sync), by id.
    pub seen: HashMap<MessageId, Seq>,
    /// Seqs this device holds: pushed messages and its own acked ones.
    held: SeqPrefix,
    /// The highest `delivered` sent on the current connection.
    delivered_sent: Seq,
}

/// The seqs of a conversation a device holds, and how far they run without a gap: that is the
/// most it may acknowledge with the cumulative `delivered`.
#[derive(Debug, Default)]
pub struct SeqPrefix {
    contiguous: Seq,
    above: BTreeSet<Seq>,
}

impl SeqPrefix {
    pub fn insert(&mut self, seq: Seq) {
        if seq <= self.contiguous {
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }

    /// Every seq in `1..=contiguous()` is held.
    pub fn contiguous(&self) -> Seq {
        self.contiguous
    }
}

impl Inbox {
    fn new(conversation: ConversationId) -> Inbox {
        Inbox { conversation, seen: HashMap::new(), held: SeqPrefix::default(), delivered_sent: 0 }
    }

    fn record(&mut self, m: &MessageView) {
        self.seen.insert(m.message_id, m.seq);
        self.held.insert(m.seq);
    }
}

/// How one attempt of a send ended.
enum Attempt {
    Acked(SentRecord),
    /// Outcome unknown: resend the same id (elsewhere).
    Retry {
        unavailable: bool,
    },
    Refused(ErrorCode),
}

struct Sim {
    spec: SimSpec,
    conn: Option<Connection>,
    /// Index into `spec.nodes` of the node to use next.
    node: usize,
    inbox: Inbox,
    sent: Vec<SentRecord>,
    unacked: u64,
    refused: u64,
    max_gap: Duration,
}

/// Run one client until `give_up_at` at the latest.
pub async fn run(spec: SimSpec) -> SimOutcome {
    let conversation = ConversationId::direct(spec.user, spec.partner);
    let node = spec.first_node;
    let mut sim = Sim {
        spec,
        conn: None,
        node,
        inbox: Inbox::new(conversation),
        sent: Vec::new(),
        unacked: 0,
        refused: 0,
        max_gap: Duration::ZERO,
    };
    // Spread the first sends over one interval so that the clients do not send in lockstep.
    let mut next_send = Instant::now() + sim.spec.interval.mul_f64(rand::random::<f64>());
    let mut n = 0u64;
    loop {
        sim.idle_until(next_send.min(sim.spec.stop_sending_at)).await;
        if Instant::now() >= sim.spec.stop_sending_at {
            break;
        }
        n += 1;
        sim.send_until_acked(format!("c{}-{n}", sim.spec.index)).await;
        // After a long gap, carry on at the normal rate rather than in a burst.
        next_send = (next_send + sim.spec.interval).max(Instant::now());
    }
    let finished_at = Instant::now();
    if let Some(conn) = sim.conn.take() {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, conn.close()).await;
    }
    SimOutcome {
        user: sim.spec.user,
        token: sim.spec.token,
        device: sim.spec.device,
        first_node: sim.spec.first_node,
        sent: sim.sent,
        unacked: sim.unacked,
        refused: sim.refused,
        max_gap: sim.max_gap,
        finished_at,
        inbox: sim.inbox,
    }
}

impl Sim {
    fn next_node(&mut self) {
        self.node = (self.node + 1) % self.spec.nodes.len();
    }

    fn disconnect(&mut self) {
        // Dropping the socket is enough: the node sees it close; a frozen one finds out later.
        self.conn = None;
        self.inbox.delivered_sent = 0;
        self.next_node();
    }

    /// Connect if not connected, trying the nodes in turn. False if `limit` passed first; each
    /// attempt may run [`CONNECT_TIMEOUT`] past it. The second value: whether any attempt failed.
    async fn ensure_connected(&mut self, limit: Instant) -> (bool, bool) {
        let mut failed = 0usize;
        while self.conn.is_none() {
            if Instant::now() >= limit {
                return (false, failed > 0);
            }
            let node = &self.spec.nodes[self.node];
            match tokio::time::timeout(CONNECT_TIMEOUT, node.connect(&self.spec.token, &self.spec.device)).await {
                Ok(Ok(conn)) => self.conn = Some(conn),
                _ => {
                    failed += 1;
                    self.next_node();
                    if failed.is_multiple_of(self.spec.nodes.len()) {
                        tokio::time::sleep(RETRY_BACKOFF).await;
                    }
                }
            }
        }
        (true, failed > 0)
    }

    /// Receive until `until` (pushes, sync replays), reconnecting if the socket fails.
    async fn idle_until(&mut self, until: Instant) {
        while Instant::now() < until {
            if !self.ensure_connected(until).await.0 {
                return;
            }
            let Some(conn) = self.conn.as_mut() else { return };
            match conn.next(until.saturating_duration_since(Instant::now())).await {
                Ok(frame) => self.on_frame(frame).await,
                Err(ClientError::Timeout) => return,
                Err(_) => self.disconnect(),
            }
        }
    }

    /// Send one message, resending the same id until it is acked, refused, or `give_up_at`.
    async fn send_until_acked(&mut self, id: String) {
        let Ok(client_msg_id) = ClientMsgId::new(id.clone()) else {
            self.refused += 1;
            return;
        };
        let mut first_failure: Option<Instant> = None;
        let mut attempts = 0u32;
        loop {
            if Instant::now() >= self.spec.give_up_at {
                self.unacked += 1;
                return;
            }
            let started = Instant::now();
            let (connected, some_failed) = self.ensure_connected(self.spec.give_up_at).await;
            if some_failed {
                first_failure.get_or_insert(started);
            }
            if !connected {
                self.unacked += 1;
                return;
            }
            if attempts > 0 {
                self.spec.stats.resends.fetch_add(1, Ordering::Relaxed);
            }
            attempts += 1;
            let started = Instant::now();
            match self.attempt(&client_msg_id).await {
                Attempt::Acked(record) => {
                    if let Some(t) = first_failure {
                        self.max_gap = self.max_gap.max(t.elapsed());
                    }
                    self.spec.stats.acked.fetch_add(1, Ordering::Relaxed);
                    self.inbox.held.insert(record.seq);
                    self.sent.push(record);
                    self.ack_delivered().await;
                    return;
                }
                Attempt::Refused(code) => {
                    eprintln!("[drill] client {} message {id} refused: {code}", self.spec.index);
                    self.refused += 1;
                    return;
                }
                Attempt::Retry { unavailable } => {
                    first_failure.get_or_insert(started);
                    if unavailable {
                        self.spec.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                    self.disconnect();
                    tokio::time::sleep(RETRY_BACKOFF).await;
                }
            }
        }
    }

    /// One send on the current connection and the wait for its answer, handling whatever else
    /// arrives meanwhile.
    async fn attempt(&mut self, id: &ClientMsgId) -> Attempt {
        let frame = ClientFrame::Send {
            client_msg_id: id.clone(),
            to: Some(self.spec.partner),
            conversation_id: None,
            body: format!("drill message {id}"),
            media_id: None,
        };
        let deadline = Instant::now() + ACK_TIMEOUT;
        let Some(conn) = self.conn.as_mut() else { return Attempt::Retry { unavailable: false } };
        match tokio::time::timeout_at(deadline, conn.send(&frame)).await {
            Ok(Ok(())) => {}
            _ => return Attempt::Retry { unavailable: false },
        }
        loop {
            let Some(conn) = self.conn.as_mut() else { return Attempt::Retry { unavailable: false } };
            let frame = match conn.next(deadline.saturating_duration_since(Instant::now())).await {
                Ok(f) => f,
                Err(_) => return Attempt::Retry { unavailable: false },
            };
            match frame {
                ServerFrame::Ack { client_msg_id, seq, message_id, conversation_id, .. } if client_msg_id == *id => {
                    if conversation_id != self.inbox.conversation {
                        eprintln!(
                            "[drill] client {} message {id} acked in conversation {conversation_id}",
                            self.spec.index
                        );
                    }
                    return Attempt::Acked(SentRecord { client_msg_id: id.as_str().to_string(), seq, message_id });
                }
                ServerFrame::Error { client_msg_id: Some(c), code, .. } if c == *id => {
                    return if code.retryable() {
                        Attempt::Retry { unavailable: code == ErrorCode::Unavailable }
                    } else {
                        Attempt::Refused(code)
                    };
                }
                other => self.on_frame(other).await,
            }
        }
    }

    async fn on_frame(&mut self, frame: ServerFrame) {
        if let ServerFrame::Message { message } = frame {
            if message.conversation_id == self.inbox.conversation {
                self.inbox.record(&message);
                self.ack_delivered().await;
            }
        }
    }

    /// Tell the node this device holds everything up to the gapless prefix, if that grew.
    async fn ack_delivered(&mut self) {
        let seq = self.inbox.held.contiguous();
        if seq <= self.inbox.delivered_sent {
            return;
        }
        let Some(conn) = self.conn.as_mut() else { return };
        let frame = ClientFrame::Delivered { conversation_id: self.inbox.conversation, seq };
        match tokio::time::timeout(WRITE_TIMEOUT, conn.send(&frame)).await {
            Ok(Ok(())) => self.inbox.delivered_sent = seq,
            _ => self.disconnect(),
        }
    }
}

/// Reconnect the client's device once more and collect its reconnect sync into its inbox. False
/// if no node gave a complete sync.
pub async fn final_sync(nodes: &[Client], outcome: &mut SimOutcome) -> bool {
    for attempt in 0..SYNC_ATTEMPTS {
        let node = &nodes[(outcome.first_node + attempt) % nodes.len()];
        let complete = tokio::time::timeout(SYNC_TIMEOUT, async {
            let mut conn = node.connect(&outcome.token, &outcome.device).await?;
            loop {
                match conn.next(SYNC_TIMEOUT).await? {
                    ServerFrame::Message { message } if message.conversation_id == outcome.inbox.conversation => {
                        outcome.inbox.record(&message);
                    }
                    ServerFrame::SyncDone { truncated, .. } => {
                        let complete = !truncated.contains(&outcome.inbox.conversation);
                        conn.close().await;
                        return Ok::<bool, ClientError>(complete);
                    }
                    _ => {}
                }
            }
        })
        .await;
        if let Ok(Ok(true)) = complete {
            return true;
        }
        tokio::time::sleep(RETRY_BACKOFF * 5).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_grows_only_without_gaps() {
        let check = |seqs: &[Seq], want: Seq| {
            let mut p = SeqPrefix::default();
            for s in seqs {
                p.insert(*s);
            }
            assert_eq!(p.contiguous(), want, "{seqs:?}");
        };
        check(&[], 0);
        check(&[1], 1);
        check(&[2], 0);
        check(&[2, 3, 1], 3);
        check(&[1, 1, 2, 2], 2);
        check(&[1, 3, 4, 6], 1);
        check(&[5, 4, 3, 2, 1, 7], 5);
    }
}
