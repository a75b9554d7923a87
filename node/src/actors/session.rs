//! `SessionActor`: one per WebSocket connection. It owns the connection's protocol state
//! (authenticated user, device, what it has pushed) and turns client frames into node requests.
//!
//! The socket itself is pumped by two tasks in `api/ws.rs`: the reader casts `Text`/`Binary` here;
//! everything the session sends goes into a bounded outbox that the writer drains. A full outbox
//! means the client does not read: chat messages are never dropped to make room — the session is
//! closed as `slow_consumer` instead, and the client's reconnect sync delivers what it missed.
//!
//! Ordering: frames are handled one at a time, and a send is handed to its shard inside the
//! handler, so one client's messages reach the shard in the order it sent them. Only the wait for
//! the durable ack runs in a spawned task (so a client can pipeline sends).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parley_protocol::cluster::{ReceiptCommand, SyncRequest, UserEvent};
use parley_protocol::frames::{ClientFrame, ConversationKind, Limits, MessageView, ReceiptKind, ServerFrame};
use parley_protocol::http::SendRequest;
use parley_protocol::limits::{
    MAX_BODY_BYTES, MAX_FRAME_BYTES, MAX_MEDIA_BYTES, MAX_PAGE, MAX_PRESENCE_WATCH, MAX_SYNC_PER_CONVERSATION,
    TYPING_INTERVAL_MS,
};
use parley_protocol::{ConversationId, DeviceId, ErrorCode, Seq, UserId, PROTOCOL_VERSION};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use tokio::sync::OwnedSemaphorePermit;

use crate::context::NodeContext;
use crate::error::NodeError;
use crate::hub::LocalEvent;
use crate::outbox::{Outbox, OutboxSender, PushError};

/// WebSocket close codes we use (4000-4999 is the application range).
pub mod close_code {
    /// Normal shutdown of the node (RFC 6455 "going away").
    pub const GOING_AWAY: u16 = 1001;
    /// A WebSocket message over the transport's hard cap (RFC 6455 "message too big").
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Authentication failed or did not happen in time.
    pub const UNAUTHENTICATED: u16 = 4001;
    /// The client speaks another protocol version.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4002;
    /// The client did not read its frames fast enough.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Nothing received for `idle_timeout_ms`.
    pub const IDLE: u16 = 4009;
    /// The server could not serve the session right now (store unreachable): reconnect later.
    pub const UNAVAILABLE: u16 = 4503;
}

/// The longest single expiry timer; a longer-lived token re-arms it. Keeps timer durations in a
/// range every timer implementation handles, whatever `token_ttl_secs` is configured to.
const MAX_EXPIRY_TIMER_MS: u64 = 24 * 3600 * 1000;

/// Directory reads one `presence` frame makes at most when rule changes race with them (see
/// `watch_presence`).
const WATCH_READS: u32 = 3;

pub struct SessionActor;

pub struct SessionArgs {
    pub ctx: Arc<NodeContext>,
    pub id: u64,
    pub outbox: OutboxSender,
}

struct Authed {
    /// The session's entry in the hub, removed when this is dropped.
    _registration: Registration,
    user: UserId,
    device: DeviceId,
    /// Hash of the token the session authenticated with: a logout of that token ends it.
    token_hash: String,
    /// The token's expiry: the session ends then, as any request with the token would fail.
    expires_at_ms: i64,
}

pub struct SessionState {
    ctx: Arc<NodeContext>,
    id: u64,
    /// The connection's outbox, also where the session asks for the close.
    outbox: OutboxSender,
    auth: Option<Authed>,
    /// Highest seq pushed to this device per conversation, so a message that arrives both live and
    /// through reconnect sync is pushed once.
    pushed: HashMap<ConversationId, Seq>,
    /// When this session last forwarded `typing` per conversation (only entries younger than
    /// `TYPING_INTERVAL_MS` are kept, so it holds the chats typed in during the last interval).
    typing_sent: HashMap<ConversationId, std::time::Instant>,
    /// The users whose presence this connection watches (`presence` frame).
    watch: Option<Watch>,
    /// `HelloTimeout`, until `hello` succeeds.
    hello_timer: Option<Timer>,
    /// `TokenExpired`, once authenticated.
    expiry_timer: Option<Timer>,
}

/// A session's entry in the node's hub, removed on drop. A guard rather than `post_stop`: ractor
/// skips `post_stop` when an actor panics or is killed, and the hub would then keep routing to (and
/// `is_online` would keep reporting) a session that is gone. The state is dropped however the
/// actor ends.
struct Registration {
    ctx: Arc<NodeContext>,
    user: UserId,
    session: u64,
}

impl Registration {
    fn new(ctx: &Arc<NodeContext>, user: UserId, session: u64, actor: ActorRef<SessionMsg>) -> Self {
        ctx.hub.register(user, session, actor);
        ctx.presence.session_started(user);
        Registration { ctx: ctx.clone(), user, session }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.ctx.hub.unregister(self.user, self.session);
        self.ctx.presence.session_ended(self.user);
    }
}

/// A session's entries in the presence watcher index, removed on drop (for the same reason as
/// [`Registration`]: the state is dropped however the actor ends).
struct Watch {
    ctx: Arc<NodeContext>,
    session: u64,
    users: Vec<UserId>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.ctx.presence.unwatch(self.session, &self.users);
    }
}

/// A pending `send_after`, aborted when dropped. The timer's task holds a reference to the actor,
/// which keeps the actor's mailbox (ractor's two channel blocks, ≈ 7.5 KB) allocated until the
/// timer fires: left running, the expiry timer (up to `MAX_EXPIRY_TIMER_MS`) kept ≈ 10 KB of
/// every closed session for up to a day. Dropped with the state, however the actor ends.
struct Timer(ractor::concurrency::JoinHandle<Result<(), ractor::MessagingErr<SessionMsg>>>);

impl Drop for Timer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(RactorMessage)]
pub enum SessionMsg {
    /// A text frame from the client, with its connection's in-flight permit (released when the
    /// frame is answered; see `limits.max_in_flight_per_connection`).
    Text(String, OwnedSemaphorePermit),
    /// A binary frame from the client (we speak JSON text; valid UTF-8 is accepted as text).
    Binary(Vec<u8>, OwnedSemaphorePermit),
    /// An event for this user from a shard (shared with the user's other local sessions).
    Event(Arc<LocalEvent>),
    /// Fired `hello_timeout_ms` after connect.
    HelloTimeout,
    /// Fired when the session's token expires.
    TokenExpired,
}

/// Push a frame, or close the connection as a slow consumer if its outbox is full.
fn push(outbox: &Outbox, frame: &ServerFrame) -> bool {
    push_text(outbox, frame.encode())
}

/// Queue an encoded frame; a full outbox closes the connection (`slow_consumer`).
fn push_text(outbox: &Outbox, text: String) -> bool {
    match outbox.push(text) {
        Ok(()) => true,
        Err(PushError::Full) => {
            outbox.close(close_code::SLOW_CONSUMER, "slow_consumer: outbox full");
            false
        }
        Err(PushError::Closing) => false,
    }
}

/// Whether `m` is newer than every message of its conversation in `pushed` (and from now on, the
/// newest): a message that arrives both live and through the reconnect sync is pushed once.
fn first_push(pushed: &mut HashMap<ConversationId, Seq>, m: &MessageView) -> bool {
    let last = pushed.entry(m.conversation_id).or_insert(0);
    if m.seq <= *last {
        return false;
    }
    *last = m.seq;
    true
}

fn error_frame(e: &NodeError) -> ServerFrame {
    ServerFrame::error(e.code(), e.client_message())
}

impl SessionState {
    fn send(&self, frame: &ServerFrame) -> bool {
        push(&self.outbox, frame)
    }

    fn close(&self, code: u16, reason: &str) {
        self.outbox.close(code, reason);
    }

    /// Handle one client frame. `permit` is the frame's place in the connection's in-flight
    /// window: held until the frame is answered (for a send, until its ack or error is queued).
    async fn on_text(&mut self, me: &ActorRef<SessionMsg>, text: &str, permit: OwnedSemaphorePermit) {
        let frame = match ClientFrame::decode(text) {
            Ok(f) => f,
            Err(e) => {
                self.send(&ServerFrame::error(e.code(), e.to_string()));
                return;
            }
        };
        let Some(auth) = &self.auth else {
            return match frame {
                ClientFrame::Hello { protocol, token, device_id } => self.hello(me, protocol, &token, device_id).await,
                _ => {
                    self.send(&ServerFrame::error(ErrorCode::NotAuthenticated, "send `hello` first"));
                }
            };
        };
        let user = auth.user;
        match frame {
            ClientFrame::Hello { .. } => {
                self.send(&ServerFrame::error(ErrorCode::InvalidField, "already authenticated"));
            }
            ClientFrame::Send { client_msg_id, to, conversation_id, body, media_id } => {
                let req = SendRequest { client_msg_id: client_msg_id.clone(), to, conversation_id, body, media_id };
                let dispatched = self.ctx.dispatch_send(user, req, self.id).await;
                let outbox = self.outbox.clone();
                let reply = move |result: Result<_, NodeError>| {
                    let frame = match result {
                        Ok(ack) => {
                            let parley_protocol::cluster::StoredAck {
                                message_id,
                                conversation_id,
                                seq,
                                sent_at_ms,
                                duplicate,
                            } = ack;
                            ServerFrame::Ack { client_msg_id, message_id, conversation_id, seq, sent_at_ms, duplicate }
                        }
                        Err(e) => ServerFrame::Error {
                            code: e.code(),
                            message: e.client_message(),
                            client_msg_id: Some(client_msg_id),
                            req_id: None,
                        },
                    };
                    push(&outbox, &frame);
                };
                match dispatched {
                    Ok(pending) => {
                        tokio::spawn(async move {
                            reply(pending.wait().await);
                            drop(permit);
                        });
                    }
                    Err(e) => reply(Err(e)),
                }
            }
            ClientFrame::Delivered { conversation_id, seq } => {
                self.receipt(user, conversation_id, ReceiptKind::Delivered, seq).await
            }
            ClientFrame::Read { conversation_id, seq } => {
                self.receipt(user, conversation_id, ReceiptKind::Read, seq).await
            }
            ClientFrame::History { req_id, conversation_id, before_seq, limit } => {
                let frame = match self.ctx.history(user, conversation_id, before_seq, limit).await {
                    Ok((messages, has_more)) => ServerFrame::History { req_id, conversation_id, messages, has_more },
                    Err(e) => {
                        ServerFrame::Error { code: e.code(), message: e.client_message(), client_msg_id: None, req_id }
                    }
                };
                self.send(&frame);
            }
            ClientFrame::Conversations { req_id } => {
                let frame = match self.ctx.conversations(user).await {
                    Ok(conversations) => ServerFrame::Conversations { req_id, conversations },
                    Err(e) => {
                        ServerFrame::Error { code: e.code(), message: e.client_message(), client_msg_id: None, req_id }
                    }
                };
                self.send(&frame);
            }
            ClientFrame::Ping { nonce } => {
                self.send(&ServerFrame::Pong { nonce });
            }
            ClientFrame::Typing { conversation_id } => self.typing(user, conversation_id).await,
            ClientFrame::Presence { user_ids } => self.watch_presence(me, user_ids).await,
        }
    }

    /// Watch `users` instead of what this connection watched before, and answer with each one's
    /// presence now, as their privacy settings let this user see it. Refused, changing nothing,
    /// when the list is too long or names a user that does not exist.
    async fn watch_presence(&mut self, me: &ActorRef<SessionMsg>, mut users: Vec<UserId>) {
        users.sort();
        users.dedup();
        if users.len() > MAX_PRESENCE_WATCH {
            self.send(&ServerFrame::error(
                ErrorCode::InvalidField,
                format!("a connection watches at most {MAX_PRESENCE_WATCH} users"),
            ));
            return;
        }
        let Some(auth) = &self.auth else { return };
        let my_user = auth.user;
        let previous = self.watch.as_ref().map(|w| w.users.clone()).unwrap_or_default();
        // A rule change of one of these users between the read and the watch makes the read
        // stale; read again. Rule changes are rare, so a second read all but always does; after
        // the last one the read is used as it is (a change that raced with all of them reaches
        // this node's watchers only at the next refresh or watch).
        let mut attempt = 0;
        let now = loop {
            attempt += 1;
            let ticket = self.ctx.presence.rules_ticket();
            let records = match self.ctx.stores.directory.presence_view(my_user, &users).await {
                Ok(records) => records,
                Err(e) => {
                    self.send(&error_frame(&NodeError::from(e)));
                    return;
                }
            };
            if let Some(unknown) = users.iter().find(|u| !records.iter().any(|r| r.user == **u)) {
                self.send(&ServerFrame::error(ErrorCode::UnknownUser, format!("unknown user {unknown}")));
                return;
            }
            let ticket = if attempt < WATCH_READS { ticket } else { self.ctx.presence.rules_ticket() };
            if let Ok(now) = self.ctx.presence.watch(ticket, self.id, my_user, me, &previous, &records) {
                break now;
            }
        };
        // The old list's entries were replaced by the watch; dropping the guard must not remove
        // the new ones.
        if let Some(mut old) = self.watch.take() {
            old.users.clear();
        }
        self.watch = Some(Watch { ctx: self.ctx.clone(), session: self.id, users });
        for (user_id, status) in now {
            self.send(&ServerFrame::Presence { user_id, online: status.online, last_seen_ms: status.last_seen_ms });
        }
    }

    /// Tells the other members' live sessions that `user` is typing: at most once per
    /// conversation per `TYPING_INTERVAL_MS` from this session; the rest are dropped, not refused
    /// (the indicator is advisory, and a client that keeps typing keeps sending). Goes through the
    /// fan-out like a receipt, never through a shard or the store.
    async fn typing(&mut self, user: UserId, conversation_id: ConversationId) {
        let now = std::time::Instant::now();
        let interval = Duration::from_millis(TYPING_INTERVAL_MS);
        if self.typing_sent.get(&conversation_id).is_some_and(|at| now.duration_since(*at) < interval) {
            return;
        }
        match self.ctx.member_conversation(user, conversation_id).await {
            Ok(record) => {
                self.typing_sent.retain(|_, at| now.duration_since(*at) < interval);
                self.typing_sent.insert(conversation_id, now);
                let others: Vec<UserId> = record.members.iter().copied().filter(|m| *m != user).collect();
                if !others.is_empty() {
                    self.ctx.fan_out(&others, UserEvent::Typing { conversation_id, user_id: user }, self.id);
                }
            }
            Err(e) => {
                self.send(&error_frame(&e));
            }
        }
    }

    async fn receipt(&mut self, user: UserId, conversation_id: ConversationId, kind: ReceiptKind, seq: Seq) {
        let Some(auth) = &self.auth else { return };
        let device = auth.device.clone();
        let result = async {
            let record = self.ctx.member_conversation(user, conversation_id).await?;
            let members = match record.kind {
                // A group's shard picks who hears of it (the reader's devices and the senders it
                // covers); groups always share read receipts.
                ConversationKind::Group => Vec::new(),
                // Unless both sides share read receipts, a read is stored (the reader's devices
                // keep their unread counts) and told to the reader's own devices only.
                ConversationKind::Direct
                    if kind == ReceiptKind::Read && !self.ctx.read_receipts_shared(user, &record.members).await? =>
                {
                    vec![user]
                }
                ConversationKind::Direct => record.members.clone(),
            };
            let cmd = ReceiptCommand { user, members, device, conversation_id, kind, seq };
            self.ctx.receipt(cmd).await
        }
        .await;
        if let Err(e) = result {
            self.send(&error_frame(&e));
        }
    }

    async fn hello(&mut self, me: &ActorRef<SessionMsg>, protocol: u32, token: &str, device: DeviceId) {
        if protocol != PROTOCOL_VERSION {
            self.send(&ServerFrame::error(
                ErrorCode::UnsupportedProtocol,
                format!("this server speaks protocol {PROTOCOL_VERSION}"),
            ));
            self.close(close_code::UNSUPPORTED_PROTOCOL, "unsupported_protocol");
            return;
        }
        let grant = match self.ctx.authenticate(token).await {
            Ok(g) => g,
            Err(e) => {
                self.send(&error_frame(&e));
                let code = if e.code().retryable() { close_code::UNAVAILABLE } else { close_code::UNAUTHENTICATED };
                self.close(code, e.code().as_str());
                return;
            }
        };
        // Register before reading the sync snapshot: anything committed after this point is
        // pushed live, anything before is in the snapshot; `pushed` removes the overlap.
        let user = grant.user;
        let registration = Registration::new(&self.ctx, user.id, self.id, me.clone());
        self.hello_timer = None;
        self.auth = Some(Authed {
            _registration: registration,
            user: user.id,
            device: device.clone(),
            token_hash: parley_storage::token_hash(token),
            expires_at_ms: grant.expires_at_ms,
        });
        let ttl = u64::try_from(grant.expires_at_ms - parley_storage::now_ms()).unwrap_or(0);
        self.expiry_timer = Some(Timer(
            me.send_after(Duration::from_millis(ttl.min(MAX_EXPIRY_TIMER_MS)), || SessionMsg::TokenExpired),
        ));
        self.send(&ServerFrame::Welcome {
            protocol: PROTOCOL_VERSION,
            user_id: user.id,
            username: user.username,
            device_id: device.clone(),
            node: self.ctx.node_name.clone(),
            limits: Limits {
                max_frame_bytes: MAX_FRAME_BYTES,
                max_body_bytes: MAX_BODY_BYTES,
                max_page: MAX_PAGE,
                max_in_flight: self.ctx.config.limits.max_in_flight_per_connection,
                max_media_bytes: MAX_MEDIA_BYTES,
            },
        });
        let conversations = match self.ctx.stores.directory.user_conversations(user.id).await {
            Ok(list) => list.into_iter().map(|c| c.id).collect(),
            Err(e) => {
                // Without the list no sync can be promised complete: say so and let the client
                // reconnect, rather than send a `sync_done` that would be a lie.
                let e = NodeError::from(e);
                self.send(&error_frame(&e));
                self.close(close_code::UNAVAILABLE, "unavailable");
                return;
            }
        };
        let reply = self
            .ctx
            .sync(SyncRequest {
                user: user.id,
                device,
                conversations,
                per_conversation_limit: MAX_SYNC_PER_CONVERSATION,
            })
            .await;
        let count = reply.messages.len() as u64;
        // Paced: the sync may hold far more frames than the outbox (see `Outbox::push_paced`),
        // and bounded in time, since the session handles nothing else meanwhile.
        let (outbox, pushed) = (&self.outbox, &mut self.pushed);
        let paced = async {
            for m in reply.messages {
                if first_push(pushed, &m) {
                    outbox.push_paced(ServerFrame::Message { message: m }.encode()).await?;
                }
            }
            outbox.push_paced(ServerFrame::SyncDone { messages: count, truncated: reply.truncated }.encode()).await
        };
        let limit = Duration::from_millis(self.ctx.config.limits.sync_timeout_ms);
        if tokio::time::timeout(limit, paced).await.is_err() {
            self.close(close_code::SLOW_CONSUMER, "slow_consumer: sync not read in time");
        }
    }
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(&self, me: ActorRef<SessionMsg>, args: SessionArgs) -> Result<SessionState, ActorProcessingErr> {
        let hello_timer =
            me.send_after(Duration::from_millis(args.ctx.config.limits.hello_timeout_ms), || SessionMsg::HelloTimeout);
        Ok(SessionState {
            ctx: args.ctx,
            id: args.id,
            outbox: args.outbox,
            auth: None,
            pushed: HashMap::new(),
            typing_sent: HashMap::new(),
            watch: None,
            hello_timer: Some(Timer(hello_timer)),
            expiry_timer: None,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        // `on_text` is boxed: ractor allocates the handler's future once per actor, sized for its
        // largest state, for the actor's whole life. Inline, `on_text` (hello, sync, history, send
        // with their store calls) set that size for every idle session; boxed, it costs one
        // allocation per client frame, freed when the frame is handled.
        match msg {
            SessionMsg::Text(text, permit) => Box::pin(state.on_text(&me, &text, permit)).await,
            SessionMsg::Binary(bytes, permit) => match String::from_utf8(bytes) {
                Ok(text) => Box::pin(state.on_text(&me, &text, permit)).await,
                Err(_) => {
                    state.send(&ServerFrame::error(ErrorCode::InvalidUtf8, "frames must be UTF-8 JSON text"));
                }
            },
            SessionMsg::Event(event) => match &event.event {
                UserEvent::TokenRevoked { token_hash } => {
                    if state.auth.as_ref().is_some_and(|a| a.token_hash == *token_hash) {
                        state.send(&ServerFrame::error(ErrorCode::BadToken, "the token was logged out"));
                        state.close(close_code::UNAUTHENTICATED, "logged out");
                    }
                }
                UserEvent::Message(m) if !first_push(&mut state.pushed, m) => {}
                UserEvent::Message(_)
                | UserEvent::Group(_)
                | UserEvent::Receipt { .. }
                | UserEvent::Typing { .. }
                | UserEvent::Presence { .. } => {
                    if let Some(text) = event.frame_text() {
                        push_text(&state.outbox, text.to_owned());
                    }
                }
            },
            SessionMsg::TokenExpired => {
                let Some(auth) = &state.auth else { return Ok(()) };
                let left = auth.expires_at_ms - parley_storage::now_ms();
                if left <= 0 {
                    state.send(&ServerFrame::error(ErrorCode::BadToken, "the token expired"));
                    state.close(close_code::UNAUTHENTICATED, "token expired");
                } else {
                    // The timer was capped (or fired early): wait for the rest.
                    let wait = (left as u64).min(MAX_EXPIRY_TIMER_MS);
                    state.expiry_timer =
                        Some(Timer(me.send_after(Duration::from_millis(wait), || SessionMsg::TokenExpired)));
                }
            }
            SessionMsg::HelloTimeout => {
                if state.auth.is_none() {
                    state.send(&ServerFrame::error(ErrorCode::NotAuthenticated, "no hello in time"));
                    state.close(close_code::UNAUTHENTICATED, "hello timeout");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An actor whose state holds a hub registration, as a session's does, and whose handler
    /// panics: the registration must go with the state although ractor skips `post_stop`.
    struct Panicky;

    impl Actor for Panicky {
        type Msg = SessionMsg;
        type State = (Registration, Arc<std::sync::atomic::AtomicBool>);
        type Arguments = (Arc<NodeContext>, UserId, Arc<std::sync::atomic::AtomicBool>);

        async fn pre_start(
            &self,
            me: ActorRef<SessionMsg>,
            args: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            let (ctx, user, post_stop_ran) = args;
            Ok((Registration::new(&ctx, user, 7, me), post_stop_ran))
        }

        async fn post_stop(
            &self,
            _me: ActorRef<SessionMsg>,
            state: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            state.1.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }

        async fn handle(
            &self,
            _me: ActorRef<SessionMsg>,
            _msg: SessionMsg,
            _state: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            panic!("a bug in a session handler");
        }
    }

    #[tokio::test]
    async fn a_panicking_session_leaves_the_hub() {
        let dir = std::env::temp_dir().join(format!("parley-session-test-{}", uuid::Uuid::new_v4()));
        let stores = parley_storage::open(&parley_storage::StoreConfig::Embedded { dir: dir.clone() }).await.unwrap();
        let ctx = NodeContext::new(crate::config::Config::default(), "n-test".into(), stores);
        let user = UserId::random();
        let post_stop_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (actor, handle) = Actor::spawn(None, Panicky, (ctx.clone(), user, post_stop_ran.clone())).await.unwrap();
        assert!(ctx.hub.is_online(user), "registered while running");
        actor.cast(SessionMsg::HelloTimeout).unwrap();
        handle.await.unwrap();
        assert!(!post_stop_ran.load(std::sync::atomic::Ordering::SeqCst), "ractor skips post_stop on a panic");
        assert!(!ctx.hub.is_online(user), "the registration went with the state");
        let _ = std::fs::remove_dir_all(dir);
    }
}
