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
use std::sync::atomic::Ordering;
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
    /// False until the first settled membership arrives (clustered nodes only).
    placing: bool,
}

#[derive(RactorMessage)]
pub enum ShardManagerMsg {
    Tick,
    /// The live members of the cluster changed (this node included).
    Members(Vec<String>),
    /// Drain and release every shard (shutdown). Answers when done.
    Drain {
        reply: RpcReplyPort<()>,
    },
}

impl ShardManagerState {
    fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.ctx.config.cluster.lease_ttl_ms)
    }

    fn should_own(&self, shard: ShardId) -> bool {
        let names: Vec<&str> = self.members.iter().map(String::as_str).collect();
        rendezvous_owner(shard, &names) == Some(self.ctx.node_name.as_str())
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

    /// Hand off what we should no longer serve, take what we should.
    async fn rebalance(&mut self, me: &ActorRef<ShardManagerMsg>) {
        let unwanted: Vec<ShardId> = self.owned.keys().copied().filter(|s| !self.should_own(*s)).collect();
        self.hand_off(unwanted).await;
        self.acquire_missing(me).await;
    }

    /// Acquire every shard this node should serve but does not, concurrently (a node taking over
    /// a third of 64 shards must not spend longer than a lease TTL doing it one by one).
    async fn acquire_missing(&mut self, me: &ActorRef<ShardManagerMsg>) {
        if self.stopping || !self.placing {
            return;
        }
        let wanted: Vec<ShardId> = (0..self.ctx.config.cluster.shard_count)
            .map(ShardId)
            .filter(|s| !self.owned.contains_key(s) && self.should_own(*s))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let missing: Vec<ShardId> = wanted.iter().copied().filter(|s| !self.stores.contains_key(s)).collect();
        let opened = join_all(missing.into_iter().map(|shard| {
            let stores = self.ctx.stores.clone();
            async move { (shard, stores.shard(shard).await) }
        }))
        .await;
        for (shard, store) in opened {
            match store {
                Ok(store) => {
                    self.stores.insert(shard, store);
                }
                Err(e) => tracing::warn!(%shard, error = %e, "cannot open shard store"),
            }
        }
        let owner = self.ctx.boot_id.clone();
        let ttl = self.ctx.config.cluster.lease_ttl_ms;
        let attempts = wanted.into_iter().filter_map(|shard| self.stores.get(&shard).cloned().map(|s| (shard, s))).map(
            |(shard, store)| {
                let owner = owner.clone();
                async move {
                    let started = Instant::now();
                    (shard, store.acquire_lease(&owner, ttl).await, started)
                }
            },
        );
        for (shard, result, started) in join_all(attempts).await {
            match result {
                Ok(Some(grant)) => {
                    if let Err(e) = self.start_shard(shard, grant.epoch, started, me).await {
                        tracing::warn!(%shard, error = %e, "could not start shard");
                    }
                }
                Ok(None) => tracing::debug!(%shard, "lease held elsewhere"),
                Err(e) => tracing::warn!(%shard, error = %e, "lease acquisition failed"),
            }
        }
    }

    async fn start_shard(
        &mut self,
        shard: ShardId,
        epoch: Epoch,
        started: Instant,
        me: &ActorRef<ShardManagerMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let store = self.stores.get(&shard).cloned().ok_or("store not open")?;
        let args = ShardArgs { ctx: self.ctx.clone(), shard, epoch, store: store.clone() };
        let (actor, _) = Actor::spawn_linked(None, ShardActor, args, me.get_cell()).await?;
        self.by_actor.insert(actor.get_id(), shard);
        self.ctx.routing.set(
            shard,
            Some(ShardRoute { target: RouteTarget::Local(actor.clone()), epoch, node: self.ctx.node_name.clone() }),
        );
        let valid_until = started + self.lease_ttl() - SAFETY_MARGIN;
        self.owned.insert(shard, Owned { actor, epoch, store, valid_until });
        Ok(())
    }

    /// Drain the shards, then release their leases so the next owners need not wait for expiry.
    /// All at once: one by one, a node handing a third of its shards to a joining peer would hold
    /// this actor (and with it lease renewals and the reaction to a peer's death) for up to
    /// `DRAIN_TIMEOUT` per shard.
    async fn hand_off(&mut self, shards: Vec<ShardId>) {
        let mut leaving = Vec::with_capacity(shards.len());
        for shard in shards {
            let Some(o) = self.owned.remove(&shard) else { continue };
            self.by_actor.remove(&o.actor.get_id());
            self.ctx.routing.clear_if(shard, o.epoch);
            leaving.push((shard, o));
        }
        let owner = self.ctx.boot_id.clone();
        join_all(leaving.into_iter().map(|(shard, o)| {
            let owner = owner.clone();
            async move {
                if let Err(e) = call(&o.actor, |reply| ShardMsg::Drain { reply }, DRAIN_TIMEOUT, "shard drain").await {
                    tracing::warn!(%shard, error = %e, "drain did not finish; stopping");
                }
                o.actor.stop(None);
                if let Err(e) = o.store.release_lease(&owner, o.epoch).await {
                    tracing::warn!(%shard, error = %e, "lease release failed (it will expire)");
                }
            }
        }))
        .await;
    }
}

impl Actor for ShardManagerActor {
    type Msg = ShardManagerMsg;
    type State = ShardManagerState;
    type Arguments = ShardManagerArgs;

    async fn pre_start(
        &self,
        me: ActorRef<ShardManagerMsg>,
        args: ShardManagerArgs,
    ) -> Result<ShardManagerState, ActorProcessingErr> {
        let members = vec![args.ctx.node_name.clone()];
        let mut state = ShardManagerState {
            ctx: args.ctx,
            members,
            owned: HashMap::new(),
            by_actor: HashMap::new(),
            stores: HashMap::new(),
            stopping: false,
            placing: false,
        };
        // Alone, serve at once. In a cluster, wait until the agent reports a settled membership
        // (`Members`): acting on a one-node view would grab shards that live peers own.
        let clustered = state.ctx.config.is_clustered() && state.ctx.config.cluster.cookie.is_some();
        state.placing = !clustered;
        if state.placing {
            state.acquire_missing(&me).await;
        }
        tracing::info!(served = state.owned.len(), clustered, "shard manager started");
        me.send_after(Duration::from_millis(state.ctx.config.cluster.renew_interval_ms), || ShardManagerMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        me: ActorRef<ShardManagerMsg>,
        msg: ShardManagerMsg,
        state: &mut ShardManagerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardManagerMsg::Tick => {
                if state.stopping {
                    return Ok(());
                }
                state.renew_all().await;
                state.rebalance(&me).await;
                me.send_after(Duration::from_millis(state.ctx.config.cluster.renew_interval_ms), || {
                    ShardManagerMsg::Tick
                });
            }
            ShardManagerMsg::Members(mut members) => {
                members.sort();
                members.dedup();
                if (members != state.members || !state.placing) && !state.stopping {
                    state.members = members;
                    state.placing = true;
                    // React now rather than on the next tick: this is the failover path.
                    state.rebalance(&me).await;
                }
            }
            ShardManagerMsg::Drain { reply } => {
                state.stopping = true;
                let shards: Vec<ShardId> = state.owned.keys().copied().collect();
                state.hand_off(shards).await;
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
                // Planned hand-offs remove the shard from `owned` before stopping it, so only the
                // unplanned exits (lease lost or lapsed, actor failed) are counted here.
                state.ctx.events.shards_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%shard, epoch = %o.epoch, reason = %why, "shard actor exited; will re-acquire");
            }
        }
        Ok(())
    }
}
