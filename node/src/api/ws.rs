//! The WebSocket pump: moves frames between a socket and its `SessionActor`. No protocol logic
//! lives here — only the transport's bounds: connection count, hard frame cap, outbox, idle
//! timeout and server pings.
//!
//! Reader: socket → `SessionMsg::Text/Binary`. Writer: outbox → socket, plus pings and the close
//! frame when the session (or shutdown) asks for one. When either side ends, both end and the
//! session actor is stopped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_protocol::ErrorCode;
use ractor::ActorRef;
use tokio::sync::{mpsc, watch};
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::Rejection;

use crate::actors::session::{close_code, Outgoing, SessionMsg};
use crate::actors::session_supervisor::SessionSupervisorMsg;
use crate::context::{call, NodeContext};
use crate::error::NodeError;

/// The transport's own cap on one WebSocket message. Frames between `MAX_FRAME_BYTES` (64 KiB,
/// answered with a `frame_too_large` error, connection kept) and this are read and refused;
/// beyond this the connection is closed (1009) without buffering the rest.
pub const HARD_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Live WebSocket connections on this node, to enforce `limits.max_connections`.
#[derive(Default)]
pub struct ConnectionCounter(AtomicUsize);

impl ConnectionCounter {
    pub fn current(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Decrements the counter when the connection ends, however it ends.
struct ConnectionGuard(Arc<ConnectionCounter>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /v1/ws`: refuse over the connection limit, else upgrade.
pub async fn upgrade(
    ws: Ws,
    ctx: Arc<NodeContext>,
    sessions: ActorRef<SessionSupervisorMsg>,
    connections: Arc<ConnectionCounter>,
) -> Result<warp::reply::Response, Rejection> {
    let max = ctx.config.limits.max_connections;
    if connections.0.fetch_add(1, Ordering::Relaxed) >= max {
        connections.0.fetch_sub(1, Ordering::Relaxed);
        return Err(NodeError::client(ErrorCode::Unavailable, format!("connection limit ({max}) reached")).into());
    }
    let guard = ConnectionGuard(connections);
    let ws = ws.max_message_size(HARD_MAX_MESSAGE_BYTES).max_frame_size(HARD_MAX_MESSAGE_BYTES);
    Ok(warp::reply::Reply::into_response(ws.on_upgrade(move |socket| pump(socket, ctx, sessions, guard))))
}

/// How long a connection the server closed waits for the client's Close reply.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

async fn pump(
    socket: WebSocket,
    ctx: Arc<NodeContext>,
    sessions: ActorRef<SessionSupervisorMsg>,
    _guard: ConnectionGuard,
) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut outbox_rx) = mpsc::channel::<Outgoing>(ctx.config.limits.outbox_frames);
    let (close_tx, mut close_rx) = watch::channel::<Option<(u16, String)>>(None);
    let close = Arc::new(close_tx);
    let id = loop {
        let id = rand::random::<u64>();
        if id != 0 {
            break id;
        }
    };
    let started = call(
        &sessions,
        |reply| SessionSupervisorMsg::Start { id, outbox, close: close.clone(), reply },
        Duration::from_secs(5),
        "start session",
    )
    .await;
    let Ok(Some(session)) = started else {
        let _ = sink.send(Message::close_with(close_code::GOING_AWAY, "node is shutting down")).await;
        return;
    };

    let idle = Duration::from_millis(ctx.config.limits.idle_timeout_ms);
    let mut writer_close = close_rx.clone();
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(idle / 3);
        ping.tick().await;
        // Whether the socket still works, so that the close frame is worth sending.
        let writable = loop {
            tokio::select! {
                out = outbox_rx.recv() => match out {
                    Some(Outgoing::Frame(text)) => {
                        if sink.send(Message::text(text)).await.is_err() {
                            break false;
                        }
                    }
                    // The session is gone (it stops right after asking for a close, so this can
                    // win the race against the close signal): close with its reason all the same.
                    None => break true,
                },
                _ = ping.tick() => {
                    if sink.send(Message::ping(Vec::<u8>::new())).await.is_err() {
                        break false;
                    }
                }
                _ = writer_close.changed() => break true,
            }
        };
        if writable {
            // Flush what is already queued (e.g. the error frame explaining the close), then the
            // Close frame with the code that says why.
            while let Ok(Outgoing::Frame(text)) = outbox_rx.try_recv() {
                let _ = sink.send(Message::text(text)).await;
            }
            let reason = writer_close.borrow().clone();
            let (code, text) = reason.unwrap_or((close_code::GOING_AWAY, String::new()));
            let _ = sink.send(Message::close_with(code, text)).await;
        }
        let _ = sink.close().await;
    });

    loop {
        tokio::select! {
            next = tokio::time::timeout(idle, stream.next()) => match next {
                Err(_) => {
                    close.send_replace(Some((close_code::IDLE, "idle timeout".into())));
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    // Over the transport's hard cap: say so with the standard code (RFC 6455 1009).
                    let text = e.to_string();
                    if text.contains("too long") || text.contains("Space limit") {
                        close.send_replace(Some((close_code::MESSAGE_TOO_BIG, "message too big".into())));
                    }
                    break;
                }
                Ok(Some(Ok(msg))) => {
                    if msg.is_text() {
                        let text = msg.to_str().unwrap_or_default().to_string();
                        if session.cast(SessionMsg::Text(text)).is_err() { break; }
                    } else if msg.is_binary() {
                        if session.cast(SessionMsg::Binary(msg.into_bytes().to_vec())).is_err() { break; }
                    } else if msg.is_close() {
                        break;
                    }
                    // Pings are answered by the library; pongs only prove liveness (handled by
                    // the idle timeout above).
                }
            },
            _ = close_rx.changed() => break,
        }
    }
    let server_closed = close.borrow().is_some();
    if !server_closed {
        close.send_replace(Some((close_code::GOING_AWAY, String::new())));
    }
    session.stop(Some("connection closed".into()));
    let _ = writer.await;
    if server_closed {
        // RFC 6455 closing handshake: having sent our Close, read (and discard) until the client's
        // Close or end of stream, for a bounded time. Dropping the socket with unread input (the
        // client's Close reply, a pong) makes the kernel send RST, and an RST can destroy our
        // Close frame in the client's receive queue before it reads it: the client would see a
        // reset instead of the close code that says why (e.g. 4001 bad_token).
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(msg)) = stream.next().await {
                if msg.is_close() {
                    break;
                }
            }
        })
        .await;
    }
}
