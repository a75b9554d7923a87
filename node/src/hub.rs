//! The node's live-session registry: which local session actors serve which user.
//!
//! Not an actor on purpose: fan-out is the hottest path (every message, every receipt) and a
//! read-mostly map behind a std `RwLock` (never held across `.await`) costs nanoseconds, where a
//! registry actor would add a mailbox hop per delivery.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use parley_protocol::cluster::UserEvent;
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

    /// Hand `event` to every local session of `users`, except session `skip`. Returns how many
    /// sessions it reached.
    pub fn deliver(&self, users: &[UserId], event: &Arc<UserEvent>, skip: u64) -> usize {
        let map = self.users.read().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for user in users {
            for (id, actor) in map.get(user).into_iter().flatten() {
                if *id != skip && actor.cast(SessionMsg::Event(event.clone())).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Number of authenticated sessions on this node.
    pub fn session_count(&self) -> usize {
        self.users.read().unwrap_or_else(|p| p.into_inner()).values().map(Vec::len).sum()
    }

    pub fn is_online(&self, user: UserId) -> bool {
        self.users.read().unwrap_or_else(|p| p.into_inner()).contains_key(&user)
    }
}
