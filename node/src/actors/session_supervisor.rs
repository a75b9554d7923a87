//! `SessionSupervisorActor`: parent of every `SessionActor` on this node. It exists so that
//! sessions have an explicit restart policy — *ignore*: a session that fails is logged and its
//! socket closes; the client reconnects (and syncs). Restarting a session in place would be wrong:
//! its socket is gone with it. On shutdown it stops all sessions (the "flush sessions" step).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::actors::session::{SessionActor, SessionArgs, SessionMsg};
use crate::context::NodeContext;
use crate::outbox::OutboxSender;

pub struct SessionSupervisorActor;

pub struct SessionSupervisorState {
    ctx: Arc<NodeContext>,
}

#[derive(RactorMessage)]
pub enum SessionSupervisorMsg {
    /// Start a session for a new connection.
    Start { id: u64, outbox: OutboxSender, reply: RpcReplyPort<Option<ActorRef<SessionMsg>>> },
    /// Stop every session (shutdown) and answer when they are gone.
    StopAll { reply: RpcReplyPort<()> },
}

impl Actor for SessionSupervisorActor {
    type Msg = SessionSupervisorMsg;
    type State = SessionSupervisorState;
    type Arguments = Arc<NodeContext>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<NodeContext>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SessionSupervisorState { ctx })
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionSupervisorMsg::Start { id, outbox, reply } => {
                let args = SessionArgs { ctx: state.ctx.clone(), id, outbox };
                let session = Actor::spawn_linked(None, SessionActor, args, me.get_cell()).await.ok().map(|(a, _)| a);
                let _ = reply.send(session);
            }
            SessionSupervisorMsg::StopAll { reply } => {
                me.stop_children_and_wait(Some("node shutting down".into()), Some(std::time::Duration::from_secs(5)))
                    .await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Policy: ignore (see module doc).
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            tracing::warn!(session = %cell.get_id(), error = %err, "session failed");
        }
        Ok(())
    }
}
