//! The WebSocket pump: moves frames between a socket and its `SessionActor`. No protocol logic
//! lives here — only the transport's bounds: connection count, hard frame cap, in-flight window,
//! outbox, idle timeout and server pings.
//!
//! Reader: socket → `SessionMsg::Text/Binary`, with at most `limits.max_in_flight_per_connection`
//! frames unanswered (then it stops reading: backpressure). Writer: outbox → socket, plus pings and
//! the close frame when the session (or shutdown) asks for one. When either side ends, both end and the
//! session actor is stopped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_protocol::ErrorCode;
use ractor::ActorRef;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use warp::Rejection;

use super::upgrade::{Socket, Upgrade};
use crate::actors::session::{close_code, Outgoing, SessionMsg};
use crate::actors::session_supervisor::SessionSupervisorMsg;
use crate::context::{call, NodeContext};
use crate::error::NodeError;

/// The transport's own cap on one WebSocket message. Frames between `MAX_FRAME_BYTES` (64 KiB,
/// answered with a `frame_too_large` error, connection kept) and this are read and refused;
/// beyond this the connection is closed (1009) without buffering the rest.
pub const HARD_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Initial read buffer of a connection. tungstenite allocates (and zero-fills) it up front, so it
/// is paid by every idle session: its default, 128 KiB, was most of a session's memory. A client
/// frame is a few hundred bytes and is read in one go; a larger one grows the buffer to the frame's
/// size (at most [`HARD_MAX_MESSAGE_BYTES`]), reading at most this much per read call — so a
/// 64 KiB frame takes 64 reads, a price paid only by large frames. 4 KiB until session 9; 1 KiB
/// saves ≈3 KB of every idle session (BENCHMARKS.md, session 9).
pub const READ_BUFFER_BYTES: usize = 1024;

/// Bytes tungstenite collects before writing to the socket. The writer queues every frame waiting
/// in the outbox and then flushes once, so frames that became ready together (an ack, the
/// messages of one commit, receipts) leave in one write call instead of one each; past this many
/// bytes a batch is written out in pieces. (0 until session 10: one write per frame.)
pub const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Frames the writer takes from the outbox before it flushes, so a long backlog does not delay
/// pings and the close signal.
const MAX_FRAMES_PER_FLUSH: usize = 64;

/// Backstop on tungstenite's write buffer. Since the writer flushes after each batch of frames, the
/// buffer holds at most one batch plus an automatic pong and a close, and the outbox
/// (`limits.outbox_frames`) bounds what waits behind it. Server frames have no fixed cap (a history
/// page is up to 500 × 16 KiB bodies, a conversation list grows with the user), so the bound is
/// generous: 64 MiB, tungstenite's own default cap on a received message — a client with default
/// settings could not read a larger one. Exceeding it ends the connection instead of buffering more.
pub const MAX_WRITE_BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// The configuration of every server WebSocket.
pub fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        // One message may be one frame: the frame cap is the message cap.
        .max_message_size(Some(HARD_MAX_MESSAGE_BYTES))
        .max_frame_size(Some(HARD_MAX_MESSAGE_BYTES))
}

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
    ws: Upgrade,
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
    Ok(ws.into_response(socket_config(), move |socket| pump(socket, ctx, sessions, guard)))
}

/// How long a connection the server closed waits for the client's Close reply.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// A close frame with `code` and `reason`.
fn close_message(code: u16, reason: impl Into<String>) -> Message {
    Message::Close(Some(CloseFrame { code: code.into(), reason: reason.into().into() }))
}

async fn pump(
    socket: Socket,
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
        let _ = sink.send(close_message(close_code::GOING_AWAY, "node is shutting down")).await;
        return;
    };

    let idle = Duration::from_millis(ctx.config.limits.idle_timeout_ms);
    let mut writer_close = close_rx.clone();
    let writer_lost = close.clone();
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(idle / 3);
        ping.tick().await;
        // Whether the socket still works, so that the close frame is worth sending.
        let writable = loop {
            tokio::select! {
                out = outbox_rx.recv() => match out {
                    Some(Outgoing::Frame(text)) => {
                        // This frame and those queued behind it, then one flush.
                        let mut queued = sink.feed(Message::text(text)).await.is_ok();
                        let mut taken = 1;
                        while queued && taken < MAX_FRAMES_PER_FLUSH {
                            let Ok(Outgoing::Frame(text)) = outbox_rx.try_recv() else { break };
                            queued = sink.feed(Message::text(text)).await.is_ok();
                            taken += 1;
                        }
                        if !queued || sink.flush().await.is_err() {
                            break false;
                        }
                    }
                    // The session is gone (it stops right after asking for a close, so this can
                    // win the race against the close signal): close with its reason all the same.
                    None => break true,
                },
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
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
            let _ = sink.send(close_message(code, text)).await;
        } else {
            // The client is gone (a reset, a broken pipe). Tell the reader: what the client left
            // in our receive buffer must not be worked off for nobody — it never saw those sends
            // acked and resends them, under the same ids, when it reconnects.
            writer_lost.send_if_modified(|reason| {
                let unset = reason.is_none();
                if unset {
                    *reason = Some((close_code::GOING_AWAY, "connection lost".into()));
                }
                unset
            });
        }
        let _ = sink.close().await;
        writable
    });

    // The connection's in-flight window (`limits.max_in_flight_per_connection`): a frame is read
    // only with a permit, and its permit is released when the frame is answered. Waiting for one
    // is backpressure — the socket is not read meanwhile, so TCP slows the client down — not
    // idleness: the idle timeout only runs while we are reading.
    let window = Arc::new(Semaphore::new(ctx.config.limits.max_in_flight_per_connection));
    loop {
        let permit = tokio::select! {
            permit = window.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = close_rx.changed() => break,
        };
        tokio::select! {
            next = tokio::time::timeout(idle, stream.next()) => match next {
                Err(_) => {
                    close.send_replace(Some((close_code::IDLE, "idle timeout".into())));
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    // Over the transport's hard cap: say so with the standard code (RFC 6455 1009).
                    if matches!(e, WsError::Capacity(_)) {
                        close.send_replace(Some((close_code::MESSAGE_TOO_BIG, "message too big".into())));
                    }
                    break;
                }
                Ok(Some(Ok(msg))) => match msg {
                    Message::Text(text) => {
                        if session.cast(SessionMsg::Text(text.as_str().to_owned(), permit)).is_err() { break; }
                    }
                    Message::Binary(bytes) => {
                        if session.cast(SessionMsg::Binary(bytes.to_vec(), permit)).is_err() { break; }
                    }
                    Message::Close(_) => break,
                    // Pings are answered by the library; pongs only prove liveness (handled by
                    // the idle timeout above).
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                },
            },
            _ = close_rx.changed() => break,
        }
    }
    let server_closed = close.borrow().is_some();
    if !server_closed {
        close.send_replace(Some((close_code::GOING_AWAY, String::new())));
    }
    session.stop(Some("connection closed".into()));
    let writable = writer.await.unwrap_or(false);
    if server_closed && writable {
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
