//! `ShardActor`: the single ordering point of one shard's conversations while this node holds the
//! shard's lease under `epoch`.
//!
//! Sends arrive in the order sessions cast them; the shard keeps that order, groups everything that
//! arrived while the previous commit was in the database into the next batch (group commit: one
//! transaction, one fsync, for up to `limits.max_batch` messages), hands the batch to its
//! `StoreActor`, and when the commit comes back: pushes each message to the members' live sessions,
//! *then* acks the sender (so an acked message has always been fanned out once), and pushes
//! receipts. Sequence numbers are assigned inside the store's transaction in batch order, which
//! makes them gapless even when a transaction fails.
//!
//! Supervision: the shard spawns its `StoreActor` linked; if the store dies the shard stops
//! (escalates) and the manager restarts both under a new epoch.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parley_protocol::cluster::{
    Delivery, ReceiptCommand, SendCommand, SendOutcome, StoredAck, SyncReply, SyncRequest, UserEvent,
};
use parley_protocol::frames::{MessageView, ReceiptKind};
use parley_protocol::media::MediaRef;
use parley_protocol::{ConversationId, Epoch, ErrorCode, MessageId, Seq, ShardId, UserId};
use parley_storage::{
    now_ms, Committed, CursorUpdate, GroupFloor, MessageResult, NewMessage, ShardStore, ShardSummary, WriteBatch,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::actors::store::{CommitOutcome, StoreActor, StoreArgs, StoreMsg};
use crate::context::NodeContext;
use crate::push;

/// Receipts that may wait for the next commit; more are dropped (receipts are cumulative, so the
/// next one from the same device supersedes a dropped one).
const MAX_PENDING_RECEIPTS: usize = 10_000;
/// Sends that may wait for the next commit before new ones are refused as `unavailable`. Bounds
/// the memory a burst (or a stalled database) can pin.
const MAX_PENDING_SENDS: usize = 100_000;
/// Entries of the "last receipt fanned out" cache before it is cleared.
const RECEIPT_CACHE_MAX: usize = 100_000;
/// Recent (seq, sender) pairs kept per group, from which a group receipt learns whose messages
/// it covers. A receipt reaching further back than this tells only the senders still remembered.
const GROUP_SENDERS_KEPT: usize = 64;
/// Groups whose recent senders are kept before that map is cleared (≈1.5 KB each when full).
const GROUP_SENDERS_MAX: usize = 10_000;

pub struct ShardActor;

pub struct ShardArgs {
    pub ctx: Arc<NodeContext>,
    pub shard: ShardId,
    pub epoch: Epoch,
    pub store: Arc<dyn ShardStore>,
}

struct PendingSend {
    cmd: SendCommand,
    message_id: MessageId,
    sent_at_ms: i64,
    reply: AckTo,
}

/// Where a send's outcome goes.
pub enum AckTo {
    /// A session or HTTP request of this node, waiting on a reply port.
    Local(RpcReplyPort<SendOutcome>),
    /// A send that came in a peer's `SendBatch` (`outbound.rs`): its outcome goes back to that
    /// node in a `SendResults`, together with the other outcomes for it of the same moment.
    Remote { node: Arc<str>, id: u64 },
}

/// Outcomes handed out together: local ones at once, remote ones collected per origin node and
/// cast as one `SendResults` each by [`Answers::finish`] — one cluster frame per node per commit
/// instead of one per message.
#[derive(Default)]
struct Answers {
    remote: Vec<(Arc<str>, Vec<SendResult>)>,
}

/// A remote send's id and outcome, as `SendResults` carries it.
type SendResult = (u64, SendOutcome);

impl Answers {
    fn answer(&mut self, to: AckTo, outcome: SendOutcome) {
        match to {
            AckTo::Local(port) => {
                let _ = port.send(outcome);
            }
            // A handful of peers: a linear search beats hashing the name.
            AckTo::Remote { node, id } => match self.remote.iter_mut().find(|(n, _)| *n == node) {
                Some((_, results)) => results.push((id, outcome)),
                None => self.remote.push((node, vec![(id, outcome)])),
            },
        }
    }

    fn finish(self, ctx: &NodeContext) {
        for (node, results) in self.remote {
            ctx.send_results(&node, results);
        }
    }
}

/// Answer one send by itself.
fn answer(ctx: &NodeContext, to: AckTo, outcome: SendOutcome) {
    let mut answers = Answers::default();
    answers.answer(to, outcome);
    answers.finish(ctx);
}

/// Refuse every one of `sends` with `code`, remote ones in one `SendResults` per node.
fn refuse(ctx: &NodeContext, sends: impl IntoIterator<Item = PendingSend>, code: ErrorCode) {
    let mut answers = Answers::default();
    for p in sends {
        answers.answer(p.reply, SendOutcome::Refused(code));
    }
    answers.finish(ctx);
}

pub struct ShardState {
    ctx: Arc<NodeContext>,
    shard: ShardId,
    epoch: Epoch,
    store: ActorRef<StoreMsg>,
    pending: VecDeque<PendingSend>,
    pending_receipts: Vec<ReceiptCommand>,
    /// The batch in the database right now, if any.
    in_flight: Option<(Vec<PendingSend>, Vec<ReceiptCommand>)>,
    /// Set once a drain was asked for: answer these when nothing is left, then stop.
    draining: Option<Vec<RpcReplyPort<()>>>,
    receipts_sent: HashMap<(ConversationId, UserId, ReceiptKind), Seq>,
    /// Per group: the senders of its latest messages committed here, oldest first.
    group_senders: HashMap<ConversationId, VecDeque<(Seq, UserId)>>,
}

#[derive(RactorMessage)]
pub enum ShardMsg {
    Send {
        cmd: SendCommand,
        reply: AckTo,
    },
    Receipt(ReceiptCommand),
    /// From the store: the in-flight batch's fate.
    Committed {
        outcome: CommitOutcome,
    },
    History {
        conversation: ConversationId,
        before_seq: Option<Seq>,
        limit: u32,
        reply: RpcReplyPort<Result<(Vec<MessageView>, bool), ErrorCode>>,
    },
    Sync {
        req: SyncRequest,
        reply: RpcReplyPort<Result<SyncReply, ErrorCode>>,
    },
    Summaries {
        user: UserId,
        conversations: Vec<ConversationId>,
        reply: RpcReplyPort<Result<Vec<ShardSummary>, ErrorCode>>,
    },
    GroupFloors {
        groups: Vec<(ConversationId, Vec<UserId>)>,
        reply: RpcReplyPort<Result<Vec<GroupFloor>, ErrorCode>>,
    },
    /// Stop taking sends, finish what is queued, answer, stop. Used for hand-off and shutdown.
    Drain {
        reply: RpcReplyPort<()>,
    },
}

impl ShardState {
    /// Start the next commit if the store is idle and there is something to write.
    fn flush(&mut self, me: &ActorRef<ShardMsg>) {
        if self.in_flight.is_some() || (self.pending.is_empty() && self.pending_receipts.is_empty()) {
            return;
        }
        let take = self.pending.len().min(self.ctx.config.limits.max_batch);
        let sends: Vec<PendingSend> = self.pending.drain(..take).collect();
        let receipts = std::mem::take(&mut self.pending_receipts);
        let batch = WriteBatch {
            messages: sends
                .iter()
                .map(|p| NewMessage {
                    message_id: p.message_id,
                    conversation_id: p.cmd.conversation_id,
                    sender: p.cmd.sender,
                    client_msg_id: p.cmd.client_msg_id.clone(),
                    body: p.cmd.body.clone(),
                    sent_at_ms: p.sent_at_ms,
                    media: p.cmd.media.clone(),
                })
                .collect(),
            cursors: receipts
                .iter()
                .map(|r| CursorUpdate {
                    conversation_id: r.conversation_id,
                    user: r.user,
                    device: Some(r.device.clone()),
                    kind: r.kind,
                    seq: r.seq,
                })
                .collect(),
        };
        match self.store.cast(StoreMsg::Commit { epoch: self.epoch, batch, reply_to: me.clone() }) {
            Ok(()) => self.in_flight = Some((sends, receipts)),
            Err(_) => {
                // The store is gone; our supervisor hears of it. Nothing was written.
                refuse(&self.ctx, sends, ErrorCode::Unavailable);
            }
        }
    }

    fn committed(&mut self, results: Committed, sends: Vec<PendingSend>, receipts: Vec<ReceiptCommand>) {
        // The whole commit is fanned out at once (one cluster frame per peer), *then* its senders
        // are acked: an acked message has always been pushed at least once.
        let mut deliveries = Vec::with_capacity(sends.len() + receipts.len());
        let mut acks = Vec::with_capacity(sends.len());
        for (p, result) in sends.into_iter().zip(results.messages) {
            let SendCommand { sender, client_msg_id, members, body, origin_session, media, .. } = p.cmd;
            let (ack, body, media) = match result {
                MessageResult::Stored(ack) => {
                    if ack.conversation_id.is_group() {
                        self.remember_sender(ack.conversation_id, ack.seq, sender);
                    }
                    self.notify_offline(&members, sender, &ack, &body, media.as_ref());
                    (ack, body, media)
                }
                // A retry: its stored original is pushed again, with this commit's fan-out and
                // before the ack, since the retry may follow a crash between commit and fan-out.
                // The original as the commit read it, never the retry's own body; and in bulk, so
                // a resend storm after a failover costs what as many new messages do.
                MessageResult::Duplicate { ack, original } => (ack, original.body, original.media),
            };
            let view = MessageView {
                message_id: ack.message_id,
                conversation_id: ack.conversation_id,
                seq: ack.seq,
                sender,
                client_msg_id,
                body,
                sent_at_ms: ack.sent_at_ms,
                media,
            };
            deliveries.push(Delivery { users: members, event: UserEvent::Message(view), skip_session: origin_session });
            acks.push((p.reply, ack));
        }
        // Receipts announce the seq as stored, clamped to the conversation's last message: a client
        // claiming to have read the future does not make the sender's messages look read.
        for (r, seq) in receipts.into_iter().zip(results.cursors) {
            let key = (r.conversation_id, r.user, r.kind);
            let before = self.receipts_sent.get(&key).copied().unwrap_or(0);
            if seq == 0 || before >= seq {
                continue;
            }
            if self.receipts_sent.len() >= RECEIPT_CACHE_MAX {
                self.receipts_sent.clear();
            }
            self.receipts_sent.insert(key, seq);
            // A direct chat's receipt names both members; a group's names none, and goes to the
            // reader's own devices and to the senders of the messages it covers.
            let users = if r.members.is_empty() { self.covered_senders(&r, before, seq) } else { r.members };
            let event = UserEvent::Receipt { conversation_id: r.conversation_id, user_id: r.user, kind: r.kind, seq };
            deliveries.push(Delivery { users, event, skip_session: 0 });
        }
        self.ctx.fan_out_all(deliveries);
        let mut answers = Answers::default();
        for (reply, ack) in acks {
            answers.answer(reply, SendOutcome::Stored(ack));
        }
        answers.finish(&self.ctx);
    }

    /// Queue a push notification for each member other than the sender who is online nowhere
    /// in the cluster (`push.rs`); the others get the message through the fan-out.
    fn notify_offline(
        &self,
        members: &[UserId],
        sender: UserId,
        ack: &StoredAck,
        body: &str,
        media: Option<&MediaRef>,
    ) {
        if !self.ctx.push.enabled() {
            return;
        }
        let offline = self.ctx.presence.offline_among(members.iter().copied().filter(|m| *m != sender));
        if offline.is_empty() {
            return;
        }
        let preview = self.ctx.push.preview(body);
        for user in offline {
            self.ctx.push.enqueue(push::Job {
                user,
                conversation_id: ack.conversation_id,
                message_id: ack.message_id,
                seq: ack.seq,
                sender,
                preview: preview.clone(),
                media_mime: media.map(|m| m.mime.clone()),
                sent_at_ms: ack.sent_at_ms,
                count: 1,
            });
        }
    }

    fn remember_sender(&mut self, conversation: ConversationId, seq: Seq, sender: UserId) {
        if self.group_senders.len() >= GROUP_SENDERS_MAX && !self.group_senders.contains_key(&conversation) {
            self.group_senders.clear();
        }
        let recent = self.group_senders.entry(conversation).or_default();
        if recent.len() >= GROUP_SENDERS_KEPT {
            recent.pop_front();
        }
        recent.push_back((seq, sender));
    }

    /// The reader and the (remembered) senders of the group's messages in `(after, upto]`.
    fn covered_senders(&self, r: &ReceiptCommand, after: Seq, upto: Seq) -> Vec<UserId> {
        let mut users = vec![r.user];
        for (seq, sender) in self.group_senders.get(&r.conversation_id).into_iter().flatten() {
            if *seq > after && *seq <= upto && !users.contains(sender) {
                users.push(*sender);
            }
        }
        users
    }

    fn refuse_all(&mut self, code: ErrorCode) {
        let in_flight = self.in_flight.take().map(|(sends, _)| sends).unwrap_or_default();
        refuse(&self.ctx, in_flight.into_iter().chain(self.pending.drain(..)), code);
    }

    fn idle(&self) -> bool {
        self.in_flight.is_none() && self.pending.is_empty() && self.pending_receipts.is_empty()
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(&self, me: ActorRef<ShardMsg>, args: ShardArgs) -> Result<ShardState, ActorProcessingErr> {
        // The history cache (if the shard's group has a Redis) lives exactly as long as this
        // actor and its epoch: a successor never reads what this one cached.
        let cache = args.ctx.stores.cache(args.shard).map(|c| c.shard(args.shard, args.epoch));
        let (store, _) =
            Actor::spawn_linked(None, StoreActor, StoreArgs { store: args.store, cache }, me.get_cell()).await?;
        tracing::info!(shard = %args.shard, epoch = %args.epoch, "shard serving");
        Ok(ShardState {
            ctx: args.ctx,
            shard: args.shard,
            epoch: args.epoch,
            store,
            pending: VecDeque::new(),
            pending_receipts: Vec::new(),
            in_flight: None,
            draining: None,
            receipts_sent: HashMap::new(),
            group_senders: HashMap::new(),
        })
    }

    async fn post_stop(&self, _me: ActorRef<ShardMsg>, state: &mut ShardState) -> Result<(), ActorProcessingErr> {
        state.refuse_all(ErrorCode::Unavailable);
        state.store.stop(None);
        tracing::info!(shard = %state.shard, epoch = %state.epoch, "shard stopped");
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Send { cmd, reply } => {
                if state.draining.is_some() || state.pending.len() >= MAX_PENDING_SENDS {
                    answer(&state.ctx, reply, SendOutcome::Refused(ErrorCode::Unavailable));
                } else {
                    state.pending.push_back(PendingSend {
                        cmd,
                        message_id: MessageId::new(),
                        sent_at_ms: now_ms(),
                        reply,
                    });
                    state.flush(&me);
                }
            }
            ShardMsg::Receipt(r) => {
                if state.pending_receipts.len() < MAX_PENDING_RECEIPTS {
                    state.pending_receipts.push(r);
                    state.flush(&me);
                }
            }
            ShardMsg::Committed { outcome } => {
                let Some((sends, receipts)) = state.in_flight.take() else {
                    return Ok(());
                };
                match outcome {
                    CommitOutcome::Committed(results) => state.committed(results, sends, receipts),
                    CommitOutcome::StaleEpoch => {
                        state.in_flight = Some((sends, receipts));
                        state.refuse_all(ErrorCode::Unavailable);
                        me.stop(Some("lease lost (stale epoch)".into()));
                        return Ok(());
                    }
                    CommitOutcome::Failed(_) => {
                        // Outcome unknown: the client retries with the same client_msg_id and the
                        // idempotency key makes that safe.
                        refuse(&state.ctx, sends, ErrorCode::Unavailable);
                    }
                }
                state.flush(&me);
            }
            ShardMsg::History { conversation, before_seq, limit, reply } => {
                let _ = state.store.cast(StoreMsg::History { conversation, before_seq, limit, reply });
            }
            ShardMsg::Sync { req, reply } => {
                let _ = state.store.cast(StoreMsg::Sync { req, reply });
            }
            ShardMsg::Summaries { user, conversations, reply } => {
                let _ = state.store.cast(StoreMsg::Summaries { user, conversations, reply });
            }
            ShardMsg::GroupFloors { groups, reply } => {
                let _ = state.store.cast(StoreMsg::GroupFloors { groups, reply });
            }
            ShardMsg::Drain { reply } => {
                state.draining.get_or_insert_with(Vec::new).push(reply);
            }
        }
        if state.draining.is_some() && state.idle() {
            for r in state.draining.take().into_iter().flatten() {
                let _ = r.send(());
            }
            me.stop(Some("drained".into()));
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<ShardMsg>,
        evt: SupervisionEvent,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        // Policy: escalate. The store is this shard's only way to persist; without it every send
        // would hang, so the shard stops and its manager restarts the pair under a new epoch.
        match evt {
            SupervisionEvent::ActorFailed(_, err) => {
                tracing::error!(shard = %state.shard, error = %err, "store actor failed; stopping shard");
                me.stop(Some("store failed".into()));
            }
            SupervisionEvent::ActorTerminated(..) if state.draining.is_none() => {
                me.stop(Some("store stopped".into()));
            }
            _ => {}
        }
        Ok(())
    }
}
