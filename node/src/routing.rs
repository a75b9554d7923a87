//! The shard routing table: for each shard, the actor that serves it right now (if any).
//!
//! Written only by the shard manager (when it starts or stops a shard, and — with the cluster —
//! when peers announce theirs); read by every session on every send. Like the hub, a std `RwLock`
//! that is never held across `.await`.

use std::sync::RwLock;

use parley_protocol::{Epoch, ShardId};
use ractor::ActorRef;

use crate::actors::shard::ShardMsg;

/// Where a shard is served.
#[derive(Clone)]
pub struct ShardRoute {
    pub actor: ActorRef<ShardMsg>,
    pub epoch: Epoch,
    pub node: String,
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
