//! `NodeContext`: the handles every part of a node shares (config, stores, hub, routing) plus the
//! request logic that is the same for WebSocket and HTTP clients (authenticate, resolve a
//! conversation, send, read). Keeping it here means the two transports cannot drift apart.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use parley_protocol::cluster::{
    Delivery, GroupFloor, NodePayload, ReceiptCommand, SendCommand, SendOutcome, ShardSummary, StoredAck, SyncReply,
    SyncRequest, UserEvent,
};
use parley_protocol::codec;
use parley_protocol::frames::{ConversationKind, ConversationSummary, GroupView, MessageView};
use parley_protocol::http::SendRequest;
use parley_protocol::limits::{DEFAULT_PAGE, MAX_BODY_BYTES, MAX_GROUP_MEMBERS, MAX_GROUP_NAME_BYTES, MAX_PAGE};
use parley_protocol::media::MediaRef;
use parley_protocol::shard::shard_for;
use parley_protocol::{ConversationId, ErrorCode, MediaId, Seq, ShardId, UserId};
use parley_storage::{now_ms, token_hash, ConversationRecord, Stores, TokenGrant};
use ractor::rpc::CallResult;
use ractor::ActorRef;

use crate::actors::gateway::GatewayMsg;
use crate::actors::shard::{AckTo, ShardMsg};
use crate::actors::store::cap_sync_reply;
use crate::config::Config;
use crate::conversation_cache::ConversationCache;
use crate::error::{NodeError, NodeResult};
use crate::hub::Hub;
use crate::outbound::{Outbound, RemoteAck};
use crate::presence::Presence;
use crate::push::Push;
use crate::routing::{RouteTarget, Routing};

/// Conversations remembered per node before the cache is cleared. A conversation costs ~100
/// bytes here; 100k keeps this under ~10 MB while covering every active chat of a busy node.
const CONVERSATION_CACHE_MAX: usize = 100_000;

/// How long a node trusts its cached copy of a group before reading it again. A change is pushed
/// to every node at once (`UserEvent::Group` makes each forget its copy); this bounds how long a
/// node that missed that push (the cast is at-most-once) keeps using the old member list.
const GROUP_CACHE_TTL: Duration = Duration::from_secs(10);

/// Estimated bytes of deliveries one `DeliverBatch` frame carries before a commit's fan-out is
/// split over several frames: a commit of 1000 messages into a 1024-member group names 16 MiB of
/// member ids, and with large bodies one frame could pass the 32 MiB payload cap a peer accepts.
const DELIVER_FRAME_BUDGET: usize = 4 * 1024 * 1024;

/// A delivery's encoded size, roughly (17 bytes per user id, the body, some overhead).
fn delivery_bytes(d: &Delivery) -> usize {
    let event = match &d.event {
        UserEvent::Message(m) => m.body.len() + m.client_msg_id.as_str().len(),
        UserEvent::Group(g) => g.name.len() + g.members.len() * 17,
        UserEvent::Receipt { .. }
        | UserEvent::TokenRevoked { .. }
        | UserEvent::Typing { .. }
        | UserEvent::Presence { .. } => 0,
    };
    d.users.len() * 17 + event + 128
}

/// Consecutive ranges of `sizes`, each summing to at most `budget` (an item larger than the budget
/// gets a range of its own), covering every index in order.
fn split_by_budget(sizes: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut from, mut bytes) = (0, 0);
    for (i, size) in sizes.iter().enumerate() {
        if i > from && bytes + size > budget {
            ranges.push(from..i);
            (from, bytes) = (i, 0);
        }
        bytes += size;
    }
    if from < sizes.len() {
        ranges.push(from..sizes.len());
    }
    ranges
}

/// Attempts at a group change that keeps losing the compare-and-set to concurrent changes.
const GROUP_CHANGE_ATTEMPTS: usize = 5;

/// A change to a group, by one of its members.
#[derive(Clone, Debug)]
pub enum GroupChange {
    /// Add users (the owner only); present members are ignored.
    Add(Vec<UserId>),
    /// Remove a member: the owner removes anyone, every member may remove themselves (leave).
    /// When the owner leaves, the first remaining member (by id) becomes the owner.
    Remove(UserId),
    /// Rename (the owner only).
    Rename(String),
}

pub struct NodeContext {
    pub config: Config,
    pub node_name: String,
    /// Unique per process start: distinguishes a restarted node from its previous life in leases.
    pub boot_id: String,
    pub stores: Stores,
    pub hub: Hub,
    /// Who is online in the cluster, who watches whom here, last-seen times to record.
    pub presence: Presence,
    /// Push notifications for users offline everywhere (queue, VAPID key, counters).
    pub push: Push,
    pub routing: Routing,
    /// Sends to peers' shards, batched per peer, and the sessions waiting for their outcomes.
    pub outbound: Arc<Outbound>,
    /// Conversation records by id (groups expire after `GROUP_CACHE_TTL`).
    conversations: ConversationCache,
    /// Live peers' gateways (maintained by the cluster agent), for fan-out.
    peers: RwLock<Vec<(String, ActorRef<GatewayMsg>)>>,
    /// Every identified peer's gateway, live or not: where the outcomes of a peer's sends go.
    /// Not only the live ones: a peer we consider silent may still be sending us (and waiting);
    /// a cast to one that is really gone is dropped.
    known: RwLock<Vec<(String, ActorRef<GatewayMsg>)>>,
    http: OnceLock<SocketAddr>,
    /// Requests that reached a node which did not (or no longer) serve the shard: the client was
    /// told `unavailable` and retries. Counted to report hand-off cost.
    redirects: AtomicU64,
    /// Cluster events an operator (and the benchmark) wants counted since this process started.
    pub events: ClusterEvents,
}

/// Counters of the cluster's unplanned events, reported in `GET /v1/cluster` under `events`.
/// Each one is costly (shards move, sends in flight come back `unavailable`), so a rising count
/// on a healthy cluster is the sign of trouble: overload starving the control plane, a flapping
/// link, a database too slow for lease renewals.
#[derive(Default)]
pub struct ClusterEvents {
    /// Live-looking peers this node declared down because they stopped answering heartbeats
    /// (a closed connection is not counted: that is a peer really gone).
    pub peers_declared_silent: AtomicU64,
    /// Shards this node served that stopped without a planned hand-off: lease lost to another
    /// owner, lease not renewed in time, or the shard actor exited.
    pub shards_lost: AtomicU64,
}

impl ClusterEvents {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "peers_declared_silent": self.peers_declared_silent.load(Ordering::Relaxed),
            "shards_lost": self.shards_lost.load(Ordering::Relaxed),
        })
    }
}

impl NodeContext {
    pub fn new(config: Config, node_name: String, stores: Stores) -> Arc<Self> {
        let routing = Routing::new(config.cluster.shard_count);
        Arc::new(NodeContext {
            outbound: Outbound::new(node_name.clone()),
            presence: Presence::new(node_name.clone()),
            push: Push::new(config.push.clone()),
            boot_id: format!("{}#{}", node_name, uuid::Uuid::new_v4().simple()),
            node_name,
            stores,
            hub: Hub::default(),
            routing,
            config,
            conversations: ConversationCache::new(CONVERSATION_CACHE_MAX, GROUP_CACHE_TTL),
            peers: RwLock::new(Vec::new()),
            known: RwLock::new(Vec::new()),
            http: OnceLock::new(),
            redirects: AtomicU64::new(0),
            events: ClusterEvents::default(),
        })
    }

    pub fn set_http_addr(&self, addr: SocketAddr) {
        let _ = self.http.set(addr);
    }

    /// Where peers dial this node (its config entry's advertised or cluster address).
    pub fn dial_address(&self) -> String {
        self.config.node(&self.node_name).map(|n| n.dial_address()).unwrap_or_default()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.get().copied()
    }

    /// Where browsers and tools reach this node's HTTP: its entry's `advertise_http`, else the
    /// bound address. What peers and `/v1/cluster` show for this node.
    pub fn advertised_http(&self) -> String {
        self.config
            .node(&self.node_name)
            .and_then(|n| n.advertise_http.clone())
            .or_else(|| self.http_addr().map(|a| a.to_string()))
            .unwrap_or_default()
    }

    /// The live peers and every identified one (the cluster agent publishes both every
    /// heartbeat). Sends waiting on a peer that is no longer live are answered `unavailable` now.
    pub fn set_peers(&self, live: Vec<(String, ActorRef<GatewayMsg>)>, known: Vec<(String, ActorRef<GatewayMsg>)>) {
        self.outbound.retain_peers(live.iter().map(|(_, g)| g.get_id()));
        self.presence.set_peers(&live);
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = live;
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = known;
    }

    /// Cast the outcomes of sends that came in a `SendBatch` from `node` back to it: one frame.
    /// Dropped when `node` was never identified.
    pub fn send_results(&self, node: &str, results: Vec<(u64, SendOutcome)>) {
        if results.is_empty() {
            return;
        }
        let gateway = {
            let peers = self.known.read().unwrap_or_else(|p| p.into_inner());
            peers.iter().find(|(n, _)| n == node).map(|(_, g)| g.clone())
        };
        if let Some(gateway) = gateway {
            let _ = gateway.cast(GatewayMsg::Frame(codec::encode(&NodePayload::SendResults { results })));
        }
    }

    pub fn count_redirect(&self) {
        self.redirects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn redirects(&self) -> u64 {
        self.redirects.load(Ordering::Relaxed)
    }

    pub fn shard_of(&self, conversation: ConversationId) -> ShardId {
        shard_for(conversation, self.config.cluster.shard_count)
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.config.limits.shard_call_timeout_ms)
    }

    /// The user a bearer token belongs to, and until when the token is valid.
    pub async fn authenticate(&self, token: &str) -> NodeResult<TokenGrant> {
        if token.is_empty() {
            return Err(NodeError::client(ErrorCode::NotAuthenticated, "a bearer token is required"));
        }
        self.stores
            .directory
            .token_user(&token_hash(token), now_ms())
            .await?
            .ok_or_else(|| NodeError::client(ErrorCode::BadToken, "unknown or expired token"))
    }

    /// Drop the cached copy of a conversation (a group that changed).
    fn forget(&self, id: ConversationId) {
        self.conversations.forget(id);
    }

    /// The direct conversation between `me` and `peer`, created (indexed) on first use.
    /// `unknown_user` if `peer` does not exist.
    pub async fn direct_conversation(&self, me: UserId, peer: UserId) -> NodeResult<Arc<ConversationRecord>> {
        let id = ConversationId::direct(me, peer);
        if let Some(c) = self.conversations.get(id) {
            return Ok(c);
        }
        let ticket = self.conversations.ticket();
        let wanted = if me == peer { vec![me] } else { vec![me, peer] };
        let found = self.stores.directory.users_by_id(&wanted).await?;
        if found.len() != wanted.len() {
            return Err(NodeError::client(ErrorCode::UnknownUser, format!("no user {peer}")));
        }
        let mut members = wanted;
        members.sort();
        self.stores.directory.add_conversation(id, ConversationKind::Direct, &members, now_ms()).await?;

        Ok(self.conversations.remember(ticket, ConversationRecord::direct(id, members)))
    }

    /// A conversation `user` belongs to; `unknown_conversation` otherwise (membership is not
    /// disclosed to non-members).
    pub async fn member_conversation(&self, user: UserId, id: ConversationId) -> NodeResult<Arc<ConversationRecord>> {
        let record = match self.conversations.get(id) {
            Some(c) => c,
            None => {
                // Taken before the read: a group change announced while it is in flight keeps
                // what it returns out of the cache (see `ConversationCache`).
                let ticket = self.conversations.ticket();
                match self.stores.directory.conversation(id).await? {
                    Some(c) => self.conversations.remember(ticket, c),
                    None => return Err(unknown_conversation()),
                }
            }
        };
        if record.members.contains(&user) {
            Ok(record)
        } else {
            Err(unknown_conversation())
        }
    }

    /// Create a group owned by `owner` with `members` (the owner is added), and tell every member.
    pub async fn create_group(&self, owner: UserId, name: &str, members: &[UserId]) -> NodeResult<GroupView> {
        let name = valid_group_name(name)?;
        let mut all = members.to_vec();
        all.push(owner);
        all.sort();
        all.dedup();
        self.check_group_size(all.len())?;
        self.check_addable(owner, &all).await?;
        let record = ConversationRecord {
            id: ConversationId::new_group(),
            kind: ConversationKind::Group,
            members: all,
            name: Some(name),
            owner: Some(owner),
            version: 0,
        };
        self.stores.directory.create_group(&record, now_ms()).await?;
        let view = group_view(&record);
        self.announce_group(&record.members, view.clone());
        Ok(view)
    }

    /// A group `user` belongs to.
    pub async fn group(&self, user: UserId, id: ConversationId) -> NodeResult<GroupView> {
        let record = self.member_conversation(user, id).await?;
        if record.kind != ConversationKind::Group {
            return Err(unknown_group());
        }
        Ok(group_view(&record))
    }

    /// Apply `change` by `user` to a group, as a compare-and-set on its version (read fresh from the
    /// directory, never from the cache), and tell the members before and after the change.
    ///
    /// Checks run in the order that discloses least: membership first (a non-member learns
    /// nothing, not even that the group exists), then the right to make the change, then its input.
    pub async fn change_group(&self, user: UserId, id: ConversationId, change: GroupChange) -> NodeResult<GroupView> {
        let mut users_checked = false;
        for _ in 0..GROUP_CHANGE_ATTEMPTS {
            let current = match self.stores.directory.conversation(id).await? {
                Some(r) if r.kind == ConversationKind::Group && r.members.contains(&user) => r,
                _ => return Err(unknown_group()),
            };
            let owner = current.owner;
            let is_owner = owner == Some(user);
            let mut next = current.clone();
            let mut removed = Vec::new();
            match &change {
                GroupChange::Add(users) => {
                    if !is_owner {
                        return Err(NodeError::client(ErrorCode::Forbidden, "only the group's owner adds members"));
                    }
                    self.check_group_size(users.len().min(MAX_GROUP_MEMBERS + 1))?;
                    if !users_checked {
                        // Only those who are not members yet are being added.
                        let joining: Vec<UserId> =
                            users.iter().copied().filter(|u| !current.members.contains(u)).collect();
                        self.check_addable(user, &joining).await?;
                        users_checked = true;
                    }
                    next.members.extend(users.iter().copied());
                    next.members.sort();
                    next.members.dedup();
                    self.check_group_size(next.members.len())?;
                }
                GroupChange::Remove(target) => {
                    if *target != user && !is_owner {
                        return Err(NodeError::client(ErrorCode::Forbidden, "only the group's owner removes others"));
                    }
                    if !next.members.contains(target) {
                        return Err(NodeError::client(ErrorCode::UnknownUser, format!("{target} is not a member")));
                    }
                    next.members.retain(|m| m != target);
                    removed.push(*target);
                    // The lowest remaining id takes over from a leaving owner. The last member
                    // leaving keeps the owner recorded: the group stays, empty, and nobody can
                    // see or change it again (every request needs a member).
                    if owner == Some(*target) {
                        next.owner = next.members.first().copied().or(owner);
                    }
                }
                GroupChange::Rename(name) => {
                    if !is_owner {
                        return Err(NodeError::client(ErrorCode::Forbidden, "only the group's owner renames it"));
                    }
                    next.name = Some(valid_group_name(name)?);
                }
            }
            if next == current {
                return Ok(group_view(&current));
            }
            if self.stores.directory.update_group(current.version, &next, &removed).await? {
                next.version = current.version + 1;
                let mut told = current.members.clone();
                told.extend(next.members.iter().copied());
                told.sort();
                told.dedup();
                let view = group_view(&next);
                self.announce_group(&told, view.clone());
                return Ok(view);
            }
        }
        Err(NodeError::client(ErrorCode::Unavailable, "the group is being changed by others; retry"))
    }

    fn check_group_size(&self, members: usize) -> NodeResult<()> {
        if members > MAX_GROUP_MEMBERS {
            return Err(NodeError::client(
                ErrorCode::InvalidField,
                format!("a group has at most {MAX_GROUP_MEMBERS} members"),
            ));
        }
        Ok(())
    }

    /// Every one of `users` exists and lets `adder` add them to a group (their `groups` privacy
    /// setting, PROTOCOL.md §5 "Privacy and contacts"); the adder may always add themselves.
    async fn check_addable(&self, adder: UserId, users: &[UserId]) -> NodeResult<()> {
        let found = self.stores.directory.presence_view(adder, users).await?;
        if let Some(missing) = users.iter().find(|u| !found.iter().any(|f| f.user == **u)) {
            return Err(NodeError::client(ErrorCode::UnknownUser, format!("no user {missing}")));
        }
        if let Some(refuses) =
            found.iter().find(|r| r.user != adder && !r.settings.lets_add_to_groups(r.watcher_is_contact))
        {
            return Err(NodeError::client(
                ErrorCode::Forbidden,
                format!("{} does not let you add them to groups (their privacy settings)", refuses.user),
            ));
        }
        Ok(())
    }

    /// Forget the group here and push its new view to `users` on every node (each forgets it too).
    fn announce_group(&self, users: &[UserId], view: GroupView) {
        self.forget(view.conversation_id);
        self.fan_out(users, UserEvent::Group(view), 0);
    }

    /// Resolve the target of a send: exactly one of `to` / `conversation_id`.
    pub async fn send_target(
        &self,
        user: UserId,
        to: Option<UserId>,
        conversation_id: Option<ConversationId>,
    ) -> NodeResult<Arc<ConversationRecord>> {
        match (to, conversation_id) {
            (Some(peer), None) => self.direct_conversation(user, peer).await,
            (None, Some(id)) => self.member_conversation(user, id).await,
            (Some(peer), Some(id)) if ConversationId::direct(user, peer) == id => {
                self.direct_conversation(user, peer).await
            }
            _ => Err(NodeError::client(ErrorCode::InvalidField, "give exactly one of `to` and `conversation_id`")),
        }
    }

    fn route(&self, shard: ShardId) -> NodeResult<crate::routing::ShardRoute> {
        self.routing.get(shard).ok_or(NodeError::ShardUnavailable(shard))
    }

    /// Validate and resolve a send, and hand it to the owning shard *now* (so sends from one
    /// session reach the shard in the order the client sent them); the returned [`PendingAck`]
    /// waits for the durable outcome. `req` is what the client asked, in the HTTP form (the
    /// WebSocket `send` frame has the same fields).
    pub async fn dispatch_send(&self, sender: UserId, req: SendRequest, origin_session: u64) -> NodeResult<PendingAck> {
        let SendRequest { client_msg_id, to, conversation_id, body, media_id } = req;
        validate_body(&body, media_id.is_some())?;
        let conversation = self.send_target(sender, to, conversation_id).await?;
        let media = match media_id {
            Some(id) => Some(self.media_ref(id).await?),
            None => None,
        };
        let cmd = SendCommand {
            sender,
            client_msg_id,
            conversation_id: conversation.id,
            members: conversation.members.clone(),
            body,
            origin_session,
            media,
        };
        let shard = self.shard_of(conversation.id);
        let route = self.route(shard)?;
        // Cast now (in the caller's order); only the wait for the outcome is deferred.
        let rx = match route.target {
            RouteTarget::Local(actor) => {
                let (tx, rx) = ractor::concurrency::oneshot();
                actor
                    .cast(ShardMsg::Send { cmd, reply: AckTo::Local(tx.into()) })
                    .map_err(|_| NodeError::ShardUnavailable(shard))?;
                AckReceiver::Local(rx)
            }
            RouteTarget::Remote(gateway) => AckReceiver::Remote(self.outbound.send(&gateway, cmd)),
        };
        Ok(PendingAck { rx, timeout: self.call_timeout() })
    }

    /// Store a message and wait for its durable ack.
    pub async fn send(&self, sender: UserId, req: SendRequest, origin_session: u64) -> NodeResult<StoredAck> {
        self.dispatch_send(sender, req, origin_session).await?.wait().await
    }

    /// What a message with upload `id` carries, from the upload's record: `unknown_media` when
    /// there is none. Any signed-in user who holds an id may attach it (forwarding a photo), the
    /// same way anyone holding it may download it (PROTOCOL.md §5, "Media").
    pub async fn media_ref(&self, id: MediaId) -> NodeResult<MediaRef> {
        match self.stores.directory.media(id).await? {
            Some(record) => Ok(record.media),
            None => Err(NodeError::client(ErrorCode::UnknownMedia, format!("no media with id {id}"))),
        }
    }

    /// Record a delivered/read acknowledgement (fire-and-forget: receipts are advisory and the
    /// client repeats cumulative acks, so a lost one is superseded by the next).
    pub async fn receipt(&self, cmd: ReceiptCommand) -> NodeResult<()> {
        let route = self.route(self.shard_of(cmd.conversation_id))?;
        match route.target {
            RouteTarget::Local(actor) => {
                actor.cast(ShardMsg::Receipt(cmd)).map_err(|e| NodeError::Actor(e.to_string()))
            }
            RouteTarget::Remote(gateway) => gateway
                .cast(GatewayMsg::Frame(codec::encode(&NodePayload::Receipt(cmd))))
                .map_err(|e| NodeError::Actor(e.to_string())),
        }
    }

    /// A page of history (ascending) and whether older messages exist.
    pub async fn history(
        &self,
        user: UserId,
        conversation: ConversationId,
        before_seq: Option<Seq>,
        limit: Option<u32>,
    ) -> NodeResult<(Vec<MessageView>, bool)> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(NodeError::client(ErrorCode::InvalidField, format!("limit must be 1..={MAX_PAGE}")));
        }
        self.member_conversation(user, conversation).await?;
        self.ask_shard(
            self.shard_of(conversation),
            "shard history",
            (conversation, before_seq, limit),
            |(conversation, before_seq, limit), reply| ShardMsg::History { conversation, before_seq, limit, reply },
            |(conversation, before_seq, limit)| NodePayload::History { conversation, before_seq, limit },
            |answer| match answer {
                NodePayload::HistoryResult(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// Whether everyone of `members` (a direct chat's two) shares read receipts: a read in that
    /// chat is told to the others only then (PROTOCOL.md §5, "Privacy and contacts"). Read from
    /// the directory, so a change of the setting holds from the next read on, on every node.
    pub async fn read_receipts_shared(&self, user: UserId, members: &[UserId]) -> NodeResult<bool> {
        let found = self.stores.directory.presence_view(user, members).await?;
        Ok(found.iter().all(|r| r.settings.read_receipts))
    }

    /// The user's conversations with last message and unread count, newest activity first.
    pub async fn conversations(&self, user: UserId) -> NodeResult<Vec<ConversationSummary>> {
        let records = self.stores.directory.user_conversations(user).await?;
        // Direct chats whose read position is not shared (either side turned read receipts off):
        // the peer's read cursor is not shown, only how far their devices have received.
        let mut people: Vec<UserId> = records
            .iter()
            .filter(|r| r.kind == ConversationKind::Direct)
            .flat_map(|r| r.members.iter().copied())
            .collect();
        people.sort();
        people.dedup();
        let no_receipts: HashSet<UserId> = if people.is_empty() {
            HashSet::new()
        } else {
            let found = self.stores.directory.presence_view(user, &people).await?;
            found.iter().filter(|r| !r.settings.read_receipts).map(|r| r.user).collect()
        };
        let muted: HashMap<ConversationId, i64> =
            self.stores.directory.muted(user, now_ms()).await?.into_iter().collect();
        let mut by_shard: HashMap<ShardId, Vec<ConversationRecord>> = HashMap::new();
        for r in records {
            by_shard.entry(self.shard_of(r.id)).or_default().push(r);
        }
        let mut out = Vec::new();
        for (shard, records) in by_shard {
            let ids: Vec<ConversationId> = records.iter().map(|r| r.id).collect();
            // Groups: how far every *current* member but this user has got, over the member list
            // the directory holds now (a member who left keeps a cursor that no longer counts).
            let groups: Vec<(ConversationId, Vec<UserId>)> = records
                .iter()
                .filter(|r| r.kind == ConversationKind::Group)
                .map(|r| (r.id, r.members.iter().copied().filter(|m| *m != user).collect::<Vec<_>>()))
                .filter(|(_, others)| !others.is_empty())
                .collect();
            let (summaries, floors) = if groups.is_empty() {
                (self.summaries(shard, user, ids).await?, Vec::new())
            } else {
                tokio::try_join!(self.summaries(shard, user, ids), self.group_floors(shard, groups))?
            };
            for record in records {
                let s = summaries.iter().find(|s| s.conversation_id == record.id);
                let last_seq = s.map_or(0, |s| s.last_seq);
                let alone = record.members.iter().all(|m| *m == user);
                let (others_delivered_seq, others_read_seq) = match record.kind {
                    _ if alone => (last_seq, last_seq),
                    ConversationKind::Group => floors
                        .iter()
                        .find(|f| f.conversation_id == record.id)
                        .map_or((0, 0), |f| (f.delivered_seq.min(last_seq), f.read_seq.min(last_seq))),
                    // The store reports the one other user's cursor: in a direct chat, the peer's
                    // (its membership never changes).
                    ConversationKind::Direct => {
                        let (delivered, read) = s.and_then(|s| s.peer_cursor).unwrap_or((0, 0));
                        let hidden = record.members.iter().any(|m| no_receipts.contains(m));
                        (delivered, if hidden { 0 } else { read })
                    }
                };
                out.push(ConversationSummary {
                    conversation_id: record.id,
                    kind: record.kind,
                    members: record.members.clone(),
                    last_seq,
                    others_delivered_seq,
                    others_read_seq,
                    read_seq: s.map_or(0, |s| s.read_seq),
                    unread: s.map_or(0, |s| s.unread),
                    last_message: s.and_then(|s| s.last_message.clone()),
                    name: record.name.clone(),
                    owner: record.owner,
                    muted_until_ms: muted.get(&record.id).copied(),
                });
            }
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.last_message.as_ref().map_or(0, |m| m.sent_at_ms)));
        Ok(out)
    }

    /// Everything this device has not acknowledged, shard by shard, up to
    /// [`MAX_SYNC_REPLY_BYTES`](crate::actors::store::MAX_SYNC_REPLY_BYTES) in all: each shard's answer is capped at that, and so is the
    /// whole — the session holds the reply while its client reads it (for up to
    /// `limits.sync_timeout_ms`), and a user with busy chats on many shards would otherwise hold
    /// one capped answer per shard. Once the cap cuts, the remaining shards are not asked; all
    /// that was cut or not asked is reported as truncated, for the client to page with `history`.
    pub async fn sync(&self, request: SyncRequest) -> SyncReply {
        let mut by_shard: HashMap<ShardId, Vec<ConversationId>> = HashMap::new();
        for c in &request.conversations {
            by_shard.entry(self.shard_of(*c)).or_default().push(*c);
        }
        let mut reply = SyncReply::default();
        let mut full = false;
        for (shard, conversations) in by_shard {
            if full {
                reply.truncated.extend(conversations);
                continue;
            }
            // A shard that cannot answer now does not spoil the others: its conversations are
            // reported as truncated and the client pages them with `history` later.
            let part = match self.route(shard) {
                Ok(route) => {
                    let req = SyncRequest { conversations: conversations.clone(), ..request.clone() };
                    match route.target {
                        RouteTarget::Local(actor) => {
                            match call(&actor, |reply| ShardMsg::Sync { req, reply }, self.call_timeout(), "shard sync")
                                .await
                            {
                                Ok(Ok(part)) => Some(part),
                                Ok(Err(_)) | Err(_) => None,
                            }
                        }
                        RouteTarget::Remote(gateway) => {
                            match remote_call(&gateway, &NodePayload::Sync(req), self.call_timeout()).await {
                                Ok(NodePayload::SyncResult(part)) => Some(part),
                                _ => None,
                            }
                        }
                    }
                }
                Err(_) => None,
            };
            match part {
                Some(part) => {
                    reply.messages.extend(part.messages);
                    reply.truncated.extend(part.truncated);
                    let before = reply.messages.len();
                    reply = cap_sync_reply(reply);
                    full = reply.messages.len() < before;
                }
                None => reply.truncated.extend(conversations),
            }
        }
        reply
    }

    async fn summaries(
        &self,
        shard: ShardId,
        user: UserId,
        conversations: Vec<ConversationId>,
    ) -> NodeResult<Vec<ShardSummary>> {
        self.ask_shard(
            shard,
            "shard summaries",
            conversations,
            |conversations, reply| ShardMsg::Summaries { user, conversations, reply },
            |conversations| NodePayload::Summaries { user, conversations },
            |answer| match answer {
                NodePayload::SummariesResult(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// The [`GroupFloor`] of each group, from the shard that owns them.
    async fn group_floors(
        &self,
        shard: ShardId,
        groups: Vec<(ConversationId, Vec<UserId>)>,
    ) -> NodeResult<Vec<GroupFloor>> {
        self.ask_shard(
            shard,
            "shard group floors",
            groups,
            |groups, reply| ShardMsg::GroupFloors { groups, reply },
            |groups| NodePayload::GroupFloors { groups },
            |answer| match answer {
                NodePayload::GroupFloorsResult(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// A read from the shard's owner: this node's shard actor, or the owning peer through its
    /// gateway. `args` go into whichever request is made; `answer` picks the result out of the
    /// peer's reply (another payload counts as no answer). A refusal becomes a client error.
    async fn ask_shard<A, T: Send + 'static>(
        &self,
        shard: ShardId,
        what: &'static str,
        args: A,
        local: impl FnOnce(A, ractor::RpcReplyPort<Result<T, ErrorCode>>) -> ShardMsg,
        remote: impl FnOnce(A) -> NodePayload,
        answer: impl FnOnce(NodePayload) -> Option<Result<T, ErrorCode>>,
    ) -> NodeResult<T> {
        let result = match self.route(shard)?.target {
            RouteTarget::Local(actor) => call(&actor, |reply| local(args, reply), self.call_timeout(), what).await?,
            RouteTarget::Remote(gateway) => answer(remote_call(&gateway, &remote(args), self.call_timeout()).await?)
                .ok_or(NodeError::Timeout(what))?,
        };
        result.map_err(|code| NodeError::client(code, refusal_text(code)))
    }

    /// Push an event to the live sessions of `users`: on this node through the hub, on every live
    /// peer through its gateway (a remote cast: at-most-once; a missed push is recovered by the
    /// device's reconnect sync, because its cursor only moves on its own `delivered`).
    pub fn fan_out(&self, users: &[UserId], event: UserEvent, skip_session: u64) {
        self.fan_out_all(vec![Delivery { users: users.to_vec(), event, skip_session }]);
    }

    /// Hand every delivery (in order) to each peer, as one frame, and to this node's sessions.
    /// A shard fans out a whole commit this way: one cluster frame per peer per commit.
    pub fn fan_out_all(&self, deliveries: Vec<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner()).clone();
        if !peers.is_empty() {
            let sizes: Vec<usize> = deliveries.iter().map(delivery_bytes).collect();
            if sizes.iter().sum::<usize>() <= DELIVER_FRAME_BUDGET {
                let payload = NodePayload::DeliverBatch { deliveries };
                let bytes = codec::encode(&payload);
                let NodePayload::DeliverBatch { deliveries } = payload else { unreachable!("built above") };
                return self.cast_and_deliver(&peers, vec![bytes], deliveries);
            }
            // Rare (large groups, large bodies): split in order, cloning the parts.
            let frames = split_by_budget(&sizes, DELIVER_FRAME_BUDGET)
                .into_iter()
                .map(|r| codec::encode(&NodePayload::DeliverBatch { deliveries: deliveries[r].to_vec() }))
                .collect();
            return self.cast_and_deliver(&peers, frames, deliveries);
        }
        self.deliver_local(deliveries);
    }

    fn cast_and_deliver(&self, peers: &[(String, ActorRef<GatewayMsg>)], frames: Vec<Vec<u8>>, local: Vec<Delivery>) {
        for (_, gateway) in peers {
            for bytes in &frames {
                let _ = gateway.cast(GatewayMsg::Frame(bytes.clone()));
            }
        }
        self.deliver_local(local);
    }

    /// Deliver to this node's sessions (from a local shard or a peer). A changed group is
    /// forgotten first, so that sends through this node use its new member list from now on.
    pub fn deliver_local(&self, deliveries: Vec<Delivery>) {
        for d in &deliveries {
            if let UserEvent::Group(g) = &d.event {
                self.forget(g.conversation_id);
            }
        }
        self.hub.deliver_all(deliveries);
    }
}

enum AckReceiver {
    Local(ractor::concurrency::OneshotReceiver<SendOutcome>),
    Remote(RemoteAck),
}

/// A send handed to its shard, waiting for the commit.
pub struct PendingAck {
    rx: AckReceiver,
    timeout: Duration,
}

impl PendingAck {
    /// The durable outcome. A timeout, a vanished shard or peer, or an undecodable answer means
    /// "outcome unknown": the client gets `unavailable` and retries with the same client_msg_id.
    pub async fn wait(self) -> NodeResult<StoredAck> {
        let outcome = match self.rx {
            AckReceiver::Local(rx) => tokio::time::timeout(self.timeout, rx).await.ok().and_then(Result::ok),
            AckReceiver::Remote(ack) => ack.outcome(self.timeout).await,
        };
        match outcome {
            Some(SendOutcome::Stored(ack)) => Ok(ack),
            Some(SendOutcome::Refused(code)) => Err(NodeError::client(code, refusal_text(code))),
            None => Err(NodeError::Timeout("shard send")),
        }
    }
}

/// A request/response to a peer's gateway, with a timeout; the answer is decoded fallibly.
pub async fn remote_call(
    gateway: &ActorRef<GatewayMsg>,
    payload: &NodePayload,
    timeout: Duration,
) -> NodeResult<NodePayload> {
    let (tx, rx) = ractor::concurrency::oneshot();
    gateway.cast(GatewayMsg::Call(codec::encode(payload), tx.into())).map_err(|e| NodeError::Actor(e.to_string()))?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(bytes)) => Ok(codec::decode(&bytes)?),
        Ok(Err(_)) | Err(_) => Err(NodeError::Timeout("peer call")),
    }
}

fn unknown_group() -> NodeError {
    NodeError::client(ErrorCode::UnknownConversation, "no such group")
}

/// A group's name as stored: trimmed, 1..=`MAX_GROUP_NAME_BYTES` bytes, no control characters.
fn valid_group_name(name: &str) -> NodeResult<String> {
    let name = name.trim();
    if name.is_empty() || name.len() > MAX_GROUP_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(NodeError::client(
            ErrorCode::InvalidField,
            format!("a group name is 1 to {MAX_GROUP_NAME_BYTES} bytes without control characters"),
        ));
    }
    Ok(name.to_string())
}

fn group_view(r: &ConversationRecord) -> GroupView {
    GroupView {
        conversation_id: r.id,
        name: r.name.clone().unwrap_or_default(),
        // Every group has an owner (`create_group` sets it; a leaving owner hands it on or, as
        // the last member, keeps it); the nil id would only show a record written by hand.
        owner: r.owner.unwrap_or(UserId(uuid::Uuid::nil())),
        members: r.members.clone(),
        version: r.version,
    }
}

fn unknown_conversation() -> NodeError {
    NodeError::client(ErrorCode::UnknownConversation, "no such conversation")
}

fn refusal_text(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unavailable => "temporarily unavailable; retry with the same client_msg_id",
        _ => "refused",
    }
}

/// Body rules: non-empty and at most `MAX_BODY_BYTES`.
pub fn validate_body(body: &str, has_media: bool) -> NodeResult<()> {
    if body.is_empty() && !has_media {
        return Err(NodeError::client(
            ErrorCode::InvalidField,
            "body must not be empty (unless the message carries media)",
        ));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(NodeError::client(ErrorCode::BodyTooLarge, format!("body exceeds {MAX_BODY_BYTES} bytes")));
    }
    Ok(())
}

/// `call` with a timeout that maps every failure to a `NodeError`. A timeout means "outcome
/// unknown" and is reported as `unavailable` so the client retries with the same ids.
pub async fn call<M, T, F>(
    actor: &ractor::ActorRef<M>,
    build: F,
    timeout: Duration,
    what: &'static str,
) -> NodeResult<T>
where
    M: ractor::Message,
    T: Send + 'static,
    F: FnOnce(ractor::RpcReplyPort<T>) -> M,
{
    match actor.call(build, Some(timeout)).await {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(NodeError::Timeout(what)),
        Ok(CallResult::SenderError) => Err(NodeError::Timeout(what)),
        Err(e) => Err(NodeError::Actor(format!("{what}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_by_budget_keeps_order_and_bounds() {
        assert_eq!(split_by_budget(&[], 10), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(split_by_budget(&[3, 3, 3], 10), vec![0..3]);
        assert_eq!(split_by_budget(&[4, 4, 4, 4], 10), vec![0..2, 2..4]);
        // An item over the budget travels alone; nothing is dropped.
        assert_eq!(split_by_budget(&[2, 30, 2, 2], 10), vec![0..1, 1..2, 2..4]);
        assert_eq!(split_by_budget(&[30], 10), vec![0..1]);
    }
}
