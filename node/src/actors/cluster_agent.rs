//! `ClusterAgentActor`: membership. It runs this node's ractor_cluster `NodeServer` (listening only
//! on the configured cluster address, authenticated by the cookie), and makes up for what
//! ractor_cluster does not do:
//!
//! - **dialling**: nothing re-dials a dropped peer, so the agent dials every configured peer it has
//!   no session with, with exponential backoff;
//! - **failure detection**: ractor_cluster notices a closed socket (kill -9: ~1 ms) but never a
//!   frozen peer (SIGSTOP), so the agent pings every peer's gateway each [`HEARTBEAT`] and declares
//!   it down when it has not *answered* for [`ClusterAgentState::peer_down_after`]: the lease TTL,
//!   at least [`PEER_DOWN_AFTER`]. *Silence*, not slowness: a ping may take up to [`PING_TIMEOUT`]
//!   and its answer still counts when it comes. Pings travel the same ractor_cluster connection,
//!   runtime and gateway mailbox as the data, so on a saturated box every answer is late and some
//!   come in bursts; a live peer keeps answering, a frozen one answers nothing. Why no shorter
//!   than the lease TTL: a frozen peer's database connections stay open, so its session locks and
//!   leases hold until the lease expires, and declaring it down earlier moves nothing sooner; but
//!   every false verdict on a live, merely overloaded peer costs routes and shard moves. (Until
//!   session 7 a ping slower than 1.5 s was discarded and 1.5 s of silence was "down": overload
//!   alone declared live peers down by the dozen, shards moved, in-flight sends came back
//!   `unavailable`, and the resends added load — a metastable loop.);
//! - **identity per boot**: the `NodeServer` name is the node's boot id (`n1#<uuid>`), so a
//!   restarted node is a new peer, never confused with (or refused because of) its previous life;
//! - **joining through seeds**: a node need not be listed in every peer's config. It dials the
//!   `cluster.seeds` addresses, and every node gossips its live members (name, dial address) each
//!   second, so the newcomer learns the others and the others learn it; each pair then connects
//!   (ractor_cluster does not relay, so the mesh must be full). Learned nodes silent for
//!   [`FORGET_LEARNED_AFTER`] stop being dialled.
//!
//! Its outputs: the live member list for the shard manager (placement), the peers' gateways for
//! fan-out, and remote routes (peers announce the shards they serve every heartbeat).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_protocol::cluster::NodePayload;
use parley_protocol::{codec, Epoch, ShardId};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage, RactorMessage};

use crate::actors::gateway::{GatewayMsg, GATEWAY_GROUP};
use crate::actors::shard_manager::ShardManagerMsg;
use crate::context::{remote_call, NodeContext};

/// How often peers are pinged, dialled and told our shards. 200 ms keeps failure detection and
/// route convergence well under a second at a cost of a few small messages per peer per tick.
pub const HEARTBEAT: Duration = Duration::from_millis(200);
/// The shortest silence after which a peer is declared down (its shards move); the actual bound
/// is the lease TTL when that is longer ([`ClusterAgentState::peer_down_after`]).
pub const PEER_DOWN_AFTER: Duration = Duration::from_millis(1_500);
/// Bound on one ping. Longer than any down verdict on purpose (see the module doc): a late answer
/// proves the peer alive. At most `PING_TIMEOUT / HEARTBEAT` (50) pings per peer are in
/// flight, each a spawned task holding a few hundred bytes.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(200);
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bound on one identify or ping call.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Members are gossiped every this many heartbeats (1 s).
const GOSSIP_EVERY_TICKS: u64 = 5;
/// A gossip list longer than this is ignored (a bound on what a peer can make us dial).
const MAX_GOSSIP_MEMBERS: usize = 1_024;
/// A node learned by gossip (not in our config) that has not been alive for this long is
/// forgotten: it left the cluster, and dialling it forever would be noise.
const FORGET_LEARNED_AFTER: Duration = Duration::from_secs(300);

pub struct ClusterAgentActor;

pub struct ClusterAgentArgs {
    pub ctx: Arc<NodeContext>,
    pub shards: ActorRef<ShardManagerMsg>,
    /// This node's cluster listen address.
    pub listen: SocketAddr,
}

struct Peer {
    boot_id: String,
    gateway: ActorRef<GatewayMsg>,
    http: String,
    /// Where it is dialled (from its identity).
    dial: String,
    last_seen: Instant,
    alive: bool,
}

struct Known {
    dial: String,
    /// `None` for nodes of our own config (never forgotten).
    learned: Option<Instant>,
}

struct Dial {
    next: Instant,
    backoff: Duration,
    in_progress: bool,
}

pub struct ClusterAgentState {
    ctx: Arc<NodeContext>,
    shards: ActorRef<ShardManagerMsg>,
    node_server: Option<ActorRef<NodeServerMessage>>,
    peers: HashMap<String, Peer>,
    /// Remote gateway cells already identified (or being identified).
    cells: HashSet<ActorId>,
    /// Open ractor_cluster sessions per peer node name.
    sessions: HashMap<String, usize>,
    dials: HashMap<String, Dial>,
    /// Every node we know how to dial, by name: the config's, and those learned by gossip (with
    /// when they were learned or last alive, for forgetting them).
    known: HashMap<String, Known>,
    members: Vec<String>,
    ticks: u64,
    started: Instant,
    /// Whether the shard manager has been told it may place shards (see `STARTUP_SETTLE`).
    settled: bool,
}

/// A starting node waits this long (or until every configured peer answered) before it takes
/// shards: acting on a one-node view would grab shards that live peers own and must hand back.
pub const STARTUP_SETTLE: Duration = Duration::from_millis(2_500);

/// A member as `parley status` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MemberView {
    pub node: String,
    pub boot_id: String,
    pub http: String,
    pub alive: bool,
    pub last_seen_ms_ago: u64,
}

#[derive(RactorMessage)]
pub enum ClusterAgentMsg {
    Tick,
    SessionUp(String),
    SessionDown(String),
    DialDone {
        node: String,
        ok: bool,
    },
    Identified {
        cell: ActorId,
        gateway: ActorRef<GatewayMsg>,
        node: String,
        boot_id: String,
        http: String,
        dial: String,
    },
    IdentifyFailed(ActorId),
    Alive {
        node: String,
        boot_id: String,
    },
    Served {
        node: String,
        boot_id: String,
        shards: Vec<(ShardId, Epoch)>,
    },
    Gossip(Vec<(String, String)>),
    Members {
        reply: RpcReplyPort<Vec<MemberView>>,
    },
}

/// The node name in a ractor_cluster peer name `n1#<boot>@host`.
fn node_of(peer_name: &str) -> String {
    peer_name.split(['#', '@']).next().unwrap_or(peer_name).to_string()
}

/// One heartbeat: whether the peer's gateway answered within [`PING_TIMEOUT`], however late.
async fn ping(gateway: &ActorRef<GatewayMsg>) -> bool {
    matches!(remote_call(gateway, &NodePayload::Ping { nonce: 0 }, PING_TIMEOUT).await, Ok(NodePayload::Pong { .. }))
}

struct Events(ActorRef<ClusterAgentMsg>);

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, _ses: ractor_cluster::node::NodeServerSessionInformation) {}
    fn node_session_disconnected(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        if let Some(name) = ses.peer_name {
            let _ = self.0.cast(ClusterAgentMsg::SessionDown(name.name));
        }
    }
    fn node_session_authenticated(&self, _ses: ractor_cluster::node::NodeServerSessionInformation) {}
    fn node_session_ready(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        if let Some(name) = ses.peer_name {
            let _ = self.0.cast(ClusterAgentMsg::SessionUp(name.name));
        }
    }
}

impl ClusterAgentState {
    fn me(&self) -> &str {
        &self.ctx.node_name
    }

    /// How long a peer may go without answering a heartbeat before it is declared down: the lease
    /// TTL, at least [`PEER_DOWN_AFTER`] (see the module doc).
    fn peer_down_after(&self) -> Duration {
        Duration::from_millis(self.ctx.config.cluster.lease_ttl_ms).max(PEER_DOWN_AFTER)
    }

    fn dial_due(&mut self, me: &ActorRef<ClusterAgentMsg>) {
        let Some(ns) = self.node_server.clone() else { return };
        let now = Instant::now();
        // The smaller name dials the larger: one connection per pair, no duplicate-session
        // churn. Whoever restarts is re-dialled by (or re-dials) its peers.
        let mut targets: Vec<(String, String)> = self
            .known
            .iter()
            .filter(|(name, _)| **name > self.ctx.node_name && !self.sessions.contains_key(*name))
            .map(|(name, k)| (name.clone(), k.dial.clone()))
            .collect();
        // Seeds are dialled by address, whatever their name, only while this node has no session
        // at all: that is how a node missing from the others' configs gets known to them, and
        // gossip does the rest. Dialling a seed again once connected would open a second session
        // to the same peer (its name is unknown until identified), and ractor_cluster tears down
        // that peer's actor mirrors when one of two sessions closes.
        if self.sessions.is_empty() {
            let own = self.ctx.dial_address();
            for seed in self.ctx.config.cluster.seeds.iter().filter(|s| **s != own) {
                targets.push((format!("seed {seed}"), seed.clone()));
            }
        }
        for (node, addr) in targets {
            let dial = self.dials.entry(node.clone()).or_insert(Dial {
                next: now,
                backoff: DIAL_BACKOFF_MIN,
                in_progress: false,
            });
            if dial.in_progress || dial.next > now {
                continue;
            }
            dial.in_progress = true;
            let (ns, me) = (ns.clone(), me.clone());
            tokio::spawn(async move {
                let ok = tokio::time::timeout(CALL_TIMEOUT, ractor_cluster::client_connect(&ns, addr.as_str()))
                    .await
                    .is_ok_and(|r| r.is_ok());
                let _ = me.cast(ClusterAgentMsg::DialDone { node, ok });
            });
        }
    }

    fn identify_new_gateways(&mut self, me: &ActorRef<ClusterAgentMsg>) {
        let members = ractor::pg::get_members(&GATEWAY_GROUP.to_string());
        let present: HashSet<ActorId> = members.iter().map(|c| c.get_id()).collect();
        self.cells.retain(|id| present.contains(id));
        for cell in members {
            let id = cell.get_id();
            if id.is_local() || self.cells.contains(&id) {
                continue;
            }
            self.cells.insert(id);
            let gateway: ActorRef<GatewayMsg> = cell.into();
            let me = me.clone();
            tokio::spawn(async move {
                let msg = match remote_call(&gateway, &NodePayload::Identify, CALL_TIMEOUT).await {
                    Ok(NodePayload::Identity { node, boot_id, http, dial }) => {
                        ClusterAgentMsg::Identified { cell: id, gateway, node, boot_id, http, dial }
                    }
                    _ => ClusterAgentMsg::IdentifyFailed(id),
                };
                let _ = me.cast(msg);
            });
        }
    }

    fn heartbeat(&self, me: &ActorRef<ClusterAgentMsg>) {
        for (node, peer) in &self.peers {
            let (gateway, node, boot_id, me) = (peer.gateway.clone(), node.clone(), peer.boot_id.clone(), me.clone());
            tokio::spawn(async move {
                if ping(&gateway).await {
                    let _ = me.cast(ClusterAgentMsg::Alive { node, boot_id });
                }
            });
        }
    }

    /// Mark silent peers down, and publish membership changes.
    fn refresh_members(&mut self) {
        let now = Instant::now();
        let down_after = self.peer_down_after();
        for (node, peer) in self.peers.iter_mut() {
            if peer.alive && now.duration_since(peer.last_seen) > down_after {
                tracing::warn!(peer = %node, "peer silent; declaring it down");
                self.ctx.events.peers_declared_silent.fetch_add(1, Ordering::Relaxed);
                peer.alive = false;
                self.ctx.routing.clear_node(node);
            }
        }
        let mut members: Vec<String> = self.peers.iter().filter(|(_, p)| p.alive).map(|(n, _)| n.clone()).collect();
        members.push(self.me().to_string());
        members.sort();
        let configured = self.ctx.config.nodes.len();
        let settled_now = !self.settled && (members.len() >= configured || self.started.elapsed() >= STARTUP_SETTLE);
        if members != self.members || settled_now {
            tracing::info!(?members, "membership changed");
            self.members = members.clone();
            self.settled |= settled_now;
            if self.settled {
                let _ = self.shards.cast(ShardManagerMsg::Members(members));
            }
        }
        let gateways =
            self.peers.iter().filter(|(_, p)| p.alive).map(|(n, p)| (n.clone(), p.gateway.clone())).collect();
        let known = self.peers.iter().map(|(n, p)| (n.clone(), p.gateway.clone())).collect();
        self.ctx.set_peers(gateways, known);
    }

    fn announce(&self) {
        let payload = NodePayload::ShardsServed {
            node: self.ctx.node_name.clone(),
            boot_id: self.ctx.boot_id.clone(),
            shards: self.ctx.routing.local_shards(),
        };
        let bytes = codec::encode(&payload);
        for peer in self.peers.values().filter(|p| p.alive) {
            let _ = peer.gateway.cast(GatewayMsg::Frame(bytes.clone()));
        }
    }

    /// Tell every live peer who we know is alive (ourselves included).
    fn gossip(&self) {
        let mut members: Vec<(String, String)> =
            self.peers.iter().filter(|(_, p)| p.alive).map(|(n, p)| (n.clone(), p.dial.clone())).collect();
        members.push((self.ctx.node_name.clone(), self.ctx.dial_address()));
        let bytes = codec::encode(&NodePayload::Members { members });
        for peer in self.peers.values().filter(|p| p.alive) {
            let _ = peer.gateway.cast(GatewayMsg::Frame(bytes.clone()));
        }
    }

    /// Learn nodes from a peer's gossip (or identity), refreshing when each learned one was last
    /// mentioned.
    fn learn(&mut self, members: Vec<(String, String)>) {
        if members.len() > MAX_GOSSIP_MEMBERS {
            tracing::warn!(n = members.len(), "oversized member gossip ignored");
            return;
        }
        let now = Instant::now();
        for (node, dial) in members {
            if node == self.ctx.node_name || node.is_empty() || dial.is_empty() {
                continue;
            }
            match self.known.get_mut(&node) {
                Some(k) => {
                    if k.learned.is_some() {
                        k.learned = Some(now);
                        k.dial = dial;
                    }
                }
                None => {
                    tracing::info!(peer = %node, %dial, "learned of a node by gossip");
                    self.known.insert(node, Known { dial, learned: Some(now) });
                }
            }
        }
    }

    /// A live node gossips itself every second, which keeps its `learned` time fresh (`learn`);
    /// a learned node nobody has mentioned for [`FORGET_LEARNED_AFTER`] is gone.
    fn forget_departed(&mut self) {
        let now = Instant::now();
        self.known.retain(|_, k| k.learned.is_none_or(|at| now.duration_since(at) < FORGET_LEARNED_AFTER));
    }

    fn peer_down(&mut self, node: &str, why: &str) {
        if let Some(peer) = self.peers.get_mut(node) {
            if peer.alive {
                tracing::warn!(peer = %node, why, "peer down");
            }
            peer.alive = false;
            self.ctx.routing.clear_node(node);
        }
    }
}

impl Actor for ClusterAgentActor {
    type Msg = ClusterAgentMsg;
    type State = ClusterAgentState;
    type Arguments = ClusterAgentArgs;

    async fn pre_start(
        &self,
        me: ActorRef<ClusterAgentMsg>,
        args: ClusterAgentArgs,
    ) -> Result<ClusterAgentState, ActorProcessingErr> {
        let clustered = args.ctx.config.is_clustered();
        let node_server = match (&args.ctx.config.cluster.cookie, clustered) {
            (Some(cookie), true) => {
                let server = NodeServer::new(
                    args.listen.port(),
                    cookie.clone(),
                    args.ctx.boot_id.clone(),
                    args.listen.ip().to_string(),
                    None,
                    Some(ractor_cluster::node::NodeConnectionMode::Isolated),
                )
                .with_listen_addr(args.listen.ip());
                let (ns, _) = Actor::spawn_linked(None, server, (), me.get_cell()).await?;
                ns.cast(NodeServerMessage::SubscribeToEvents {
                    id: "parley.agent".into(),
                    subscription: Box::new(Events(me.clone())),
                })?;
                tracing::info!(listen = %args.listen, "cluster node server listening");
                Some(ns)
            }
            (None, true) => {
                tracing::warn!("no PARLEY_COOKIE / PARLEY_COOKIE_FILE: clustering disabled, running as a single node");
                None
            }
            _ => None,
        };
        let _ = me.cast(ClusterAgentMsg::Tick);
        let known = args
            .ctx
            .config
            .nodes
            .iter()
            .filter(|n| n.name != args.ctx.node_name)
            .map(|n| (n.name.clone(), Known { dial: n.dial_address(), learned: None }))
            .collect();
        Ok(ClusterAgentState {
            known,
            ticks: 0,
            members: vec![args.ctx.node_name.clone()],
            ctx: args.ctx,
            shards: args.shards,
            node_server,
            peers: HashMap::new(),
            cells: HashSet::new(),
            sessions: HashMap::new(),
            dials: HashMap::new(),
            started: Instant::now(),
            settled: false,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<ClusterAgentMsg>,
        msg: ClusterAgentMsg,
        state: &mut ClusterAgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClusterAgentMsg::Tick => {
                if state.node_server.is_some() {
                    state.dial_due(&me);
                    state.identify_new_gateways(&me);
                    state.heartbeat(&me);
                    state.refresh_members();
                    state.announce();
                    state.ticks += 1;
                    if state.ticks.is_multiple_of(GOSSIP_EVERY_TICKS) {
                        state.gossip();
                        state.forget_departed();
                    }
                    me.send_after(HEARTBEAT, || ClusterAgentMsg::Tick);
                }
            }
            ClusterAgentMsg::SessionUp(name) => {
                *state.sessions.entry(node_of(&name)).or_insert(0) += 1;
            }
            ClusterAgentMsg::SessionDown(name) => {
                let node = node_of(&name);
                let open = state.sessions.get_mut(&node).map(|n| {
                    *n = n.saturating_sub(1);
                    *n
                });
                if open.unwrap_or(0) > 0 {
                    return Ok(());
                }
                state.sessions.remove(&node);
                // Only the session of the boot we know: a stale session of an older boot closing
                // must not take down its successor.
                let boot = name.split('@').next().unwrap_or(&name).to_string();
                if state.peers.get(&node).is_some_and(|p| p.boot_id == boot) {
                    state.peer_down(&node, "session closed");
                    state.refresh_members();
                }
            }
            ClusterAgentMsg::DialDone { node, ok } => {
                if let Some(d) = state.dials.get_mut(&node) {
                    d.in_progress = false;
                    if ok {
                        d.backoff = DIAL_BACKOFF_MIN;
                        d.next = Instant::now() + DIAL_BACKOFF_MIN;
                    } else {
                        d.next = Instant::now() + d.backoff;
                        d.backoff = (d.backoff * 2).min(DIAL_BACKOFF_MAX);
                    }
                }
            }
            ClusterAgentMsg::Identified { cell, gateway, node, boot_id, http, dial } => {
                if node == state.ctx.node_name {
                    return Ok(());
                }
                tracing::info!(peer = %node, boot = %boot_id, %cell, %dial, "peer identified");
                state.learn(vec![(node.clone(), dial.clone())]);
                state.peers.insert(node, Peer { boot_id, gateway, http, dial, last_seen: Instant::now(), alive: true });
                state.refresh_members();
            }
            ClusterAgentMsg::IdentifyFailed(cell) => {
                // Try again on a later tick.
                state.cells.remove(&cell);
            }
            ClusterAgentMsg::Alive { node, boot_id } => {
                if let Some(p) = state.peers.get_mut(&node) {
                    if p.boot_id == boot_id {
                        if !p.alive {
                            tracing::info!(peer = %node, "peer alive again");
                        }
                        p.last_seen = Instant::now();
                        p.alive = true;
                    }
                }
            }
            ClusterAgentMsg::Gossip(members) => state.learn(members),
            ClusterAgentMsg::Served { node, boot_id, shards } => {
                if let Some(p) = state.peers.get(&node) {
                    if p.alive && p.boot_id == boot_id {
                        state.ctx.routing.apply_remote(&node, &p.gateway, &shards);
                    }
                }
            }
            ClusterAgentMsg::Members { reply } => {
                let now = Instant::now();
                let mut out: Vec<MemberView> = state
                    .peers
                    .iter()
                    .map(|(n, p)| MemberView {
                        node: n.clone(),
                        boot_id: p.boot_id.clone(),
                        http: p.http.clone(),
                        alive: p.alive,
                        last_seen_ms_ago: now.duration_since(p.last_seen).as_millis() as u64,
                    })
                    .collect();
                out.push(MemberView {
                    node: state.ctx.node_name.clone(),
                    boot_id: state.ctx.boot_id.clone(),
                    http: state.ctx.advertised_http(),
                    alive: true,
                    last_seen_ms_ago: 0,
                });
                out.sort_by(|a, b| a.node.cmp(&b.node));
                let _ = reply.send(out);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<ClusterAgentMsg>,
        evt: SupervisionEvent,
        _state: &mut ClusterAgentState,
    ) -> Result<(), ActorProcessingErr> {
        // Policy: escalate. A dead NodeServer means no peer can reach us; stopping lets the root
        // stop the node so that an operator (or `parley up`) restarts it cleanly.
        match &evt {
            SupervisionEvent::ActorFailed(_, err) => {
                tracing::error!(error = %err, "cluster node server failed");
                me.stop(Some("node server failed".into()));
            }
            SupervisionEvent::ActorTerminated(_, _, reason) => {
                tracing::error!(?reason, "cluster node server stopped");
                me.stop(Some("node server stopped".into()));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's gateway on a saturated box: every call is answered, but only after a queueing
    /// delay longer than [`PEER_DOWN_AFTER`].
    struct SlowGateway;

    const SLOW: Duration = Duration::from_millis(2_000);

    impl Actor for SlowGateway {
        type Msg = GatewayMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _me: ActorRef<GatewayMsg>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _me: ActorRef<GatewayMsg>,
            msg: GatewayMsg,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            if let GatewayMsg::Call(bytes, reply) = msg {
                let Ok(NodePayload::Ping { nonce }) = codec::decode::<NodePayload>(&bytes) else { return Ok(()) };
                tokio::spawn(async move {
                    tokio::time::sleep(SLOW).await;
                    let _ = reply.send(codec::encode(&NodePayload::Pong { nonce }));
                });
            }
            Ok(())
        }
    }

    /// Slow is not dead: an answer that takes longer than `PEER_DOWN_AFTER` still proves the peer
    /// alive. (Before session 7 the ping gave up after `PEER_DOWN_AFTER`, so a saturated but
    /// healthy peer was declared down and its shards moved.)
    #[tokio::test]
    async fn a_late_answer_still_counts() {
        assert!(SLOW > PEER_DOWN_AFTER && SLOW < PING_TIMEOUT);
        let (gateway, handle) = Actor::spawn(None, SlowGateway, ()).await.expect("spawn");
        let started = Instant::now();
        assert!(ping(&gateway).await, "a ping answered after {SLOW:?} must count");
        assert!(started.elapsed() >= SLOW);
        gateway.stop(None);
        handle.await.expect("stopped");
    }

    /// A gateway that is gone answers nothing: the ping says so (without waiting out the timeout,
    /// since the cast itself fails).
    #[tokio::test]
    async fn no_answer_is_not_alive() {
        let (gateway, handle) = Actor::spawn(None, SlowGateway, ()).await.expect("spawn");
        gateway.stop(None);
        handle.await.expect("stopped");
        assert!(!ping(&gateway).await);
    }
}
