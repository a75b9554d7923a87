//! Presence: who is online anywhere in the cluster, and when each user was last seen.
//!
//! A user is **online** while at least one of their sessions is authenticated on a live node.
//! Every node knows its own users (sessions register here as they do in the hub) and keeps a copy
//! of each live peer's: a node casts its peers a change when a user's first session on it starts
//! or their last one ends (`NodePayload::Presence`), and its whole list when a peer becomes live
//! (asking for the peer's in return), so a node that joins, or a link that comes back, starts from
//! the truth rather than from casts it never received. When a peer leaves the live set, its users
//! are dropped at once: anyone online only there is offline from that moment.
//!
//! **Last seen** is the moment a user went offline: recorded in the directory (batched by a writer
//! task, time only moving forward) by the node whose last session of theirs ended — or, when that
//! node died, by the survivors that saw it go. It is what a watcher sees after every node that
//! knew the user online is gone, and after restarts.
//!
//! Sessions **watch** users (`presence` frame): the watcher index maps a user to the local
//! sessions watching them, and each change of a user's cluster-wide state becomes one
//! [`LocalEvent`] shared by those sessions. Changes go only to nodes' own watchers; nothing about
//! watchers crosses the cluster.
//!
//! Not an actor, like the hub: a std `Mutex` that is never held across `.await`. Every change is
//! computed and cast under that lock, so the casts to each peer leave in the order the changes
//! happened (a start and an end of one user on two threads cannot reach peers reversed).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use parley_protocol::cluster::{NodePayload, UserEvent};
use parley_protocol::{codec, UserId};
use parley_storage::Directory;
use ractor::{ActorId, ActorRef};

use crate::actors::gateway::GatewayMsg;
use crate::actors::session::SessionMsg;
use crate::hub::LocalEvent;

/// Last-seen times kept in memory (besides the directory), so that a watch right after a user
/// went offline does not read the directory before the writer got there. Only a cache: when it
/// grows past this it is emptied, and the directory answers.
const RECENT_MAX: usize = 65_536;

/// What one user's presence looks like to a watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub online: bool,
    /// When they went offline, if this node knows (offline only; the directory may know more).
    pub last_seen_ms: Option<i64>,
}

/// A live peer's presence as it last told us.
struct Peer {
    /// The peer's gateway: a restarted node (same name, new gateway) starts from nothing.
    gateway: ActorRef<GatewayMsg>,
    online: HashSet<UserId>,
}

#[derive(Default)]
struct Inner {
    /// Authenticated sessions per user on this node (users with none are absent).
    local: HashMap<UserId, u32>,
    /// Live peers by name, with their users.
    peers: HashMap<String, Peer>,
    /// Local sessions watching each user: (session id, actor).
    watchers: HashMap<UserId, Vec<(u64, ActorRef<SessionMsg>)>>,
    /// Recent last-seen times (see [`RECENT_MAX`]).
    recent: HashMap<UserId, i64>,
}

impl Inner {
    fn online(&self, user: UserId) -> bool {
        self.local.contains_key(&user) || self.peers.values().any(|p| p.online.contains(&user))
    }

    /// Tell `user`'s local watchers their new state (one shared event).
    fn notify(&self, user: UserId, online: bool, last_seen_ms: Option<i64>) {
        let Some(watchers) = self.watchers.get(&user) else { return };
        let event = Arc::new(LocalEvent::new(UserEvent::Presence { user_id: user, online, last_seen_ms }));
        for (_, actor) in watchers {
            let _ = actor.cast(SessionMsg::Event(event.clone()));
        }
    }

    fn remember(&mut self, user: UserId, at: i64) {
        if self.recent.len() >= RECENT_MAX {
            self.recent.clear();
        }
        let entry = self.recent.entry(user).or_insert(at);
        *entry = (*entry).max(at);
    }

    fn cast_peers(&self, payload: &NodePayload) {
        if self.peers.is_empty() {
            return;
        }
        let bytes = codec::encode(payload);
        for peer in self.peers.values() {
            let _ = peer.gateway.cast(GatewayMsg::Frame(bytes.clone()));
        }
    }

    fn full_list(&self, node: &str, want_full: bool) -> NodePayload {
        NodePayload::Presence {
            node: node.to_string(),
            full: true,
            want_full,
            online: self.local.keys().copied().collect(),
            offline: Vec::new(),
        }
    }
}

pub struct Presence {
    node: String,
    inner: Mutex<Inner>,
    /// Last-seen times waiting for the writer (one per user: the latest).
    pending: Mutex<HashMap<UserId, i64>>,
    wake: tokio::sync::Notify,
}

impl Presence {
    pub fn new(node: String) -> Presence {
        Presence {
            node,
            inner: Mutex::new(Inner::default()),
            pending: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, seen: impl IntoIterator<Item = (UserId, i64)>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (user, at) in seen {
            let entry = pending.entry(user).or_insert(at);
            *entry = (*entry).max(at);
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// A session of `user` authenticated on this node.
    /// Those of `users` who are online nowhere in the cluster, as this node knows it now (one
    /// lock for all of them).
    pub fn offline_among(&self, users: impl IntoIterator<Item = UserId>) -> Vec<UserId> {
        let inner = self.lock();
        users.into_iter().filter(|u| !inner.online(*u)).collect()
    }

    pub fn session_started(&self, user: UserId) {
        let mut inner = self.lock();
        let count = inner.local.entry(user).or_insert(0);
        *count += 1;
        if *count > 1 {
            return;
        }
        let elsewhere = inner.peers.values().any(|p| p.online.contains(&user));
        inner.cast_peers(&NodePayload::Presence {
            node: self.node.clone(),
            full: false,
            want_full: false,
            online: vec![user],
            offline: Vec::new(),
        });
        if !elsewhere {
            inner.notify(user, true, None);
        }
    }

    /// An authenticated session of `user` on this node ended (however it ended).
    pub fn session_ended(&self, user: UserId) {
        let mut inner = self.lock();
        let Some(count) = inner.local.get_mut(&user) else { return };
        *count -= 1;
        if *count > 0 {
            return;
        }
        inner.local.remove(&user);
        let now = parley_storage::now_ms();
        inner.remember(user, now);
        inner.cast_peers(&NodePayload::Presence {
            node: self.node.clone(),
            full: false,
            want_full: false,
            online: Vec::new(),
            offline: vec![(user, now)],
        });
        if !inner.online(user) {
            inner.notify(user, false, Some(now));
        }
        drop(inner);
        self.record([(user, now)]);
    }

    /// The live peers changed (called by the cluster agent on every heartbeat; cheap when nothing
    /// changed). A peer that left takes its users with it: those online nowhere else went offline
    /// now, and this node records that. A peer that arrived (or came back, or restarted) gets our
    /// full list and is asked for its own.
    pub fn set_peers(&self, live: &[(String, ActorRef<GatewayMsg>)]) {
        let mut inner = self.lock();
        let same = |name: &str, id: ActorId| inner.peers.get(name).is_some_and(|p| p.gateway.get_id() == id);
        let unchanged = live.len() == inner.peers.len() && live.iter().all(|(n, g)| same(n, g.get_id()));
        if unchanged {
            return;
        }
        let gone: Vec<String> = inner
            .peers
            .iter()
            .filter(|(name, peer)| !live.iter().any(|(n, g)| n == *name && g.get_id() == peer.gateway.get_id()))
            .map(|(name, _)| name.clone())
            .collect();
        let now = parley_storage::now_ms();
        let mut seen = Vec::new();
        for name in gone {
            let Some(peer) = inner.peers.remove(&name) else { continue };
            for user in peer.online {
                if !inner.online(user) {
                    inner.remember(user, now);
                    inner.notify(user, false, Some(now));
                    seen.push((user, now));
                }
            }
        }
        for (name, gateway) in live {
            if inner.peers.contains_key(name) {
                continue;
            }
            let _ = gateway.cast(GatewayMsg::Frame(codec::encode(&inner.full_list(&self.node, true))));
            inner.peers.insert(name.clone(), Peer { gateway: gateway.clone(), online: HashSet::new() });
        }
        drop(inner);
        if !seen.is_empty() {
            self.record(seen);
        }
    }

    /// A peer's presence (`NodePayload::Presence`). Ignored from a node that is not a live peer
    /// here: its list would outlive it (it is sent again when the peer becomes live).
    pub fn from_peer(&self, node: &str, full: bool, want_full: bool, online: Vec<UserId>, offline: Vec<(UserId, i64)>) {
        let mut inner = self.lock();
        let Some(peer) = inner.peers.get_mut(node) else {
            tracing::debug!(peer = node, "presence from a node that is not a live peer; ignored");
            return;
        };
        let gateway = peer.gateway.clone();
        let now = parley_storage::now_ms();
        // (user, came online?, when it went offline)
        let mut changed: Vec<(UserId, bool, i64)> = Vec::new();
        if full {
            let next: HashSet<UserId> = online.into_iter().collect();
            let previous = std::mem::replace(&mut peer.online, next);
            changed.extend(previous.iter().filter(|u| !peer.online.contains(u)).map(|u| (*u, false, now)));
            changed.extend(peer.online.iter().filter(|u| !previous.contains(u)).map(|u| (*u, true, 0)));
        } else {
            for user in online {
                if peer.online.insert(user) {
                    changed.push((user, true, 0));
                }
            }
            for (user, at) in offline {
                if peer.online.remove(&user) {
                    changed.push((user, false, at));
                }
            }
        }
        for (user, came_online, at) in changed {
            // Only a change of the cluster-wide state is news to a watcher.
            let online_elsewhere = inner.local.contains_key(&user)
                || inner.peers.iter().any(|(n, p)| n != node && p.online.contains(&user));
            if online_elsewhere {
                continue;
            }
            if came_online {
                inner.notify(user, true, None);
            } else {
                inner.remember(user, at);
                inner.notify(user, false, Some(at));
            }
        }
        if want_full {
            let _ = gateway.cast(GatewayMsg::Frame(codec::encode(&inner.full_list(&self.node, false))));
        }
    }

    /// Make `session` watch `users` instead of `previous` and return their states now. A change
    /// after this call reaches the session as an event, after whatever it sends for this answer.
    pub fn watch(
        &self,
        session: u64,
        actor: &ActorRef<SessionMsg>,
        previous: &[UserId],
        users: &[UserId],
    ) -> Vec<(UserId, Status)> {
        let mut inner = self.lock();
        unwatch_locked(&mut inner, session, previous);
        users
            .iter()
            .map(|user| {
                inner.watchers.entry(*user).or_default().push((session, actor.clone()));
                let online = inner.online(*user);
                let last_seen_ms = if online { None } else { inner.recent.get(user).copied() };
                (*user, Status { online, last_seen_ms })
            })
            .collect()
    }

    /// `session` stops watching `users`.
    pub fn unwatch(&self, session: u64, users: &[UserId]) {
        unwatch_locked(&mut self.lock(), session, users);
    }

    /// Users online on this node, and on each live peer (for `/v1/cluster`).
    pub fn counts(&self) -> (usize, Vec<(String, usize)>) {
        let inner = self.lock();
        let mut peers: Vec<(String, usize)> = inner.peers.iter().map(|(n, p)| (n.clone(), p.online.len())).collect();
        peers.sort();
        (inner.local.len(), peers)
    }

    /// Write the last-seen times recorded so far to the directory. A failed write puts them
    /// back (keeping any later time recorded meanwhile) for the next round.
    pub async fn write_pending(&self, directory: &dyn Directory) -> Result<(), parley_storage::StorageError> {
        let batch: Vec<(UserId, i64)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = directory.record_last_seen(&batch).await {
            self.record(batch);
            return Err(e);
        }
        Ok(())
    }

    /// The writer: writes whatever was recorded whenever something was, until the task is
    /// aborted (the node's drain calls [`Presence::write_pending`] once more itself). A store
    /// that fails is retried every second; meanwhile the times wait in memory (one per user).
    pub async fn run_writer(&self, directory: Arc<dyn Directory>) {
        loop {
            self.wake.notified().await;
            if let Err(e) = self.write_pending(&*directory).await {
                tracing::warn!(error = %e, "recording last-seen times failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                self.wake.notify_one();
            }
        }
    }
}

fn unwatch_locked(inner: &mut Inner, session: u64, users: &[UserId]) {
    for user in users {
        if let Some(list) = inner.watchers.get_mut(user) {
            list.retain(|(id, _)| *id != session);
            if list.is_empty() {
                inner.watchers.remove(user);
            }
        }
    }
}
