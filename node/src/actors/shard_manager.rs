//! `ShardManagerActor`: decides which shards this node serves and keeps their leases.
//!
//! Every `renew_interval_ms` it (1) renews the lease of each shard it serves — a shard whose lease
//! cannot be renewed before it would expire is stopped first (self-fencing: by the time another
//! node may acquire it, this one has stopped acking); (2) acquires the shards it should serve but
//! does not (placement: rendezvous hashing over the live member list, which is just this node until
//! the cluster layer feeds `Members`); (3) hands off shards it serves but should not: drain, release.
//! Fencing does not depend on any of this timing: every write re-checks the epoch in its own
//! transaction.
//!
//! Supervision: shard actors are linked children. A shard that stops or fails is dropped from the
//! routing table and re-acquired (new epoch) and restarted on the next tick — restart with a
//! one-tick backoff, because the usual causes (store hiccup, lease moved) heal on their own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use parley_protocol::shard::rendezvous_owner;
use parley_protocol::{Epoch, ShardId};
use parley_storage::{ShardStore, StorageError};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::actors::shard::{ShardActor, ShardArgs, ShardMsg};
use crate::context::{call, NodeContext};
use crate::routing::{RouteTarget, ShardRoute};

/// Stop serving a shard this long before its lease would expire without a renewal, so that a
/// slow stop cannot overlap another node's acquisition (which the epoch check would refuse anyway).
const SAFETY_MARGIN: Duration = Duration::from_millis(500);
/// How long a shard may take to drain on hand-off or shutdown before it is stopped regardless.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ShardManagerActor;

pub struct ShardManagerArgs {
    pub ctx: Arc<NodeContext>,
}

struct Owned {
    actor: ActorRef<ShardMsg>,
    epoch: Epoch,
    store: Arc<dyn ShardStore>,
    /// Serve only until then unless a renewal succeeds.
    valid_until: Instant,
}

pub struct ShardManagerState {
    ctx: Arc<NodeContext>,
    members: Vec<String>,
    owned: HashMap<ShardId, Owned>,
    by_actor: HashMap<ActorId, ShardId>,
    stores: HashMap<ShardId, Arc<dyn ShardStore>>,
    stopping: bool,
}

#[derive(RactorMessage)]
pub enum ShardManagerMsg {
    Tick,
    /// The live members of the cluster changed (this node included).
    Members(Vec<String>),
    /// Drain and release every shard (shutdown). Answers when done.
    Drain { reply: RpcReplyPort<()> },
}

impl ShardManagerState {
    fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.ctx.config.cluster.lease_ttl_ms)
    }

    fn should_own(&self, shard: ShardId) -> bool {
        let names: Vec<&str> = self.members.iter().map(String::as_str).collect();
        rendezvous_owner(shard, &names) == Some(self.ctx.node_name.as_str())
    }

    async fn store(&mut self, shard: ShardId) -> Result<Arc<dyn ShardStore>, StorageError> {
        if let Some(s) = self.stores.get(&shard) {
            return Ok(s.clone());
        }
        let s = self.ctx.stores.shard(shard).await?;
        self.stores.insert(shard, s.clone());
        Ok(s)
    }

    async fn renew_all(&mut self) {
        let ttl = self.ctx.config.cluster.lease_ttl_ms;
        let owner = self.ctx.boot_id.clone();
        let started = Instant::now();
        let renewals = self.owned.iter().map(|(shard, o)| {
            let store = o.store.clone();
            let owner = owner.clone();
            let (shard, epoch) = (*shard, o.epoch);
            async move { (shard, store.renew_lease(&owner, epoch, ttl).await) }
        });
        let results = join_all(renewals).await;
        let ttl = self.lease_ttl();
        for (shard, result) in results {
            let Some(o) = self.owned.get_mut(&shard) else { continue };
            match result {
                Ok(_) => o.valid_until = started + ttl - SAFETY_MARGIN,
                Err(StorageError::StaleEpoch { current, .. }) => {
                    tracing::warn!(%shard, held = %o.epoch, current, "lease lost; stopping shard");
                    o.valid_until = Instant::now();
                }
                Err(e) => tracing::warn!(%shard, error = %e, "lease renewal failed"),
            }
        }
        let now = Instant::now();
        for (shard, o) in &self.owned {
            if now >= o.valid_until {
                tracing::warn!(%shard, "lease not renewed in time; stopping shard");
                self.ctx.routing.clear_if(*shard, o.epoch);
                o.actor.stop(Some("lease expiring".into()));
            }
        }
    }

    async fn acquire_missing(&mut self, me: &ActorRef<ShardManagerMsg>) {
        let count = self.ctx.config.cluster.shard_count;
        for s in 0..count {
            let shard = ShardId(s);
            if self.owned.contains_key(&shard) || !self.should_own(shard) || self.stopping {
                continue;
            }
            if let Err(e) = self.acquire(shard, me).await {
                tracing::warn!(%shard, error = %e, "could not start shard");
            }
        }
    }

    async fn acquire(&mut self, shard: ShardId, me: &ActorRef<ShardManagerMsg>) -> Result<(), ActorProcessingErr> {
        let store = self.store(shard).await?;
        let started = Instant::now();
        let Some(grant) = store.acquire_lease(&self.ctx.boot_id, self.ctx.config.cluster.lease_ttl_ms).await? else {
            tracing::debug!(%shard, "lease held elsewhere");
            return Ok(());
        };
        let args = ShardArgs { ctx: self.ctx.clone(), shard, epoch: grant.epoch, store: store.clone() };
        let (actor, _) = Actor::spawn_linked(None, ShardActor, args, me.get_cell()).await?;
        self.by_actor.insert(actor.get_id(), shard);
        self.ctx.routing.set(
            shard,
            Some(ShardRoute { target: RouteTarget::Local(actor.clone()), epoch: grant.epoch, node: self.ctx.node_name.clone() }),
        );
        let valid_until = started + self.lease_ttl() - SAFETY_MARGIN;
        self.owned.insert(shard, Owned { actor, epoch: grant.epoch, store, valid_until });
        Ok(())
    }

    /// Drain a shard, then release its lease so the next owner need not wait for expiry.
    async fn hand_off(&mut self, shard: ShardId) {
        let Some(o) = self.owned.remove(&shard) else { return };
        self.by_actor.remove(&o.actor.get_id());
        self.ctx.routing.clear_if(shard, o.epoch);
        if let Err(e) = call(&o.actor, |reply| ShardMsg::Drain { reply }, DRAIN_TIMEOUT, "shard drain").await {
            tracing::warn!(%shard, error = %e, "drain did not finish; stopping");
        }
        o.actor.stop(None);
        if let Err(e) = o.store.release_lease(&self.ctx.boot_id, o.epoch).await {
            tracing::warn!(%shard, error = %e, "lease release failed (it will expire)");
        }
    }
}

impl Actor for ShardManagerActor {
    type Msg = ShardManagerMsg;
    type State = ShardManagerState;
    type Arguments = ShardManagerArgs;

    async fn pre_start(&self, me: ActorRef<ShardManagerMsg>, args: ShardManagerArgs) -> Result<ShardManagerState, ActorProcessingErr> {
        let members = vec![args.ctx.node_name.clone()];
        let mut state = ShardManagerState {
            ctx: args.ctx,
            members,
            owned: HashMap::new(),
            by_actor: HashMap::new(),
            stores: HashMap::new(),
            stopping: false,
        };
        state.acquire_missing(&me).await;
        tracing::info!(served = state.owned.len(), "shard manager started");
        me.send_after(Duration::from_millis(state.ctx.config.cluster.renew_interval_ms), || ShardManagerMsg::Tick);
        Ok(state)
    }

    async fn handle(&self, me: ActorRef<ShardManagerMsg>, msg: ShardManagerMsg, state: &mut ShardManagerState) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardManagerMsg::Tick => {
                if state.stopping {
                    return Ok(());
                }
                state.renew_all().await;
                let unwanted: Vec<ShardId> = state.owned.keys().copied().filter(|s| !state.should_own(*s)).collect();
                for shard in unwanted {
                    state.hand_off(shard).await;
                }
                state.acquire_missing(&me).await;
                me.send_after(Duration::from_millis(state.ctx.config.cluster.renew_interval_ms), || ShardManagerMsg::Tick);
            }
            ShardManagerMsg::Members(mut members) => {
                members.sort();
                members.dedup();
                state.members = members;
            }
            ShardManagerMsg::Drain { reply } => {
                state.stopping = true;
                let shards: Vec<ShardId> = state.owned.keys().copied().collect();
                for shard in shards {
                    state.hand_off(shard).await;
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<ShardManagerMsg>,
        evt: SupervisionEvent,
        state: &mut ShardManagerState,
    ) -> Result<(), ActorProcessingErr> {
        // Policy: restart on the next tick (see module doc). Never escalate: one shard's trouble
        // must not take the others down.
        let (id, why) = match &evt {
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell.get_id(), reason.clone().unwrap_or_default()),
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), err.to_string()),
            _ => return Ok(()),
        };
        if let Some(shard) = state.by_actor.remove(&id) {
            if let Some(o) = state.owned.remove(&shard) {
                state.ctx.routing.clear_if(shard, o.epoch);
                tracing::warn!(%shard, epoch = %o.epoch, reason = %why, "shard actor exited; will re-acquire");
            }
        }
        Ok(())
    }
}
