//! `GatewayActor`: this node's one network-visible actor. Peers reach our shards and sessions
//! only through it (ractor_cluster actor messaging — never HTTP proxying), and we reach theirs
//! through their gateways, found in the process group [`GATEWAY_GROUP`].
//!
//! Why one gateway rather than remote-visible shard and session actors: ractor_cluster mirrors
//! every network-capable actor on every peer (~11 KB each) and its `from_bytes` cannot fail. Here
//! messages are opaque versioned bytes (`parley_protocol::codec`) decoded fallibly: a peer that
//! sends garbage gets its frame logged and dropped — no panic, no actor restart.
//!
//! Semantics: `Frame` is a cast (at-most-once, like every remote cast); `Call` answers with an
//! encoded payload. A call that times out or errors means "outcome unknown" to the caller.

use std::sync::Arc;
use std::time::Duration;

use parley_protocol::cluster::{Delivery, NodePayload, RemoteSend, SendOutcome};
use parley_protocol::{codec, ErrorCode};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

use crate::actors::cluster_agent::ClusterAgentMsg;
use crate::actors::shard::{AckTo, ShardMsg};
use crate::context::{call, NodeContext};

/// The process group every node's gateway joins.
pub const GATEWAY_GROUP: &str = "parley.gateways";

pub struct GatewayActor;

pub struct GatewayArgs {
    pub ctx: Arc<NodeContext>,
    pub agent: ActorRef<ClusterAgentMsg>,
}

pub struct GatewayState {
    ctx: Arc<NodeContext>,
    agent: ActorRef<ClusterAgentMsg>,
}

#[derive(RactorClusterMessage)]
pub enum GatewayMsg {
    /// A versioned `NodePayload`, fire-and-forget.
    Frame(Vec<u8>),
    /// A versioned `NodePayload` that wants a versioned `NodePayload` back.
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

impl GatewayState {
    fn local_shard(&self, conversation: parley_protocol::ConversationId) -> Option<ActorRef<ShardMsg>> {
        match self.ctx.routing.get(self.ctx.shard_of(conversation))?.target {
            crate::routing::RouteTarget::Local(actor) => Some(actor),
            crate::routing::RouteTarget::Remote(_) => None,
        }
    }

    /// Hand a peer's sends to our shards, in batch order (the order its sessions sent them);
    /// the shards answer `from` when they commit. A send for a shard we do not serve (it moved)
    /// is answered `unavailable` at once, and the client retries.
    fn send_batch(&self, from: String, sends: Vec<RemoteSend>) {
        let from: Arc<str> = from.into();
        let mut refused = Vec::new();
        for RemoteSend { id, cmd } in sends {
            let served = match self.local_shard(cmd.conversation_id) {
                Some(shard) => {
                    shard.cast(ShardMsg::Send { cmd, reply: AckTo::Remote { node: from.clone(), id } }).is_ok()
                }
                None => false,
            };
            if !served {
                self.ctx.count_redirect();
                refused.push((id, SendOutcome::Refused(ErrorCode::Unavailable)));
            }
        }
        self.ctx.send_results(&from, refused);
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.ctx.config.limits.shard_call_timeout_ms)
    }

    fn frame(&self, payload: NodePayload) {
        match payload {
            NodePayload::Deliver { users, event, skip_session } => {
                self.ctx.deliver_local(vec![Delivery { users, event, skip_session }]);
            }
            NodePayload::DeliverBatch { deliveries } => self.ctx.deliver_local(deliveries),
            NodePayload::SendBatch { from, sends } => self.send_batch(from, sends),
            NodePayload::SendResults { results } => self.ctx.outbound.resolve(results),
            NodePayload::Receipt(cmd) => match self.local_shard(cmd.conversation_id) {
                Some(shard) => {
                    let _ = shard.cast(ShardMsg::Receipt(cmd));
                }
                None => self.ctx.count_redirect(),
            },
            NodePayload::ShardsServed { node, boot_id, shards } => {
                let _ = self.agent.cast(ClusterAgentMsg::Served { node, boot_id, shards });
            }
            NodePayload::Members { members } => {
                let _ = self.agent.cast(ClusterAgentMsg::Gossip(members));
            }
            NodePayload::Presence { node, full, want_full, online, offline } => {
                self.ctx.presence.from_peer(&node, full, want_full, online, offline);
            }
            NodePayload::PresenceRules { user, version, change } => {
                self.ctx.presence.rules_from_peer(user, version, change);
            }
            other => tracing::warn!(payload = ?std::mem::discriminant(&other), "unexpected frame from a peer; dropped"),
        }
    }

    /// Answer a call. Runs in a spawned task so a slow shard never blocks the gateway.
    async fn answer(
        ctx: Arc<NodeContext>,
        shard: Option<ActorRef<ShardMsg>>,
        payload: NodePayload,
        timeout: Duration,
    ) -> Option<NodePayload> {
        let unavailable = |ctx: &NodeContext| {
            ctx.count_redirect();
            ErrorCode::Unavailable
        };
        Some(match payload {
            NodePayload::Ping { nonce } => NodePayload::Pong { nonce },
            NodePayload::Identify => NodePayload::Identity {
                node: ctx.node_name.clone(),
                boot_id: ctx.boot_id.clone(),
                http: ctx.advertised_http(),
                dial: ctx.dial_address(),
            },
            NodePayload::Sync(req) => match shard {
                Some(shard) => match call(&shard, |reply| ShardMsg::Sync { req, reply }, timeout, "shard sync").await {
                    Ok(Ok(r)) => NodePayload::SyncResult(r),
                    Ok(Err(code)) => NodePayload::SyncFailed(code),
                    Err(e) => NodePayload::SyncFailed(e.code()),
                },
                None => NodePayload::SyncFailed(unavailable(&ctx)),
            },
            NodePayload::History { conversation, before_seq, limit } => match shard {
                Some(shard) => {
                    let r = call(
                        &shard,
                        |reply| ShardMsg::History { conversation, before_seq, limit, reply },
                        timeout,
                        "shard history",
                    )
                    .await;
                    NodePayload::HistoryResult(r.unwrap_or_else(|e| Err(e.code())))
                }
                None => NodePayload::HistoryResult(Err(unavailable(&ctx))),
            },
            NodePayload::Summaries { user, conversations } => match shard {
                Some(shard) => {
                    let r = call(
                        &shard,
                        |reply| ShardMsg::Summaries { user, conversations, reply },
                        timeout,
                        "shard summaries",
                    )
                    .await;
                    NodePayload::SummariesResult(r.unwrap_or_else(|e| Err(e.code())))
                }
                None => NodePayload::SummariesResult(Err(unavailable(&ctx))),
            },
            NodePayload::GroupFloors { groups } => match shard {
                Some(shard) => {
                    let r =
                        call(&shard, |reply| ShardMsg::GroupFloors { groups, reply }, timeout, "shard group floors")
                            .await;
                    NodePayload::GroupFloorsResult(r.unwrap_or_else(|e| Err(e.code())))
                }
                None => NodePayload::GroupFloorsResult(Err(unavailable(&ctx))),
            },
            other => {
                tracing::warn!(payload = ?std::mem::discriminant(&other), "unexpected call from a peer; dropped");
                return None;
            }
        })
    }
}

/// The conversation a call is about, to find the local shard.
fn conversation_of(p: &NodePayload) -> Option<parley_protocol::ConversationId> {
    match p {
        NodePayload::History { conversation, .. } => Some(*conversation),
        NodePayload::Sync(req) => req.conversations.first().copied(),
        NodePayload::Summaries { conversations, .. } => conversations.first().copied(),
        NodePayload::GroupFloors { groups } => groups.first().map(|(c, _)| *c),
        _ => None,
    }
}

impl Actor for GatewayActor {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(&self, me: ActorRef<GatewayMsg>, args: GatewayArgs) -> Result<GatewayState, ActorProcessingErr> {
        ractor::pg::join(GATEWAY_GROUP.to_string(), vec![me.get_cell()]);
        Ok(GatewayState { ctx: args.ctx, agent: args.agent })
    }

    async fn handle(
        &self,
        _me: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::Frame(bytes) => match codec::decode::<NodePayload>(&bytes) {
                Ok(payload) => state.frame(payload),
                Err(e) => tracing::warn!(error = %e, len = bytes.len(), "undecodable frame from a peer; dropped"),
            },
            GatewayMsg::Call(bytes, reply) => match codec::decode::<NodePayload>(&bytes) {
                // A node older than `SendBatch` sends one request per message; still answered.
                Ok(NodePayload::Send(cmd)) => {
                    // Hand the send to the shard here, in arrival order (a peer's session pipelines
                    // its client's sends in order over one connection); only the wait is spawned.
                    let ctx = state.ctx.clone();
                    let timeout = state.timeout();
                    let Some(shard) = state.local_shard(cmd.conversation_id) else {
                        ctx.count_redirect();
                        let _ = reply.send(codec::encode(&NodePayload::SendResult(SendOutcome::Refused(
                            ErrorCode::Unavailable,
                        ))));
                        return Ok(());
                    };
                    let (tx, rx) = ractor::concurrency::oneshot();
                    if shard.cast(ShardMsg::Send { cmd, reply: AckTo::Local(tx.into()) }).is_err() {
                        ctx.count_redirect();
                        let _ = reply.send(codec::encode(&NodePayload::SendResult(SendOutcome::Refused(
                            ErrorCode::Unavailable,
                        ))));
                        return Ok(());
                    }
                    tokio::spawn(async move {
                        let outcome = match tokio::time::timeout(timeout, rx).await {
                            Ok(Ok(outcome)) => outcome,
                            _ => SendOutcome::Refused(ErrorCode::Unavailable),
                        };
                        let _ = reply.send(codec::encode(&NodePayload::SendResult(outcome)));
                    });
                }
                Ok(payload) => {
                    // All conversations of one request share a shard (callers group them so).
                    let shard = conversation_of(&payload).and_then(|c| state.local_shard(c));
                    let ctx = state.ctx.clone();
                    let timeout = state.timeout();
                    tokio::spawn(async move {
                        if let Some(answer) = GatewayState::answer(ctx, shard, payload, timeout).await {
                            let _ = reply.send(codec::encode(&answer));
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, len = bytes.len(), "undecodable call from a peer; dropped"),
            },
        }
        Ok(())
    }
}
