//! The shard routing table: for each shard, the actor that serves it right now (if any).
//!
//! Written only by the shard manager (when it starts or stops a shard, and — with the cluster —
//! when peers announce theirs); read by every session on every send. Like the hub, a std `RwLock`
//! that is never held across `.await`.

use std::sync::RwLock;

use parley_protocol::{Epoch, ShardId};
use ractor::ActorRef;

use crate::actors::gateway::GatewayMsg;
use crate::actors::shard::ShardMsg;

/// Who to talk to for a shard.
#[derive(Clone)]
pub enum RouteTarget {
    /// The shard actor runs in this process.
    Local(ActorRef<ShardMsg>),
    /// The shard runs on a peer; talk to that peer's gateway actor (by actor messaging, over
    /// ractor_cluster — never HTTP).
    Remote(ActorRef<GatewayMsg>),
}

/// Where a shard is served.
#[derive(Clone)]
pub struct ShardRoute {
    pub target: RouteTarget,
    pub epoch: Epoch,
    pub node: String,
}

impl ShardRoute {
    pub fn is_local(&self) -> bool {
        matches!(self.target, RouteTarget::Local(_))
    }
}

pub struct Routing {
    shards: RwLock<Vec<Option<ShardRoute>>>,
}

impl Routing {
    pub fn new(shard_count: u16) -> Self {
        Routing { shards: RwLock::new(vec![None; shard_count as usize]) }
    }

    pub fn get(&self, shard: ShardId) -> Option<ShardRoute> {
        self.shards.read().unwrap_or_else(|p| p.into_inner()).get(shard.0 as usize).cloned().flatten()
    }

    pub fn set(&self, shard: ShardId, route: Option<ShardRoute>) {
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = shards.get_mut(shard.0 as usize) {
            *slot = route;
        }
    }

    /// Remove the route only if it is still the given epoch (a newer one may have replaced it).
    pub fn clear_if(&self, shard: ShardId, epoch: Epoch) {
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = shards.get_mut(shard.0 as usize) {
            if slot.as_ref().is_some_and(|r| r.epoch == epoch) {
                *slot = None;
            }
        }
    }

    /// Install a peer's announcement: routes for the shards it serves (unless we serve one
    /// ourselves, or know a newer epoch), and drop its routes for shards it no longer lists.
    pub fn apply_remote(
        &self,
        node: &str,
        gateway: &ActorRef<GatewayMsg>,
        served: &[(parley_protocol::ShardId, Epoch)],
    ) {
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        for slot in shards.iter_mut() {
            if slot.as_ref().is_some_and(|r| r.node == node && !r.is_local()) {
                *slot = None;
            }
        }
        for (shard, epoch) in served {
            if let Some(slot) = shards.get_mut(shard.0 as usize) {
                let keep = slot.as_ref().is_some_and(|r| r.is_local() || r.epoch > *epoch);
                if !keep {
                    *slot = Some(ShardRoute {
                        target: RouteTarget::Remote(gateway.clone()),
                        epoch: *epoch,
                        node: node.to_string(),
                    });
                }
            }
        }
    }

    /// Forget every route through `node` (it left or died).
    pub fn clear_node(&self, node: &str) {
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        for slot in shards.iter_mut() {
            if slot.as_ref().is_some_and(|r| r.node == node && !r.is_local()) {
                *slot = None;
            }
        }
    }

    /// Shards served in this process, with their epochs.
    pub fn local_shards(&self) -> Vec<(parley_protocol::ShardId, Epoch)> {
        self.shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().filter(|r| r.is_local()).map(|r| (ShardId(i as u16), r.epoch)))
            .collect()
    }

    /// (shard, node, epoch) of every routed shard.
    pub fn snapshot(&self) -> Vec<(ShardId, Option<(String, Epoch)>)> {
        self.shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .map(|(i, r)| (ShardId(i as u16), r.as_ref().map(|r| (r.node.clone(), r.epoch))))
            .collect()
    }

    pub fn served_count(&self) -> usize {
        self.shards.read().unwrap_or_else(|p| p.into_inner()).iter().filter(|r| r.is_some()).count()
    }
}
