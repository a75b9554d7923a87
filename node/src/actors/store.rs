//! `StoreActor`: all persistence of one shard. Its parent `ShardActor` casts write batches to it;
//! it commits them one at a time (so batches queue here while one is in the database — that queue
//! is the group commit) and casts the outcome back. Reads run as spawned tasks so a page of history
//! never waits behind a commit.
//!
//! With a Redis history cache (the shard group's `redis_url`), every commit's new messages are
//! appended to it *before* the outcome goes back to the shard (and so before any ack: an acked
//! message is in every cached page that covers it), and history pages are read through it.

use std::sync::Arc;

use parley_protocol::cluster::{SyncReply, SyncRequest};
use parley_protocol::frames::MessageView;
use parley_protocol::{ConversationId, Epoch, ErrorCode, Seq, UserId};
use parley_storage::{
    Committed, GroupFloor, MessageResult, ShardCache, ShardStore, ShardSummary, StorageError, WriteBatch,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;

use crate::actors::shard::ShardMsg;

pub struct StoreActor;

pub struct StoreArgs {
    pub store: Arc<dyn ShardStore>,
    pub cache: Option<ShardCache>,
}

pub struct StoreState {
    store: Arc<dyn ShardStore>,
    cache: Option<ShardCache>,
}

/// The messages a commit stored for the first time (duplicates were cached when first stored).
fn new_messages(batch: &WriteBatch, committed: &Committed) -> Vec<MessageView> {
    batch
        .messages
        .iter()
        .zip(&committed.messages)
        .filter_map(|(m, result)| match result {
            MessageResult::Stored(ack) => Some(MessageView {
                message_id: ack.message_id,
                conversation_id: m.conversation_id,
                seq: ack.seq,
                sender: m.sender,
                client_msg_id: m.client_msg_id.clone(),
                body: m.body.clone(),
                sent_at_ms: ack.sent_at_ms,
                media: m.media.clone(),
            }),
            MessageResult::Duplicate { .. } => None,
        })
        .collect()
}

/// What a commit came to.
pub enum CommitOutcome {
    Committed(Committed),
    /// The lease moved on: nothing was written and this shard must stop.
    StaleEpoch,
    /// The database failed; the transaction may or may not have committed.
    Failed(String),
}

#[derive(RactorMessage)]
pub enum StoreMsg {
    /// Commit `batch` under `epoch`, then cast `ShardMsg::Committed` to `reply_to`.
    Commit {
        epoch: Epoch,
        batch: WriteBatch,
        reply_to: ActorRef<ShardMsg>,
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
}

/// Largest sync reply (sum of message bodies plus a per-message allowance), so a reply always fits
/// a node-to-node payload (`MAX_NODE_PAYLOAD_BYTES`, 32 MiB) with room to spare. The node caps the
/// whole sync of a device at the same size (`NodeContext::sync`). Conversations cut short are
/// reported as truncated; the client pages them with `history`.
pub const MAX_SYNC_REPLY_BYTES: usize = 8 * 1024 * 1024;
/// Envelope allowance per message (ids, seq, timestamps) when sizing a sync reply.
const MESSAGE_OVERHEAD_BYTES: usize = 128;

/// Cut `reply` to [`MAX_SYNC_REPLY_BYTES`], marking every conversation that lost messages.
pub fn cap_sync_reply(mut reply: SyncReply) -> SyncReply {
    let mut total = 0usize;
    let mut keep = reply.messages.len();
    for (i, m) in reply.messages.iter().enumerate() {
        // An attachment's description: its type and name plus the fixed-size id, size and hash.
        let media = m.media.as_ref().map_or(0, |d| d.mime.len() + d.name.as_ref().map_or(0, String::len) + 128);
        total += m.body.len() + media + MESSAGE_OVERHEAD_BYTES;
        if total > MAX_SYNC_REPLY_BYTES {
            keep = i;
            break;
        }
    }
    let cut: Vec<ConversationId> = reply.messages[keep..].iter().map(|m| m.conversation_id).collect();
    reply.messages.truncate(keep);
    for c in cut {
        if !reply.truncated.contains(&c) {
            reply.truncated.push(c);
        }
    }
    reply
}

fn read_error(e: StorageError) -> ErrorCode {
    tracing::warn!(error = %e, "shard read failed");
    ErrorCode::Unavailable
}

impl Actor for StoreActor {
    type Msg = StoreMsg;
    type State = StoreState;
    type Arguments = StoreArgs;

    async fn pre_start(&self, _me: ActorRef<StoreMsg>, args: StoreArgs) -> Result<StoreState, ActorProcessingErr> {
        Ok(StoreState { store: args.store, cache: args.cache })
    }

    async fn handle(
        &self,
        _me: ActorRef<StoreMsg>,
        msg: StoreMsg,
        state: &mut StoreState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StoreMsg::Commit { epoch, batch, reply_to } => {
                let outcome = match state.store.commit(epoch, &batch).await {
                    Ok(results) => {
                        if let Some(cache) = &state.cache {
                            // Bounded by the cache's op timeout; a failure only makes it forget.
                            cache.append(&new_messages(&batch, &results)).await;
                        }
                        CommitOutcome::Committed(results)
                    }
                    Err(StorageError::StaleEpoch { shard, held, current }) => {
                        tracing::warn!(shard, held, current, "write refused: stale lease epoch");
                        CommitOutcome::StaleEpoch
                    }
                    Err(e) => {
                        tracing::error!(shard = %state.store.shard(), error = %e, "commit failed");
                        CommitOutcome::Failed(e.to_string())
                    }
                };
                // If the shard is gone its senders time out and retry elsewhere; nothing to do.
                let _ = reply_to.cast(ShardMsg::Committed { outcome });
            }
            StoreMsg::History { conversation, before_seq, limit, reply } => {
                let (store, cache) = (state.store.clone(), state.cache.clone());
                tokio::spawn(async move {
                    let r = match cache {
                        Some(cache) => cache.history(&*store, conversation, before_seq, limit).await,
                        None => store.history(conversation, before_seq, limit).await,
                    };
                    let _ = reply.send(r.map_err(read_error));
                });
            }
            StoreMsg::Sync { req, reply } => {
                let store = state.store.clone();
                tokio::spawn(async move {
                    let _ = reply.send(store.sync(&req).await.map(cap_sync_reply).map_err(read_error));
                });
            }
            StoreMsg::Summaries { user, conversations, reply } => {
                let store = state.store.clone();
                tokio::spawn(async move {
                    let _ = reply.send(store.summaries(user, &conversations).await.map_err(read_error));
                });
            }
            StoreMsg::GroupFloors { groups, reply } => {
                let store = state.store.clone();
                tokio::spawn(async move {
                    let _ = reply.send(store.group_floors(&groups).await.map_err(read_error));
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::{ClientMsgId, MessageId};

    fn message(conversation: ConversationId, seq: u64, body_len: usize) -> MessageView {
        MessageView {
            message_id: MessageId::new(),
            conversation_id: conversation,
            seq,
            sender: UserId::random(),
            client_msg_id: ClientMsgId::new(format!("c{seq}")).unwrap(),
            body: "x".repeat(body_len),
            sent_at_ms: 0,
            media: None,
        }
    }

    #[test]
    fn sync_replies_are_capped_and_cut_conversations_flagged() {
        let (a, b) = (ConversationId(uuid::Uuid::new_v4()), ConversationId(uuid::Uuid::new_v4()));
        let big = 1024 * 1024;
        let mut messages: Vec<MessageView> = (1..=5).map(|s| message(a, s, big)).collect();
        messages.extend((1..=5).map(|s| message(b, s, big)));
        let reply = cap_sync_reply(SyncReply { messages, truncated: vec![] });
        assert_eq!(reply.messages.len(), 7, "8 MiB holds seven 1 MiB bodies with overhead");
        assert_eq!(reply.truncated, vec![b]);
        let small = cap_sync_reply(SyncReply { messages: vec![message(a, 1, 10)], truncated: vec![] });
        assert_eq!((small.messages.len(), small.truncated.len()), (1, 0));
    }
}
