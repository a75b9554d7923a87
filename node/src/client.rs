//! A typed Rust client for Parley's documented protocol (HTTP + WebSocket). The end-to-end tests,
//! `parley drill` and the benchmarks use it, so it is exercised against real nodes on every run.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_protocol::frames::{ClientFrame, GroupView, ServerFrame};
use parley_protocol::http::*;
use parley_protocol::{ClientMsgId, ConversationId, DeviceId, ErrorCode, Seq, UserId, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error (HTTP status and body, or a WebSocket `error` frame).
    #[error("server error {code}: {message}")]
    Server { status: u16, code: ErrorCode, message: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("unexpected answer: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
    #[error("connection closed ({0:?})")]
    Closed(Option<(u16, String)>),
}

impl ClientError {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// The error an HTTP answer with status ≥ 400 reports: its `ErrorBody`, or a protocol error when
/// the body is not one.
fn server_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(err) => ClientError::Server { status, code: err.error, message: err.message },
        Err(_) => {
            ClientError::Protocol(format!("HTTP {status} without an error body: {}", String::from_utf8_lossy(body)))
        }
    }
}

/// HTTP client for one node.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: impl Into<String>) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("static client config");
        Client { http, base: base.into().trim_end_matches('/').to_string() }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Any request, returning status and JSON body (or `null`): for tests of bad input.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, serde_json::Value)> {
        let method =
            reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
        };
        Ok((status, value))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<T> {
        let body = body.map(|b| serde_json::to_vec(&b).expect("json values serialize"));
        let (status, value) = self.raw(method, path, token, body).await?;
        if status >= 400 {
            return Err(server_error(status, value.to_string().as_bytes()));
        }
        serde_json::from_value(value).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn register(&self, username: &str, password: &str) -> Result<TokenResponse> {
        self.call("POST", "/v1/register", None, Some(serde_json::json!({"username": username, "password": password})))
            .await
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<TokenResponse> {
        self.call("POST", "/v1/login", None, Some(serde_json::json!({"username": username, "password": password})))
            .await
    }

    pub async fn logout(&self, token: &str) -> Result<()> {
        let (status, value) = self.raw("POST", "/v1/logout", Some(token), None).await?;
        if status == 204 {
            Ok(())
        } else {
            Err(ClientError::Protocol(format!("logout: HTTP {status}: {value}")))
        }
    }

    /// `GET /v1/push/key`: the VAPID public key to subscribe with.
    pub async fn push_key(&self) -> Result<parley_protocol::push::PushKeyResponse> {
        self.call("GET", "/v1/push/key", None, None).await
    }

    /// `POST /v1/push/subscriptions`: turn on notifications for this browser's subscription.
    pub async fn push_subscribe(
        &self,
        token: &str,
        sub: &parley_protocol::push::PushSubscriptionRequest,
    ) -> Result<()> {
        let body = serde_json::to_vec(sub).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.no_content("POST", "/v1/push/subscriptions", token, Some(body)).await
    }

    /// `DELETE /v1/push/subscriptions`: turn them off.
    pub async fn push_unsubscribe(&self, token: &str, endpoint: &str) -> Result<()> {
        let body = serde_json::to_vec(&serde_json::json!({ "endpoint": endpoint })).expect("json values serialize");
        self.no_content("DELETE", "/v1/push/subscriptions", token, Some(body)).await
    }

    /// A request whose success is `204 No Content`.
    async fn no_content(&self, method: &str, path: &str, token: &str, body: Option<Vec<u8>>) -> Result<()> {
        let (status, value) = self.raw(method, path, Some(token), body).await?;
        match status {
            204 => Ok(()),
            s if s >= 400 => Err(server_error(s, value.to_string().as_bytes())),
            s => Err(ClientError::Protocol(format!("{method} {path}: HTTP {s}: {value}"))),
        }
    }

    pub async fn users(&self, token: &str) -> Result<Vec<UserView>> {
        self.call("GET", "/v1/users", Some(token), None).await
    }

    /// `GET /v1/me/privacy`: who may see the caller's presence.
    pub async fn privacy(&self, token: &str) -> Result<parley_protocol::privacy::PrivacySettings> {
        self.call("GET", "/v1/me/privacy", Some(token), None).await
    }

    /// `PUT /v1/me/privacy`: set who may see the caller's presence.
    pub async fn set_privacy(
        &self,
        token: &str,
        settings: parley_protocol::privacy::PrivacySettings,
    ) -> Result<parley_protocol::privacy::PrivacySettings> {
        let body = serde_json::to_value(settings).expect("settings serialize");
        self.call("PUT", "/v1/me/privacy", Some(token), Some(body)).await
    }

    /// `GET /v1/me/contacts`: the caller's contacts.
    pub async fn contacts(&self, token: &str) -> Result<Vec<UserView>> {
        let list: parley_protocol::privacy::ContactsResponse =
            self.call("GET", "/v1/me/contacts", Some(token), None).await?;
        Ok(list.contacts)
    }

    /// `PUT /v1/me/contacts/:id` (`is_contact`) or `DELETE` it.
    pub async fn set_contact(&self, token: &str, contact: UserId, is_contact: bool) -> Result<()> {
        let method = if is_contact { "PUT" } else { "DELETE" };
        self.no_content(method, &format!("/v1/me/contacts/{contact}"), token, None).await
    }

    /// `POST /v1/media`: upload `bytes` as `content_type`, optionally named.
    pub async fn upload_media(
        &self,
        token: &str,
        bytes: Vec<u8>,
        content_type: &str,
        name: Option<&str>,
    ) -> Result<parley_protocol::media::MediaRef> {
        let mut req =
            self.http.post(format!("{}/v1/media", self.base)).bearer_auth(token).header("content-type", content_type);
        if let Some(name) = name {
            req = req.query(&[("name", name)]);
        }
        let resp = req.body(bytes).send().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        if status >= 400 {
            return Err(server_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET /v1/media`: how much of their upload quota the caller uses, and the newest page of
    /// their uploads.
    pub async fn media_usage(&self, token: &str) -> Result<parley_protocol::http::MediaUsage> {
        self.call("GET", "/v1/media", Some(token), None).await
    }

    /// `DELETE /v1/media/:id`: delete one of the caller's uploads.
    pub async fn delete_media(&self, token: &str, id: parley_protocol::MediaId) -> Result<()> {
        self.no_content("DELETE", &format!("/v1/media/{id}"), token, None).await
    }

    /// `GET /v1/media/:id`: the bytes and the response's headers.
    pub async fn download_media(
        &self,
        token: &str,
        id: parley_protocol::MediaId,
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>)> {
        self.download(token, &format!("/v1/media/{id}")).await
    }

    /// `GET /v1/media/:id/thumbnail`: the thumbnail's bytes and the response's headers.
    pub async fn download_thumbnail(
        &self,
        token: &str,
        id: parley_protocol::MediaId,
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>)> {
        self.download(token, &format!("/v1/media/{id}/thumbnail")).await
    }

    async fn download(&self, token: &str, path: &str) -> Result<(reqwest::header::HeaderMap, Vec<u8>)> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        if status >= 400 {
            return Err(server_error(status, &bytes));
        }
        Ok((headers, bytes.to_vec()))
    }

    pub async fn send(&self, token: &str, req: &SendRequest) -> Result<SendResponse> {
        let body = serde_json::to_value(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call("POST", "/v1/messages", Some(token), Some(body)).await
    }

    pub async fn history(
        &self,
        token: &str,
        conversation: ConversationId,
        before_seq: Option<Seq>,
        limit: Option<u32>,
    ) -> Result<HistoryResponse> {
        let mut path = format!("/v1/conversations/{conversation}/messages?");
        if let Some(b) = before_seq {
            path.push_str(&format!("before_seq={b}&"));
        }
        if let Some(l) = limit {
            path.push_str(&format!("limit={l}"));
        }
        self.call("GET", &path, Some(token), None).await
    }

    pub async fn conversations(&self, token: &str) -> Result<Vec<parley_protocol::frames::ConversationSummary>> {
        self.call("GET", "/v1/conversations", Some(token), None).await
    }

    /// Create a group owned by the token's user.
    pub async fn create_group(&self, token: &str, name: &str, members: &[UserId]) -> Result<GroupView> {
        let body = serde_json::json!({"name": name, "members": members});
        self.call("POST", "/v1/groups", Some(token), Some(body)).await
    }

    pub async fn group(&self, token: &str, group: ConversationId) -> Result<GroupView> {
        self.call("GET", &format!("/v1/groups/{group}"), Some(token), None).await
    }

    pub async fn rename_group(&self, token: &str, group: ConversationId, name: &str) -> Result<GroupView> {
        self.call("PATCH", &format!("/v1/groups/{group}"), Some(token), Some(serde_json::json!({"name": name}))).await
    }

    pub async fn add_members(&self, token: &str, group: ConversationId, members: &[UserId]) -> Result<GroupView> {
        let body = serde_json::json!({"members": members});
        self.call("POST", &format!("/v1/groups/{group}/members"), Some(token), Some(body)).await
    }

    /// Remove `user` from the group (the owner), or leave it (`user` = the token's user).
    pub async fn remove_member(&self, token: &str, group: ConversationId, user: UserId) -> Result<GroupView> {
        self.call("DELETE", &format!("/v1/groups/{group}/members/{user}"), Some(token), None).await
    }

    /// Open a WebSocket, say `hello`, and wait for `welcome`.
    pub async fn connect(&self, token: &str, device: &str) -> Result<Connection> {
        let mut conn = self.connect_raw().await?;
        let device_id = DeviceId::new(device).map_err(|e| ClientError::Protocol(e.to_string()))?;
        conn.send(&ClientFrame::Hello { protocol: PROTOCOL_VERSION, token: token.to_string(), device_id }).await?;
        match conn.next(Duration::from_secs(10)).await? {
            ServerFrame::Welcome { user_id, .. } => {
                conn.user = Some(user_id);
                Ok(conn)
            }
            ServerFrame::Error { code, message, .. } => Err(ClientError::Server { status: 0, code, message }),
            other => Err(ClientError::Protocol(format!("expected welcome, got {other:?}"))),
        }
    }

    /// Open a WebSocket without saying anything (for tests of the handshake itself).
    pub async fn connect_raw(&self) -> Result<Connection> {
        let url = format!("{}/v1/ws", self.base.replacen("http", "ws", 1));
        let (ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Connection { ws, buffer: VecDeque::new(), user: None })
    }
}

/// One WebSocket connection.
pub struct Connection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for something else, in arrival order.
    buffer: VecDeque<ServerFrame>,
    /// The authenticated user (after `welcome`).
    pub user: Option<UserId>,
}

impl Connection {
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        self.send_text(frame.encode()).await
    }

    pub async fn send_text(&mut self, text: String) -> Result<()> {
        self.ws.send(Message::Text(text.into())).await.map_err(|e| ClientError::Transport(e.to_string()))
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.ws.send(Message::Binary(bytes.into())).await.map_err(|e| ClientError::Transport(e.to_string()))
    }

    /// The next frame (buffered first), waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<ServerFrame> {
        if let Some(f) = self.buffer.pop_front() {
            return Ok(f);
        }
        self.read(timeout).await
    }

    async fn read(&mut self, timeout: Duration) -> Result<ServerFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next()).await.map_err(|_| ClientError::Timeout)?;
            match msg {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(ClientError::Transport(e.to_string())),
                Some(Ok(Message::Text(t))) => {
                    return ServerFrame::decode(t.as_str()).map_err(|e| ClientError::Protocol(e.to_string()));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string()))));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Wait for the first frame matching `want`, keeping the others for later `next` calls.
    pub async fn expect(&mut self, timeout: Duration, want: impl Fn(&ServerFrame) -> bool) -> Result<ServerFrame> {
        if let Some(i) = self.buffer.iter().position(&want) {
            return Ok(self.buffer.remove(i).expect("index from position"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.read(left).await?;
            if want(&f) {
                return Ok(f);
            }
            self.buffer.push_back(f);
        }
    }

    /// Send a 1:1 message and wait for its ack (or error).
    pub async fn send_message(&mut self, to: UserId, body: &str, client_msg_id: &str) -> Result<ServerFrame> {
        let id = ClientMsgId::new(client_msg_id).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send(&ClientFrame::Send {
            client_msg_id: id.clone(),
            to: Some(to),
            conversation_id: None,
            body: body.to_string(),
            media_id: None,
        })
        .await?;
        self.expect_ack(&id, Duration::from_secs(15)).await
    }

    /// Send into a conversation (a group, or a direct chat by its id) and wait for its ack (or error).
    pub async fn send_to_conversation(
        &mut self,
        conversation: ConversationId,
        body: &str,
        client_msg_id: &str,
    ) -> Result<ServerFrame> {
        let id = ClientMsgId::new(client_msg_id).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send(&ClientFrame::Send {
            client_msg_id: id.clone(),
            to: None,
            conversation_id: Some(conversation),
            body: body.to_string(),
            media_id: None,
        })
        .await?;
        self.expect_ack(&id, Duration::from_secs(15)).await
    }

    /// Wait for the ack or error of `client_msg_id`; an error frame becomes `ClientError::Server`.
    pub async fn expect_ack(&mut self, id: &ClientMsgId, timeout: Duration) -> Result<ServerFrame> {
        let f = self
            .expect(timeout, |f| match f {
                ServerFrame::Ack { client_msg_id, .. } => client_msg_id == id,
                ServerFrame::Error { client_msg_id: Some(c), .. } => c == id,
                _ => false,
            })
            .await?;
        match f {
            ServerFrame::Error { code, message, .. } => Err(ClientError::Server { status: 0, code, message }),
            ack => Ok(ack),
        }
    }

    /// Wait for a `presence` frame about `user`; its `(online, last_seen_ms)`.
    pub async fn expect_presence(&mut self, user: UserId, timeout: Duration) -> Result<(bool, Option<i64>)> {
        match self.expect(timeout, |f| matches!(f, ServerFrame::Presence { user_id, .. } if *user_id == user)).await? {
            ServerFrame::Presence { online, last_seen_ms, .. } => Ok((online, last_seen_ms)),
            other => Err(ClientError::Protocol(format!("expected a presence frame of {user}, got {other:?}"))),
        }
    }

    /// Frames received but not consumed yet.
    pub fn buffered(&self) -> impl Iterator<Item = &ServerFrame> {
        self.buffer.iter()
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
