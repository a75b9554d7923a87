//! Sends bound for shards that peers serve, batched per peer.
//!
//! Why. A remote send used to be one ractor_cluster request and one reply. On each side of the
//! link such a message passes through several mailboxes (remote-actor proxy, node session, socket
//! session, writer; then reader, socket session, node session, gateway), the owner spawned a task
//! per send to await its shard, and the reply took the same road back — per message. Here the
//! sessions of a node drop their sends into one queue per peer; a task per peer takes everything
//! queued when it runs and casts it as one `SendBatch`; the owner's shards answer with one
//! `SendResults` per commit per origin node (`actors/shard.rs`, `Answers`). Under light load a
//! batch holds one send and leaves at once (no timer, no added wait); under load batches grow
//! with the backlog: the same natural batching as the shards' group commit.
//!
//! Order. One session's sends enter its peer's queue in the order the client sent them, batches
//! leave in queue order over one connection, and the owner's gateway hands a batch's sends to
//! their shards in batch order: a client's sends reach the shard in the order it sent them.
//!
//! Failure. An outcome that never comes (the peer died, the frame was lost, the shard moved) is
//! "outcome unknown": the waiter times out (`limits.shard_call_timeout_ms`) and the client retries
//! under the same `client_msg_id`, which the idempotency key makes safe. A peer that leaves the
//! live set fails its waiters at once as `unavailable` ([`Outbound::retain_peers`], called with
//! the live set on every heartbeat), as the dropped reply ports of ractor_cluster did before.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use parley_protocol::cluster::{NodePayload, RemoteSend, SendCommand, SendOutcome};
use parley_protocol::{codec, ErrorCode};
use ractor::{ActorId, ActorRef};
use tokio::sync::{mpsc, oneshot};

use crate::actors::gateway::GatewayMsg;

/// A batch stops growing at this many sends...
pub const MAX_BATCH_SENDS: usize = 1_024;

/// ...or once its bodies reach this many bytes, keeping every frame far below the node payload
/// limit (`codec::MAX_NODE_PAYLOAD_BYTES`, 32 MiB) whatever the bodies' sizes (≤ 64 KiB each).
pub const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;

/// This node's sends to peers' shards: one queue and batching task per peer gateway, and the
/// senders waiting for outcomes. Shared by every session (through `NodeContext`).
pub struct Outbound {
    /// Our node name: the `from` of every batch, where the owner sends the outcomes.
    node: String,
    next_id: AtomicU64,
    links: Mutex<HashMap<ActorId, mpsc::UnboundedSender<RemoteSend>>>,
    waiting: Mutex<HashMap<u64, Waiter>>,
}

struct Waiter {
    peer: ActorId,
    reply: oneshot::Sender<SendOutcome>,
}

impl Outbound {
    pub fn new(node: String) -> Arc<Self> {
        Arc::new(Outbound {
            node,
            // Random start: outcomes meant for an earlier life of this node (same name, restarted)
            // cannot match a waiter of this one.
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            links: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
        })
    }

    /// Queue `cmd` for the peer whose gateway is `gateway`. Sends queued by one caller leave in
    /// the order they were queued. Must be called inside a Tokio runtime (the first send to a
    /// peer starts its batching task).
    pub fn send(self: &Arc<Self>, gateway: &ActorRef<GatewayMsg>, cmd: SendCommand) -> RemoteAck {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer = gateway.get_id();
        let (reply, rx) = oneshot::channel();
        lock(&self.waiting).insert(id, Waiter { peer, reply });
        let ack = RemoteAck { id, outbound: self.clone(), rx };
        let mut links = lock(&self.links);
        let queue = links.entry(peer).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run_link(self.node.clone(), gateway.clone(), rx, Arc::downgrade(self)));
            tx
        });
        if queue.send(RemoteSend { id, cmd }).is_err() {
            // The link's task is gone (its runtime is shutting down): nobody will send it.
            links.remove(&peer);
            drop(links);
            self.resolve(vec![(id, SendOutcome::Refused(ErrorCode::Unavailable))]);
        }
        ack
    }

    /// Hand outcomes from a peer's `SendResults` to their waiters. Unknown ids (a waiter that gave
    /// up, an earlier life of this node) are ignored.
    pub fn resolve(&self, results: Vec<(u64, SendOutcome)>) {
        let mut waiting = lock(&self.waiting);
        for (id, outcome) in results {
            if let Some(w) = waiting.remove(&id) {
                let _ = w.reply.send(outcome);
            }
        }
    }

    /// Keep only the links to these live gateways; every send waiting on any other peer is
    /// answered `unavailable` now (that peer is gone: its outcome will never come).
    pub fn retain_peers(&self, live: impl IntoIterator<Item = ActorId>) {
        let live: HashSet<ActorId> = live.into_iter().collect();
        lock(&self.links).retain(|peer, _| live.contains(peer));
        for (_, w) in lock(&self.waiting).extract_if(|_, w| !live.contains(&w.peer)) {
            let _ = w.reply.send(SendOutcome::Refused(ErrorCode::Unavailable));
        }
    }

    /// Sends waiting for an outcome from a peer.
    pub fn waiting(&self) -> usize {
        lock(&self.waiting).len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The outcome of one remote send. Dropping it (the wait timed out, the request was abandoned)
/// forgets the waiter, so the waiting map holds only sends someone still waits for.
pub struct RemoteAck {
    id: u64,
    outbound: Arc<Outbound>,
    rx: oneshot::Receiver<SendOutcome>,
}

impl RemoteAck {
    /// The outcome, or `None` when it did not come within `timeout` (outcome unknown).
    pub async fn outcome(mut self, timeout: Duration) -> Option<SendOutcome> {
        tokio::time::timeout(timeout, &mut self.rx).await.ok().and_then(Result::ok)
    }
}

impl Drop for RemoteAck {
    fn drop(&mut self) {
        lock(&self.outbound.waiting).remove(&self.id);
    }
}

/// One peer's batching task: take the first queued send, let the tasks that are ready run (what
/// they queue joins this batch), take everything queued up to the batch bounds, cast it. Ends when
/// the link is dropped (the peer left the live set, or the node stops).
async fn run_link(
    node: String,
    gateway: ActorRef<GatewayMsg>,
    mut queue: mpsc::UnboundedReceiver<RemoteSend>,
    outbound: Weak<Outbound>,
) {
    while let Some(first) = queue.recv().await {
        tokio::task::yield_now().await;
        let mut body_bytes = first.cmd.body.len();
        let mut sends = vec![first];
        while sends.len() < MAX_BATCH_SENDS && body_bytes < MAX_BATCH_BODY_BYTES {
            let Ok(next) = queue.try_recv() else { break };
            body_bytes += next.cmd.body.len();
            sends.push(next);
        }
        let batch = NodePayload::SendBatch { from: node.clone(), sends };
        if gateway.cast(GatewayMsg::Frame(codec::encode(&batch))).is_err() {
            let (Some(outbound), NodePayload::SendBatch { sends, .. }) = (outbound.upgrade(), batch) else { return };
            outbound.resolve(sends.into_iter().map(|s| (s.id, SendOutcome::Refused(ErrorCode::Unavailable))).collect());
        }
    }
}

#[cfg(test)]
mod tests {
    use parley_protocol::cluster::StoredAck;
    use parley_protocol::{ClientMsgId, ConversationId, MessageId, UserId};
    use ractor::{Actor, ActorProcessingErr};

    use super::*;

    /// Stands in for a peer's gateway: hands every `SendBatch` it gets to the test.
    struct FakeGateway;

    impl Actor for FakeGateway {
        type Msg = GatewayMsg;
        type State = mpsc::UnboundedSender<(String, Vec<RemoteSend>)>;
        type Arguments = mpsc::UnboundedSender<(String, Vec<RemoteSend>)>;

        async fn pre_start(
            &self,
            _me: ActorRef<GatewayMsg>,
            tx: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(tx)
        }

        async fn handle(
            &self,
            _me: ActorRef<GatewayMsg>,
            msg: GatewayMsg,
            tx: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let GatewayMsg::Frame(bytes) = msg {
                if let Ok(NodePayload::SendBatch { from, sends }) = codec::decode(&bytes) {
                    let _ = tx.send((from, sends));
                }
            }
            Ok(())
        }
    }

    fn cmd(n: usize) -> SendCommand {
        SendCommand {
            sender: UserId::random(),
            client_msg_id: ClientMsgId::new(format!("m-{n}")).expect("valid id"),
            conversation_id: ConversationId(uuid::Uuid::new_v4()),
            members: vec![],
            body: format!("body {n}"),
            origin_session: 7,
            media: None,
        }
    }

    fn stored(seq: u64) -> SendOutcome {
        SendOutcome::Stored(StoredAck {
            message_id: MessageId::new(),
            conversation_id: ConversationId(uuid::Uuid::new_v4()),
            seq,
            sent_at_ms: 1,
            duplicate: false,
        })
    }

    async fn gateway() -> (ActorRef<GatewayMsg>, mpsc::UnboundedReceiver<(String, Vec<RemoteSend>)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(None, FakeGateway, tx).await.expect("spawn fake gateway");
        (actor, rx)
    }

    /// Sends queued while the link's task could not run leave together, as one frame, in queue
    /// order, named after our node; each outcome reaches its own waiter.
    #[tokio::test(flavor = "current_thread")]
    async fn sends_queued_together_leave_as_one_batch_in_order() {
        let (peer, mut batches) = gateway().await;
        let outbound = Outbound::new("n1".into());
        let acks: Vec<RemoteAck> = (0..10).map(|n| outbound.send(&peer, cmd(n))).collect();
        let (from, sends) = batches.recv().await.expect("a batch");
        assert_eq!(from, "n1");
        let bodies: Vec<String> = sends.iter().map(|s| s.cmd.body.clone()).collect();
        assert_eq!(bodies, (0..10).map(|n| format!("body {n}")).collect::<Vec<_>>(), "one batch, in order");
        assert_eq!(outbound.waiting(), 10);
        // Answer in reverse: each waiter gets the outcome sent for its own id.
        outbound.resolve(sends.iter().rev().enumerate().map(|(i, s)| (s.id, stored(100 + i as u64))).collect());
        for (n, ack) in acks.into_iter().enumerate() {
            match ack.outcome(Duration::from_secs(1)).await {
                Some(SendOutcome::Stored(a)) => assert_eq!(a.seq, 109 - n as u64),
                other => panic!("send {n}: {other:?}"),
            }
        }
        assert_eq!(outbound.waiting(), 0);
        peer.stop(None);
    }

    /// A peer that leaves the live set answers its waiters `unavailable` at once, not after the
    /// timeout; waiters on live peers keep waiting.
    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_leaving_fails_its_waiters_at_once() {
        let (gone, _batches_gone) = gateway().await;
        let (live, _batches_live) = gateway().await;
        let outbound = Outbound::new("n1".into());
        let lost = outbound.send(&gone, cmd(1));
        let kept = outbound.send(&live, cmd(2));
        outbound.retain_peers([live.get_id()]);
        let started = std::time::Instant::now();
        assert_eq!(lost.outcome(Duration::from_secs(30)).await, Some(SendOutcome::Refused(ErrorCode::Unavailable)));
        assert!(started.elapsed() < Duration::from_secs(5), "answered at once, not at the timeout");
        assert_eq!(outbound.waiting(), 1, "the live peer's send still waits");
        drop(kept);
        gone.stop(None);
        live.stop(None);
    }

    /// A wait that times out, or is abandoned, leaves nothing behind; a late outcome for it is
    /// ignored.
    #[tokio::test(flavor = "current_thread")]
    async fn an_abandoned_wait_forgets_its_waiter() {
        let (peer, mut batches) = gateway().await;
        let outbound = Outbound::new("n1".into());
        let timed_out = outbound.send(&peer, cmd(1));
        assert_eq!(timed_out.outcome(Duration::from_millis(20)).await, None);
        drop(outbound.send(&peer, cmd(2)));
        assert_eq!(outbound.waiting(), 0);
        let (_, sends) = batches.recv().await.expect("the sends still went out");
        outbound.resolve(sends.iter().map(|s| (s.id, stored(1))).collect());
        assert_eq!(outbound.waiting(), 0);
        peer.stop(None);
    }
}
