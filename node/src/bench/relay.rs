//! `parley relay`: the bare WebSocket relay `parley bench` measures Parley against (hidden
//! subcommand).
//!
//! Same JSON frames as a node, decoded and encoded by the same `parley-protocol` types, but no
//! persistence, no actors, no shards, no authentication: `hello` is answered with `welcome` (the
//! token *is* the user id), `send` is forwarded as a `message` frame to every socket of the
//! recipient and answered with an `ack`. What a node does on top of this is what the ratio in the
//! report prices. One thread (a current-thread runtime), like the reference relay of the issue.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use parley_protocol::frames::{ClientFrame, Limits, MessageView, ServerFrame};
use parley_protocol::limits::{MAX_BODY_BYTES, MAX_FRAME_BYTES, MAX_PAGE};
use parley_protocol::{ConversationId, ErrorCode, MessageId, UserId, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// WebSocket settings of the relay's and the load clients' sockets: a node's read buffer size
/// ([`crate::api::ws::READ_BUFFER_BYTES`]; tungstenite zero-fills its whole read buffer, 128 KiB
/// by default, before every read, which costs more than a small frame), so that relay and node
/// are compared on the same footing, and no write buffering (every send is flushed at once).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(crate::api::ws::READ_BUFFER_BYTES).write_buffer_size(0)
}

/// Options of `parley relay`.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Where to listen (loopback only: the relay has no authentication).
    #[arg(long)]
    pub listen: SocketAddr,
}

/// Every connected socket of a user: its outbox.
type Registry = Arc<Mutex<HashMap<UserId, Vec<(u64, mpsc::UnboundedSender<String>)>>>>;

/// Run the relay until killed.
pub fn run_blocking(args: RelayArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        anyhow::bail!("the relay has no authentication: listen on a loopback address only");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(args.listen))
}

async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    eprintln!("relay listening on {listen}");
    let registry: Registry = Arc::default();
    let seq = Arc::new(AtomicU64::new(0));
    let mut next_conn: u64 = 0;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        next_conn += 1;
        tokio::spawn(connection(stream, next_conn, registry.clone(), seq.clone()));
    }
}

async fn connection(stream: tokio::net::TcpStream, id: u64, registry: Registry, seq: Arc<AtomicU64>) {
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await else { return };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            if sink.send(Message::text(text)).await.is_err() {
                break;
            }
        }
    });
    let mut me: Option<UserId> = None;
    while let Some(Ok(msg)) = source.next().await {
        let Message::Text(text) = msg else { continue };
        let reply = match ClientFrame::decode(text.as_str()) {
            Ok(ClientFrame::Hello { token, device_id, .. }) => match token.parse::<UserId>() {
                Ok(user) => {
                    me = Some(user);
                    registry
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(user)
                        .or_default()
                        .push((id, tx.clone()));
                    ServerFrame::Welcome {
                        protocol: PROTOCOL_VERSION,
                        user_id: user,
                        username: "relay".to_string(),
                        device_id,
                        node: "relay".to_string(),
                        limits: Limits {
                            max_frame_bytes: MAX_FRAME_BYTES,
                            max_body_bytes: MAX_BODY_BYTES,
                            max_page: MAX_PAGE,
                            // The relay holds nothing: it answers each frame as it reads it.
                            max_in_flight: usize::MAX,
                            max_media_bytes: 0,
                        },
                    }
                }
                Err(_) => ServerFrame::error(ErrorCode::BadToken, "relay tokens are user ids"),
            },
            Ok(ClientFrame::Send { client_msg_id, to: Some(to), body, .. }) => match me {
                Some(sender) => {
                    let conversation_id = ConversationId::direct(sender, to);
                    let message = MessageView {
                        message_id: MessageId::new(),
                        conversation_id,
                        seq: seq.fetch_add(1, Ordering::Relaxed) + 1,
                        sender,
                        client_msg_id: client_msg_id.clone(),
                        body,
                        sent_at_ms: parley_storage::now_ms(),
                        media: None,
                    };
                    let ack = ServerFrame::Ack {
                        client_msg_id,
                        message_id: message.message_id,
                        conversation_id,
                        seq: message.seq,
                        sent_at_ms: message.sent_at_ms,
                        duplicate: false,
                    };
                    let push = ServerFrame::Message { message }.encode();
                    if let Some(targets) = registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&to) {
                        for (_, out) in targets {
                            let _ = out.send(push.clone());
                        }
                    }
                    ack
                }
                None => ServerFrame::error(ErrorCode::NotAuthenticated, "send `hello` first"),
            },
            Ok(_) => ServerFrame::error(ErrorCode::UnknownFrame, "the relay only knows hello and send"),
            Err(e) => ServerFrame::error(e.code(), e.to_string()),
        };
        if tx.send(reply.encode()).is_err() {
            break;
        }
    }
    if let Some(user) = me {
        let mut reg = registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(list) = reg.get_mut(&user) {
            list.retain(|(c, _)| *c != id);
            if list.is_empty() {
                reg.remove(&user);
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
