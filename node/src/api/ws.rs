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

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parley_protocol::ErrorCode;
use ractor::ActorRef;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use warp::Rejection;

use super::upgrade::{Socket, Upgrade};
use crate::actors::session::{close_code, SessionMsg};
use crate::actors::session_supervisor::SessionSupervisorMsg;
use crate::context::{call, NodeContext};
use crate::error::NodeError;
use crate::outbox::{Next, Outbox, OutboxSender};

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

/// Pump `socket` until either side ends. Not an `async fn` on purpose: an async fn's future keeps
/// its arguments for its whole life — rustc does not reuse their space for later state, and here
/// even stores the socket twice — so a `Socket` argument (tungstenite's whole stream, hundreds of
/// bytes) would stay in every connection's task long after `split` moved it to the heap. Splitting
/// first leaves two pointers in the future (BENCHMARKS.md, session 17).
fn pump(
    socket: Socket,
    ctx: Arc<NodeContext>,
    sessions: ActorRef<SessionSupervisorMsg>,
    guard: ConnectionGuard,
) -> impl std::future::Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    run(sink, stream, ctx, sessions, guard)
}

async fn run(
    mut sink: SplitSink<Socket, Message>,
    mut stream: SplitStream<Socket>,
    ctx: Arc<NodeContext>,
    sessions: ActorRef<SessionSupervisorMsg>,
    _guard: ConnectionGuard,
) {
    let outbox = Outbox::new(ctx.config.limits.outbox_frames);
    let id = loop {
        let id = rand::random::<u64>();
        if id != 0 {
            break id;
        }
    };
    let started = call(
        &sessions,
        |reply| SessionSupervisorMsg::Start { id, outbox: OutboxSender::new(&outbox), reply },
        Duration::from_secs(5),
        "start session",
    )
    .await;
    let Ok(Some(session)) = started else {
        let _ = sink.send(close_message(close_code::GOING_AWAY, "node is shutting down")).await;
        return;
    };

    let idle = Duration::from_millis(ctx.config.limits.idle_timeout_ms);
    let writer_outbox = outbox.clone();
    let mut writer = tokio::spawn(async move {
        let outbox = writer_outbox;
        let mut ping = tokio::time::interval(idle / 3);
        ping.tick().await;
        // Whether the socket still works, so that the close frame is worth sending.
        let writable = loop {
            tokio::select! {
                next = outbox.next(MAX_FRAMES_PER_FLUSH) => match next {
                    Next::Frames(frames) => {
                        // Every frame that became ready together, then one flush.
                        let mut queued = true;
                        for text in frames {
                            queued = sink.feed(Message::text(text)).await.is_ok();
                            if !queued {
                                break;
                            }
                        }
                        if !queued || sink.flush().await.is_err() {
                            break false;
                        }
                    }
                    Next::Closing => break true,
                    // The session is gone without asking for a close (it failed): close all the same.
                    Next::Orphaned => break true,
                },
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break false;
                    }
                }
            }
        };
        if writable {
            // Flush what is already queued (e.g. the error frame explaining the close), then the
            // Close frame with the code that says why.
            for text in outbox.take_all() {
                let _ = sink.send(Message::text(text)).await;
            }
            let (code, text) = outbox.close_reason().unwrap_or((close_code::GOING_AWAY, String::new()));
            let _ = sink.send(close_message(code, text)).await;
        } else {
            // The client is gone (a reset, a broken pipe). Tell the reader: what the client left
            // in our receive buffer must not be worked off for nobody — it never saw those sends
            // acked and resends them, under the same ids, when it reconnects.
            outbox.close_if_unset(close_code::GOING_AWAY, "connection lost");
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
            _ = outbox.closing() => break,
        };
        tokio::select! {
            next = tokio::time::timeout(idle, stream.next()) => match next {
                Err(_) => {
                    outbox.close(close_code::IDLE, "idle timeout");
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    // Over the transport's hard cap: say so with the standard code (RFC 6455 1009).
                    if matches!(e, WsError::Capacity(_)) {
                        outbox.close(close_code::MESSAGE_TOO_BIG, "message too big");
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
            _ = outbox.closing() => break,
        }
    }
    // Whether the server asked for the close (then it waits for the client's Close reply below).
    let server_closed = !outbox.close_if_unset(close_code::GOING_AWAY, "");
    session.stop(Some("connection closed".into()));
    // The writer may be stuck flushing to a client that does not read: give it what the idle
    // timeout gives any client, then drop the connection, so that it frees its place in
    // `limits.max_connections` (and its memory) instead of waiting on the socket for ever.
    let writable = match tokio::time::timeout(idle, &mut writer).await {
        Ok(done) => done.unwrap_or(false),
        Err(_) => {
            writer.abort();
            false
        }
    };
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
