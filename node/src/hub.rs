//! The node's live-session registry: which local session actors serve which user.
//!
//! Not an actor on purpose: fan-out is the hottest path (every message, every receipt) and a
//! read-mostly map behind a std `RwLock` (never held across `.await`) costs nanoseconds, where a
//! registry actor would add a mailbox hop per delivery.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use parley_protocol::cluster::{Delivery, UserEvent};
use parley_protocol::UserId;
use ractor::ActorRef;

use crate::actors::session::SessionMsg;

/// The live sessions of one user: (session id, actor).
type UserSessions = Vec<(u64, ActorRef<SessionMsg>)>;

#[derive(Default)]
pub struct Hub {
    users: RwLock<HashMap<UserId, UserSessions>>,
}

impl Hub {
    pub fn register(&self, user: UserId, session: u64, actor: ActorRef<SessionMsg>) {
        let mut map = self.users.write().unwrap_or_else(|p| p.into_inner());
        map.entry(user).or_default().push((session, actor));
    }

    pub fn unregister(&self, user: UserId, session: u64) {
        let mut map = self.users.write().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(&user) {
            list.retain(|(id, _)| *id != session);
            if list.is_empty() {
                map.remove(&user);
            }
        }
    }

    /// Hand each delivery's event (in order, under one read lock) to every local session of its
    /// users except its `skip_session`. The event is shared (one `Arc`) by all its sessions and
    /// not even allocated when none of them is on this node.
    pub fn deliver_all(&self, deliveries: Vec<Delivery>) {
        let map = self.users.read().unwrap_or_else(|p| p.into_inner());
        for Delivery { users, event, skip_session } in deliveries {
            let mut event = Some(event);
            let mut shared: Option<Arc<UserEvent>> = None;
            for user in &users {
                for (id, actor) in map.get(user).into_iter().flatten() {
                    if *id == skip_session {
                        continue;
                    }
                    let e = shared.get_or_insert_with(|| Arc::new(event.take().expect("taken once"))).clone();
                    let _ = actor.cast(SessionMsg::Event(e));
                }
            }
        }
    }

    /// Number of authenticated sessions on this node.
    pub fn session_count(&self) -> usize {
        self.users.read().unwrap_or_else(|p| p.into_inner()).values().map(Vec::len).sum()
    }

    pub fn is_online(&self, user: UserId) -> bool {
        self.users.read().unwrap_or_else(|p| p.into_inner()).contains_key(&user)
    }
}
