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
//! **Privacy** (PROTOCOL.md §5, "Privacy and contacts"): each watched user's settings, and for
//! each watcher whether they are on the watched user's contact list, are read from the directory
//! when a session watches and kept with the watcher index; every event a watcher gets is first
//! filtered by them ([`PrivacySettings::shown_to`]), so a hidden user looks offline and never
//! seen. A change of settings or contacts is stored by the node that took the request, applied
//! there and cast to every live peer (`NodePayload::PresenceRules`); each carries the user's
//! rules version, and a node keeps only what is newer than what it holds, so casts may arrive in
//! any order. What a node cannot have received — changes made while a peer was not live to it —
//! it reads again from the directory when a peer arrives here, or sends its full list (it has just
//! seen this node arrive) ([`Presence::run_refresher`]); and a watch
//! whose directory read raced with a change to one of its users reads again
//! ([`Presence::rules_ticket`]).
//!
//! Not an actor, like the hub: a std `Mutex` that is never held across `.await`. Every change is
//! computed and cast under that lock, so the casts to each peer leave in the order the changes
//! happened (a start and an end of one user on two threads cannot reach peers reversed).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use parley_protocol::cluster::{NodePayload, RulesChange, UserEvent};
use parley_protocol::privacy::{PrivacySettings, Shown};
use parley_protocol::{codec, UserId};
use parley_storage::{Directory, PresenceRecord};
use ractor::{ActorId, ActorRef};

use crate::actors::gateway::GatewayMsg;
use crate::actors::session::SessionMsg;
use crate::hub::LocalEvent;

/// Last-seen times kept in memory (besides the directory), so that a watch right after a user
/// went offline does not read the directory before the writer got there. Only a cache: when it
/// grows past this it is emptied, and the directory answers.
const RECENT_MAX: usize = 65_536;

/// Users whose last rule change this node remembers, for [`Presence::rules_ticket`]. Past it the
/// record is emptied and every ticket taken before is stale (its watch reads again).
const CHANGED_MAX: usize = 65_536;

/// Watched users per directory read when rules are read again after peers arrive.
const REFRESH_CHUNK: usize = 256;

/// Everything visible.
const FULL: Shown = Shown { online: true, last_seen: true };

/// What one user's presence looks like to a watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub online: bool,
    /// When they went offline (offline only; `None`: unknown, or not the watcher's to see).
    pub last_seen_ms: Option<i64>,
}

impl Status {
    /// The state (`online`, went offline at `last_seen_ms`) as a watcher allowed `shown` sees it.
    fn seen(shown: Shown, online: bool, last_seen_ms: Option<i64>) -> Status {
        let online = online && shown.online;
        let last_seen_ms = if online || !shown.last_seen { None } else { last_seen_ms };
        Status { online, last_seen_ms }
    }
}

/// A local session watching a user.
struct Watcher {
    session: u64,
    /// The watching session's user.
    user: UserId,
    actor: ActorRef<SessionMsg>,
    /// Whether `user` is on the watched user's contact list, as of the watched user's rules
    /// version `contact_version`.
    is_contact: bool,
    contact_version: u64,
}

/// A watched user's rules and last seen, as this node knows them (while anyone here watches).
struct Watched {
    settings: PrivacySettings,
    /// The rules version `settings` are from.
    settings_version: u64,
    /// From the directory at the watch, moved forward by what this node sees.
    last_seen_ms: Option<i64>,
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
    /// Local sessions watching each user.
    watchers: HashMap<UserId, Vec<Watcher>>,
    /// Each watched user's rules (same keys as `watchers`).
    watched: HashMap<UserId, Watched>,
    /// Recent last-seen times (see [`RECENT_MAX`]).
    recent: HashMap<UserId, i64>,
    /// Rule changes applied here, counted (see [`Presence::rules_ticket`]).
    rules_seq: u64,
    /// The `rules_seq` of each user's last rule change (see [`CHANGED_MAX`]).
    rules_changed: HashMap<UserId, u64>,
    /// Tickets below this are stale for every user (the record above was emptied).
    rules_floor: u64,
}

impl Inner {
    fn online(&self, user: UserId) -> bool {
        self.local.contains_key(&user) || self.peers.values().any(|p| p.online.contains(&user))
    }

    /// What `watcher` may see of `user`.
    fn shown(&self, user: UserId, watcher: &Watcher) -> Shown {
        match self.watched.get(&user) {
            _ if watcher.user == user => FULL,
            Some(w) => w.settings.shown_to(watcher.is_contact),
            // Not reached (an entry exists while anyone watches); show nothing rather than all.
            None => Shown { online: false, last_seen: false },
        }
    }

    /// `user`'s state now, unfiltered.
    fn state(&self, user: UserId) -> (bool, Option<i64>) {
        let online = self.online(user);
        let stored = self.watched.get(&user).and_then(|w| w.last_seen_ms);
        (online, self.recent.get(&user).copied().max(stored))
    }

    /// Tell `user`'s local watchers their new state: one shared event per distinct view; nothing
    /// to those who may not see that the user is online at all (to them nothing changed).
    fn notify(&self, user: UserId, online: bool, last_seen_ms: Option<i64>) {
        let Some(watchers) = self.watchers.get(&user) else { return };
        let mut events: Vec<(Status, Arc<LocalEvent>)> = Vec::new();
        for watcher in watchers {
            let shown = self.shown(user, watcher);
            if !shown.online {
                continue;
            }
            let status = Status::seen(shown, online, last_seen_ms);
            let event = match events.iter().find(|(s, _)| *s == status) {
                Some((_, e)) => e.clone(),
                None => {
                    let e = Arc::new(LocalEvent::new(UserEvent::Presence {
                        user_id: user,
                        online: status.online,
                        last_seen_ms: status.last_seen_ms,
                    }));
                    events.push((status, e.clone()));
                    e
                }
            };
            let _ = watcher.actor.cast(SessionMsg::Event(event));
        }
    }

    fn remember(&mut self, user: UserId, at: i64) {
        if self.recent.len() >= RECENT_MAX {
            self.recent.clear();
        }
        let entry = self.recent.entry(user).or_insert(at);
        *entry = (*entry).max(at);
        if let Some(w) = self.watched.get_mut(&user) {
            w.last_seen_ms = w.last_seen_ms.max(Some(at));
        }
    }

    /// Count a rule change of `user` (for tickets).
    fn rules_changed(&mut self, user: UserId) {
        self.rules_seq += 1;
        if self.rules_changed.len() >= CHANGED_MAX {
            self.rules_changed.clear();
            self.rules_floor = self.rules_seq;
        }
        self.rules_changed.insert(user, self.rules_seq);
    }

    /// Run `change` on `user`'s rules and watchers, then tell each watcher whose view of `user`
    /// changed what it sees now.
    fn reveal_changes(&mut self, user: UserId, change: impl FnOnce(&mut Inner)) {
        let views = |inner: &Inner| -> Vec<Status> {
            let (online, last_seen) = inner.state(user);
            let watchers = inner.watchers.get(&user).map_or(&[][..], |w| &w[..]);
            watchers.iter().map(|w| Status::seen(inner.shown(user, w), online, last_seen)).collect()
        };
        let before = views(self);
        change(self);
        let after = views(self);
        let Some(watchers) = self.watchers.get(&user) else { return };
        for ((watcher, old), new) in watchers.iter().zip(before).zip(after) {
            if old != new {
                let event = UserEvent::Presence { user_id: user, online: new.online, last_seen_ms: new.last_seen_ms };
                let _ = watcher.actor.cast(SessionMsg::Event(Arc::new(LocalEvent::new(event))));
            }
        }
    }

    /// Take in `user`'s rules as of `version` (a cast, or a directory read): settings, and the
    /// contact flag of the watchers who are `contact` (`None`: no contact news). Older than what
    /// is held: ignored.
    fn apply_rules(
        &mut self,
        user: UserId,
        version: u64,
        settings: Option<PrivacySettings>,
        contact: Option<(UserId, bool)>,
    ) {
        if !self.watchers.contains_key(&user) {
            return;
        }
        self.reveal_changes(user, |inner| {
            if let (Some(settings), Some(w)) = (settings, inner.watched.get_mut(&user)) {
                if version > w.settings_version {
                    w.settings = settings;
                    w.settings_version = version;
                }
            }
            if let (Some((contact, is_contact)), Some(list)) = (contact, inner.watchers.get_mut(&user)) {
                for w in list.iter_mut().filter(|w| w.user == contact && version > w.contact_version) {
                    w.is_contact = is_contact;
                    w.contact_version = version;
                }
            }
        });
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
    /// Peers arrived: rules may have changed unseen ([`Presence::run_refresher`]).
    peers_arrived: tokio::sync::Notify,
}

impl Presence {
    pub fn new(node: String) -> Presence {
        Presence {
            node,
            inner: Mutex::new(Inner::default()),
            pending: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            peers_arrived: tokio::sync::Notify::new(),
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

    /// Those of `users` who are online nowhere in the cluster, as this node knows it now (one
    /// lock for all of them).
    pub fn offline_among(&self, users: impl IntoIterator<Item = UserId>) -> Vec<UserId> {
        let inner = self.lock();
        users.into_iter().filter(|u| !inner.online(*u)).collect()
    }

    /// A session of `user` authenticated on this node.
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
        let mut arrived = false;
        for (name, gateway) in live {
            if inner.peers.contains_key(name) {
                continue;
            }
            let _ = gateway.cast(GatewayMsg::Frame(codec::encode(&inner.full_list(&self.node, true))));
            inner.peers.insert(name.clone(), Peer { gateway: gateway.clone(), online: HashSet::new() });
            arrived = true;
        }
        drop(inner);
        if arrived {
            self.peers_arrived.notify_one();
        }
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
        drop(inner);
        // A full list means the peer has just seen this node arrive: until then it cast nothing
        // here, rule changes included, even if this node never saw it leave.
        if full {
            self.peers_arrived.notify_one();
        }
    }

    /// Take before reading the directory for [`Presence::watch`].
    pub fn rules_ticket(&self) -> RulesTicket {
        RulesTicket(self.lock().rules_seq)
    }

    /// Make `session` (of user `me`) watch the users of `records` (read from the directory under
    /// `ticket`) instead of `previous`, and return what `me` may see of each now. A change after
    /// this call reaches the session as an event, after whatever it sends for this answer.
    /// `Err(Stale)`, changing nothing: a rule of one of these users changed after the ticket was
    /// taken (the change may be missing from the records); read again with a new ticket.
    pub fn watch(
        &self,
        ticket: RulesTicket,
        session: u64,
        me: UserId,
        actor: &ActorRef<SessionMsg>,
        previous: &[UserId],
        records: &[PresenceRecord],
    ) -> Result<Vec<(UserId, Status)>, Stale> {
        let mut inner = self.lock();
        let stale = ticket.0 < inner.rules_floor
            || records.iter().any(|r| inner.rules_changed.get(&r.user).is_some_and(|at| *at > ticket.0));
        if stale {
            return Err(Stale);
        }
        unwatch_locked(&mut inner, session, previous);
        let mut now = Vec::with_capacity(records.len());
        for r in records {
            let watched = inner.watched.entry(r.user).or_insert(Watched {
                settings: r.settings,
                settings_version: r.version,
                last_seen_ms: None,
            });
            if r.version > watched.settings_version {
                watched.settings = r.settings;
                watched.settings_version = r.version;
            }
            watched.last_seen_ms = watched.last_seen_ms.max(r.last_seen_ms);
            let watcher = Watcher {
                session,
                user: me,
                actor: actor.clone(),
                is_contact: r.watcher_is_contact,
                contact_version: r.version,
            };
            let (online, last_seen) = inner.state(r.user);
            let status = Status::seen(inner.shown(r.user, &watcher), online, last_seen);
            inner.watchers.entry(r.user).or_default().push(watcher);
            now.push((r.user, status));
        }
        Ok(now)
    }

    /// `session` stops watching `users`.
    pub fn unwatch(&self, session: u64, users: &[UserId]) {
        unwatch_locked(&mut self.lock(), session, users);
    }

    /// A change of `user`'s rules, stored in the directory by this node as `version`: applied
    /// here and cast to every live peer, in that order under one lock (so peers get this node's
    /// changes in the order it made them).
    pub fn rules_changed_here(&self, user: UserId, version: u64, change: RulesChange) {
        let mut inner = self.lock();
        inner.cast_peers(&NodePayload::PresenceRules { user, version, change: change.clone() });
        apply_change(&mut inner, user, version, change);
    }

    /// A peer's `NodePayload::PresenceRules`. Taken from any node, live here or not: it is
    /// versioned, so a late one changes nothing.
    pub fn rules_from_peer(&self, user: UserId, version: u64, change: RulesChange) {
        apply_change(&mut self.lock(), user, version, change);
    }

    /// Read every watched user's rules again, and take in what is newer than what is held. For
    /// changes cast while a peer was not live here (they were never sent to this node).
    pub async fn refresh_rules(&self, directory: &dyn Directory) -> Result<(), parley_storage::StorageError> {
        // Watched users by watching user: what each directory read is about.
        let by_watcher: HashMap<UserId, Vec<UserId>> = {
            let inner = self.lock();
            let mut map: HashMap<UserId, HashSet<UserId>> = HashMap::new();
            for (user, list) in &inner.watchers {
                for w in list {
                    map.entry(w.user).or_default().insert(*user);
                }
            }
            map.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
        };
        for (watcher, users) in by_watcher {
            for chunk in users.chunks(REFRESH_CHUNK) {
                let records = directory.presence_view(watcher, chunk).await?;
                let mut inner = self.lock();
                for r in records {
                    inner.apply_rules(r.user, r.version, Some(r.settings), Some((watcher, r.watcher_is_contact)));
                }
            }
        }
        Ok(())
    }

    /// Reads rules again ([`Presence::refresh_rules`]) each time peers arrive
    /// ([`Presence::set_peers`]), until the task is aborted. A failed read is retried every
    /// second.
    pub async fn run_refresher(&self, directory: Arc<dyn Directory>) {
        on_each_wake(&self.peers_arrived, "reading presence rules again", || self.refresh_rules(&*directory)).await
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
        on_each_wake(&self.wake, "recording last-seen times", || self.write_pending(&*directory)).await
    }
}

/// Run `work` each time `wake` is notified, until the task is aborted. A failure (the store is
/// down) is logged and retried a second later: the work is still owed, and wakes that came
/// meanwhile are folded into the retry.
async fn on_each_wake<F, Fut>(wake: &tokio::sync::Notify, what: &str, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), parley_storage::StorageError>>,
{
    loop {
        wake.notified().await;
        if let Err(e) = work().await {
            tracing::warn!(error = %e, "{what} failed; retrying");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            wake.notify_one();
        }
    }
}

/// Taken before a directory read of rules ([`Presence::rules_ticket`]).
#[derive(Clone, Copy, Debug)]
pub struct RulesTicket(u64);

/// A watch's directory read raced with a rule change of one of its users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale;

fn apply_change(inner: &mut Inner, user: UserId, version: u64, change: RulesChange) {
    inner.rules_changed(user);
    match change {
        RulesChange::Settings(settings) => inner.apply_rules(user, version, Some(settings), None),
        RulesChange::Contact { contact, is_contact } => {
            inner.apply_rules(user, version, None, Some((contact, is_contact)))
        }
    }
}

fn unwatch_locked(inner: &mut Inner, session: u64, users: &[UserId]) {
    for user in users {
        if let Some(list) = inner.watchers.get_mut(user) {
            list.retain(|w| w.session != session);
            if list.is_empty() {
                inner.watchers.remove(user);
                inner.watched.remove(user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use parley_protocol::privacy::{Audience, OnlineAudience};
    use ractor::{Actor, ActorProcessingErr};
    use tokio::sync::mpsc;

    use super::*;

    /// Stands in for a session: hands on every presence event it gets.
    struct Recorder;

    impl Actor for Recorder {
        type Msg = SessionMsg;
        type State = mpsc::UnboundedSender<(UserId, bool, Option<i64>)>;
        type Arguments = mpsc::UnboundedSender<(UserId, bool, Option<i64>)>;

        async fn pre_start(
            &self,
            _: ActorRef<SessionMsg>,
            tx: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(tx)
        }

        async fn handle(
            &self,
            _: ActorRef<SessionMsg>,
            msg: SessionMsg,
            tx: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let SessionMsg::Event(e) = msg {
                if let UserEvent::Presence { user_id, online, last_seen_ms } = e.event {
                    let _ = tx.send((user_id, online, last_seen_ms));
                }
            }
            Ok(())
        }
    }

    async fn recorder() -> (ActorRef<SessionMsg>, mpsc::UnboundedReceiver<(UserId, bool, Option<i64>)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(None, Recorder, tx).await.expect("spawn");
        (actor, rx)
    }

    /// The events that arrived within a short wait, in order.
    async fn drain(rx: &mut mpsc::UnboundedReceiver<(UserId, bool, Option<i64>)>) -> Vec<(bool, Option<i64>)> {
        let mut got = Vec::new();
        while let Ok(Some((_, online, seen))) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            got.push((online, seen));
        }
        got
    }

    const HIDDEN: PrivacySettings = PrivacySettings {
        last_seen: Audience::Contacts,
        online: OnlineAudience::SameAsLastSeen,
        groups: Audience::Everyone,
        read_receipts: true,
    };

    fn record(user: UserId, settings: PrivacySettings, version: u64, watcher_is_contact: bool) -> PresenceRecord {
        PresenceRecord { user, last_seen_ms: Some(1_000), settings, version, watcher_is_contact }
    }

    #[tokio::test]
    async fn a_watch_read_before_a_change_of_its_users_is_stale() {
        let presence = Presence::new("n1".into());
        let (actor, _rx) = recorder().await;
        let (me, alice, bob) = (UserId::random(), UserId::random(), UserId::random());
        let ticket = presence.rules_ticket();
        // Bob's change does not concern a watch of alice.
        presence.rules_from_peer(bob, 3, RulesChange::Settings(HIDDEN));
        let seen = presence.watch(ticket, 1, me, &actor, &[], &[record(alice, PrivacySettings::default(), 0, false)]);
        assert_eq!(seen, Ok(vec![(alice, Status { online: false, last_seen_ms: Some(1_000) })]));
        // Alice's change after the ticket makes her read stale; nothing is watched by it.
        let ticket = presence.rules_ticket();
        presence.rules_from_peer(alice, 1, RulesChange::Settings(HIDDEN));
        let stale = presence.watch(ticket, 2, me, &actor, &[], &[record(alice, PrivacySettings::default(), 0, false)]);
        assert_eq!(stale, Err(Stale));
        assert_eq!(presence.lock().watchers[&alice].len(), 1, "the stale watch added no watcher");
        let fresh = presence.rules_ticket();
        let seen = presence.watch(fresh, 2, me, &actor, &[], &[record(alice, HIDDEN, 1, false)]);
        assert_eq!(seen, Ok(vec![(alice, Status { online: false, last_seen_ms: None })]));
    }

    #[tokio::test]
    async fn older_rules_never_replace_newer_ones_whatever_order_they_arrive_in() {
        let presence = Presence::new("n1".into());
        let (actor, mut rx) = recorder().await;
        let (me, alice) = (UserId::random(), UserId::random());
        let ticket = presence.rules_ticket();
        let now = presence.watch(ticket, 1, me, &actor, &[], &[record(alice, PrivacySettings::default(), 3, false)]);
        assert_eq!(now, Ok(vec![(alice, Status { online: false, last_seen_ms: Some(1_000) })]));

        // Version 5 hides alice; version 4 (an older change, late) must not show her again.
        presence.rules_from_peer(alice, 5, RulesChange::Settings(HIDDEN));
        assert_eq!(drain(&mut rx).await, vec![(false, None)], "hidden");
        presence.rules_from_peer(alice, 4, RulesChange::Settings(PrivacySettings::default()));
        assert_eq!(drain(&mut rx).await, vec![], "a late, older change is ignored");
        // Made a contact at 7; a removal made at 6, arriving late, is ignored.
        presence.rules_from_peer(alice, 7, RulesChange::Contact { contact: me, is_contact: true });
        assert_eq!(drain(&mut rx).await, vec![(false, Some(1_000))], "a contact sees the time");
        presence.rules_from_peer(alice, 6, RulesChange::Contact { contact: me, is_contact: false });
        assert_eq!(drain(&mut rx).await, vec![]);
        // A contact change for someone else changes nothing for this watcher.
        presence.rules_from_peer(alice, 8, RulesChange::Contact { contact: UserId::random(), is_contact: false });
        assert_eq!(drain(&mut rx).await, vec![]);

        // Alice comes online and leaves: a contact sees both.
        presence.session_started(alice);
        presence.session_ended(alice);
        let got = drain(&mut rx).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (true, None));
        assert!(matches!(got[1], (false, Some(t)) if t > 1_000), "{got:?}");
    }

    /// Stands in for a peer's gateway: takes every frame and drops it.
    struct Sink;

    impl Actor for Sink {
        type Msg = GatewayMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<GatewayMsg>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    /// Whether the refresher was woken (a permit is waiting), taking the permit.
    async fn woken(presence: &Presence) -> bool {
        tokio::time::timeout(Duration::from_millis(50), presence.peers_arrived.notified()).await.is_ok()
    }

    #[tokio::test]
    async fn a_peer_arriving_or_sending_its_full_list_wakes_the_refresher() {
        let presence = Presence::new("n1".into());
        let (gateway, _) = Actor::spawn(None, Sink, ()).await.expect("spawn");
        presence.set_peers(&[("n2".to_string(), gateway.clone())]);
        assert!(woken(&presence).await, "a peer arrived");
        presence.set_peers(&[("n2".to_string(), gateway)]);
        assert!(!woken(&presence).await, "the same peer again is no news");
        presence.from_peer("n2", false, false, vec![UserId::random()], Vec::new());
        assert!(!woken(&presence).await, "a change is not a full list");
        // n2 saw this node arrive (it never saw it leave): it cast nothing here meanwhile.
        presence.from_peer("n2", true, false, Vec::new(), Vec::new());
        assert!(woken(&presence).await, "a full list wakes it");
    }

    #[tokio::test]
    async fn a_refresh_takes_in_rules_that_changed_unseen() {
        let dir = std::env::temp_dir().join(format!("parley-presence-{}", uuid::Uuid::new_v4().simple()));
        let stores = parley_storage::open(&parley_storage::StoreConfig::Embedded { dir: dir.clone() }).await.unwrap();
        let directory = stores.directory.clone();
        let user = |name: &str| parley_storage::UserRecord {
            id: UserId::random(),
            username: name.into(),
            password_hash: "x".into(),
            created_at_ms: 0,
        };
        let (alice, bob) = (user("alice"), user("bob"));
        directory.create_user(&alice).await.unwrap();
        directory.create_user(&bob).await.unwrap();
        directory.record_last_seen(&[(alice.id, 1_000)]).await.unwrap();

        let presence = Presence::new("n1".into());
        let (actor, mut rx) = recorder().await;
        let records = directory.presence_view(bob.id, &[alice.id]).await.unwrap();
        let now = presence.watch(presence.rules_ticket(), 1, bob.id, &actor, &[], &records).unwrap();
        assert_eq!(now, vec![(alice.id, Status { online: false, last_seen_ms: Some(1_000) })]);
        // Alice hides on a node whose cast never came here; a refresh reads it from the directory.
        directory.set_privacy(alice.id, HIDDEN).await.unwrap();
        assert_eq!(drain(&mut rx).await, vec![], "nothing was cast");
        presence.refresh_rules(&*directory).await.unwrap();
        assert_eq!(drain(&mut rx).await, vec![(false, None)], "hidden after the refresh");
        // She lists bob as a contact: the next refresh shows him her last seen again.
        directory.set_contact(alice.id, bob.id, true, 10).await.unwrap();
        presence.refresh_rules(&*directory).await.unwrap();
        assert_eq!(drain(&mut rx).await, vec![(false, Some(1_000))]);
        presence.refresh_rules(&*directory).await.unwrap();
        assert_eq!(drain(&mut rx).await, vec![], "nothing newer, nothing sent");
        drop(stores);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_hidden_user_coming_and_going_reaches_only_those_allowed_to_see() {
        let presence = Presence::new("n1".into());
        let (contact, mut contact_rx) = recorder().await;
        let (stranger, mut stranger_rx) = recorder().await;
        let (c, s, alice) = (UserId::random(), UserId::random(), UserId::random());
        let ticket = presence.rules_ticket();
        presence.watch(ticket, 1, c, &contact, &[], &[record(alice, HIDDEN, 1, true)]).unwrap();
        presence.watch(ticket, 2, s, &stranger, &[], &[record(alice, HIDDEN, 1, false)]).unwrap();
        presence.session_started(alice);
        presence.session_ended(alice);
        assert_eq!(drain(&mut contact_rx).await.len(), 2, "the contact sees her come and go");
        assert_eq!(drain(&mut stranger_rx).await, vec![], "the stranger sees nothing at all");
        // She watches herself: always everything, whatever her settings.
        let (own, mut own_rx) = recorder().await;
        let now =
            presence.watch(presence.rules_ticket(), 3, alice, &own, &[], &[record(alice, HIDDEN, 1, false)]).unwrap();
        assert!(matches!(now[0].1, Status { online: false, last_seen_ms: Some(_) }), "{now:?}");
        presence.session_started(alice);
        assert_eq!(drain(&mut own_rx).await, vec![(true, None)]);
    }
}
