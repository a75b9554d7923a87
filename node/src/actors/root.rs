//! `RootActor`: the top of the node's supervision tree (drawn in `actors.rs`). It starts the shard
//! manager and the session supervisor and owns the shutdown order: sessions first (they stop
//! producing work and close their sockets with 1001), then shards (drain, release leases).
//!
//! Policy for both children: escalate. Either one dying leaves the node unable to serve correctly
//! (no lease renewals, or no sessions), so the root stops and the process exits non-zero; an
//! operator or `parley up` restarts it and the other nodes cover its shards meanwhile.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::actors::cluster_agent::{ClusterAgentActor, ClusterAgentArgs, ClusterAgentMsg};
use crate::actors::gateway::{GatewayActor, GatewayArgs};
use crate::actors::session_supervisor::{SessionSupervisorActor, SessionSupervisorMsg};
use crate::actors::shard_manager::{ShardManagerActor, ShardManagerArgs, ShardManagerMsg};
use crate::context::{call, NodeContext};

/// Bound on each shutdown step, so a stuck child cannot hold the process forever.
const SHUTDOWN_STEP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RootActor;

pub struct RootArgs {
    pub ctx: Arc<NodeContext>,
    /// Where this node's cluster (ractor_cluster) listener binds.
    pub cluster_listen: std::net::SocketAddr,
}

pub struct RootState {
    pub shards: ActorRef<ShardManagerMsg>,
    pub agent: ActorRef<ClusterAgentMsg>,
    pub sessions: ActorRef<SessionSupervisorMsg>,
    shutting_down: bool,
}

#[derive(RactorMessage)]
pub enum RootMsg {
    /// Drain in order, answer, then stop.
    Shutdown { reply: RpcReplyPort<()> },
    /// Hand out the children's refs (for the HTTP layer and the cluster agent).
    Children { reply: RpcReplyPort<(ActorRef<ClusterAgentMsg>, ActorRef<SessionSupervisorMsg>)> },
}

impl Actor for RootActor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(&self, me: ActorRef<RootMsg>, args: RootArgs) -> Result<RootState, ActorProcessingErr> {
        let ctx = args.ctx;
        let (sessions, _) = Actor::spawn_linked(None, SessionSupervisorActor, ctx.clone(), me.get_cell()).await?;
        let (shards, _) =
            Actor::spawn_linked(None, ShardManagerActor, ShardManagerArgs { ctx: ctx.clone() }, me.get_cell()).await?;
        let agent_args = ClusterAgentArgs { ctx: ctx.clone(), shards: shards.clone(), listen: args.cluster_listen };
        let (agent, _) = Actor::spawn_linked(None, ClusterAgentActor, agent_args, me.get_cell()).await?;
        Actor::spawn_linked(None, GatewayActor, GatewayArgs { ctx, agent: agent.clone() }, me.get_cell()).await?;
        Ok(RootState { shards, agent, sessions, shutting_down: false })
    }

    async fn handle(
        &self,
        me: ActorRef<RootMsg>,
        msg: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Children { reply } => {
                let _ = reply.send((state.agent.clone(), state.sessions.clone()));
            }
            RootMsg::Shutdown { reply } => {
                state.shutting_down = true;
                if let Err(e) = call(
                    &state.sessions,
                    |r| SessionSupervisorMsg::StopAll { reply: r },
                    SHUTDOWN_STEP_TIMEOUT,
                    "stop sessions",
                )
                .await
                {
                    tracing::warn!(error = %e, "sessions did not stop in time");
                }
                if let Err(e) =
                    call(&state.shards, |r| ShardManagerMsg::Drain { reply: r }, SHUTDOWN_STEP_TIMEOUT, "drain shards")
                        .await
                {
                    tracing::warn!(error = %e, "shards did not drain in time");
                }
                let _ = reply.send(());
                me.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<RootMsg>,
        evt: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::error!(child = %cell.get_id(), error = %err, "root child failed; stopping node");
                me.stop(Some("child failed".into()));
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) if !state.shutting_down => {
                tracing::error!(child = %cell.get_id(), ?reason, "root child stopped; stopping node");
                me.stop(Some("child stopped".into()));
            }
            _ => {}
        }
        Ok(())
    }
}
