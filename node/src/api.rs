//! The HTTP surface (warp): accounts, the native `/v1` API, the seed systems' `/api` REST shapes,
//! health/readiness, the WebSocket upgrade (`/v1/ws`: handshake in [`upgrade`], pumped in [`ws`])
//! and the static UI.
//!
//! Errors: every handler fails with an [`ApiError`] rejection; [`handle_rejection`] is the one
//! place that turns any rejection (ours or warp's) into a status and an `ErrorBody` with a stable
//! code. Bodies are read as bytes with a size cap and decoded here (not by warp's json filter) so
//! that bad JSON, wrong fields and invalid UTF-8 get distinct codes.
//!
//! Every route matches its path before its method: warp reports the rejection of the route that
//! got furthest, so an unknown path is `404 not_found` and a known path with the wrong method is
//! `405 method_not_allowed` only when the method filter comes second.

pub mod media;
pub mod privacy;
pub mod push;
pub mod upgrade;
pub mod ws;

use std::convert::Infallible;
use std::sync::Arc;

use parley_protocol::cluster::UserEvent;
use parley_protocol::error::ErrorCode;
use parley_protocol::frames::{classify_serde_error, ConversationKind, MessageView};
use parley_protocol::http::*;
use parley_protocol::limits::{DEFAULT_PAGE, MAX_HTTP_BODY_BYTES};
use parley_protocol::{ClientMsgId, ConversationId, Seq, UserId};
use parley_storage::{now_ms, token_hash, UserRecord};
use ractor::ActorRef;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::actors::cluster_agent::{ClusterAgentMsg, MemberView};
use crate::actors::session_supervisor::SessionSupervisorMsg;
use crate::auth;
use crate::context::{GroupChange, NodeContext};
use crate::error::NodeError;

/// A failed request, carried through warp as a rejection.
#[derive(Debug)]
pub struct ApiError(pub NodeError);
impl warp::reject::Reject for ApiError {}

impl From<NodeError> for Rejection {
    fn from(e: NodeError) -> Self {
        warp::reject::custom(ApiError(e))
    }
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Rejection {
    NodeError::client(code, message).into()
}

/// The one mapping from rejections to HTTP answers.
pub async fn handle_rejection(err: Rejection) -> Result<warp::reply::Response, Infallible> {
    let (code, message) = if let Some(ApiError(e)) = err.find::<ApiError>() {
        (e.code(), e.client_message())
    } else if err.is_not_found() {
        (ErrorCode::NotFound, "no such route".to_string())
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        (ErrorCode::FrameTooLarge, format!("request body exceeds {MAX_HTTP_BODY_BYTES} bytes"))
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (ErrorCode::MethodNotAllowed, "method not allowed on this route".to_string())
    } else if err.find::<warp::reject::InvalidQuery>().is_some() {
        (ErrorCode::InvalidField, "invalid query string".to_string())
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        (ErrorCode::InvalidField, "a content-length header is required".to_string())
    } else {
        tracing::warn!(rejection = ?err, "unhandled rejection");
        (ErrorCode::BadJson, "bad request".to_string())
    };
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(warp::reply::with_status(warp::reply::json(&ErrorBody { error: code, message }), status).into_response())
}

/// Decode a JSON body with distinct codes for invalid UTF-8, bad JSON and bad fields.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Rejection> {
    let text = std::str::from_utf8(bytes).map_err(|_| reject(ErrorCode::InvalidUtf8, "body is not UTF-8"))?;
    serde_json::from_str(text).map_err(|e| NodeError::from(classify_serde_error(e)).into())
}

fn json_body<T: DeserializeOwned + Send>() -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(MAX_HTTP_BODY_BYTES)
        .and(warp::body::bytes())
        .and_then(|bytes: bytes::Bytes| async move { decode::<T>(&bytes) })
}

fn with_ctx(ctx: Arc<NodeContext>) -> impl Filter<Extract = (Arc<NodeContext>,), Error = Infallible> + Clone {
    warp::any().map(move || ctx.clone())
}

/// The bearer token of a request, if any.
fn bearer() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .map(|h: Option<String>| h.and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_string())))
}

/// Requires a valid bearer token; yields the context, the authenticated user and the token (for
/// what belongs to the token rather than the user: push subscriptions).
pub(crate) fn authed_token(
    ctx: Arc<NodeContext>,
) -> impl Filter<Extract = (Arc<NodeContext>, UserView, String), Error = Rejection> + Clone {
    with_ctx(ctx)
        .and(bearer())
        .and_then(|ctx: Arc<NodeContext>, token: Option<String>| async move {
            let token = token
                .ok_or_else(|| reject(ErrorCode::NotAuthenticated, "Authorization: Bearer <token> is required"))?;
            let user = ctx.authenticate(&token).await?.user;
            Ok::<_, Rejection>((ctx, user, token))
        })
        .untuple_one()
}

/// Requires a valid bearer token; yields the context and the authenticated user.
pub(crate) fn authed(
    ctx: Arc<NodeContext>,
) -> impl Filter<Extract = (Arc<NodeContext>, UserView), Error = Rejection> + Clone {
    authed_token(ctx).map(|ctx, user, _token| (ctx, user)).untuple_one()
}

fn json<T: serde::Serialize>(value: &T, status: StatusCode) -> warp::reply::Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

/// All routes of a node.
pub fn routes(
    ctx: Arc<NodeContext>,
    sessions: ActorRef<SessionSupervisorMsg>,
    agent: ActorRef<ClusterAgentMsg>,
    connections: Arc<ws::ConnectionCounter>,
) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let cluster = warp::path!("v1" / "cluster")
        .and(warp::get())
        .and(with_ctx(ctx.clone()))
        .and(warp::any().map(move || agent.clone()))
        .and_then(|ctx: Arc<NodeContext>, agent: ActorRef<ClusterAgentMsg>| async move {
            let members: Vec<MemberView> = crate::context::call(
                &agent,
                |reply| ClusterAgentMsg::Members { reply },
                std::time::Duration::from_secs(2),
                "members",
            )
            .await?;
            let body = serde_json::json!({
                "node": ctx.node_name,
                "boot_id": ctx.boot_id,
                "members": members,
                "shards": shard_views(&ctx),
                "sessions": ctx.hub.session_count(),
                "presence": presence_view(&ctx),
                "redirects": ctx.redirects(),
                "events": ctx.events.to_json(),
                "push": ctx.push.to_json(),
            });
            // Read cross-origin too (see `cors`): the browser UI of one node shows every member's
            // session count, and keeps watching through another member when its own node is killed.
            Ok::<_, Rejection>(json(&body, StatusCode::OK))
        });

    let health = warp::path("healthz")
        .or(warp::path("health"))
        .unify()
        .and(warp::path::end())
        .and(warp::get())
        .and(with_ctx(ctx.clone()))
        .map(|ctx: Arc<NodeContext>| {
            json(&HealthResponse { status: "ok".into(), node: ctx.node_name.clone() }, StatusCode::OK)
        });

    let ready = warp::path!("readyz").and(warp::get()).and(with_ctx(ctx.clone())).map(|ctx: Arc<NodeContext>| {
        let served = ctx.routing.served_count();
        let total = ctx.config.cluster.shard_count as usize;
        let body = serde_json::json!({ "ready": served == total, "shards_routed": served, "shard_count": total, "node": ctx.node_name });
        json(&body, if served == total { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE })
    });

    let register = warp::path!("v1" / "register")
        .and(warp::post())
        .and(with_ctx(ctx.clone()))
        .and(json_body::<Credentials>())
        .and_then(register);
    let login = warp::path!("v1" / "login")
        .and(warp::post())
        .and(with_ctx(ctx.clone()))
        .and(json_body::<Credentials>())
        .and_then(login);
    let logout =
        warp::path!("v1" / "logout").and(warp::post()).and(with_ctx(ctx.clone())).and(bearer()).and_then(logout);

    let users = warp::path!("v1" / "users")
        .or(warp::path!("api" / "users"))
        .unify()
        .and(warp::get())
        .and(authed(ctx.clone()))
        .and_then(|ctx: Arc<NodeContext>, _me: UserView| async move {
            let list = ctx.stores.directory.list_users(1000).await.map_err(NodeError::from)?;
            Ok::<_, Rejection>(json(&list, StatusCode::OK))
        });

    let send = warp::path!("v1" / "messages")
        .and(warp::post())
        .and(authed(ctx.clone()))
        .and(json_body::<SendRequest>())
        .and_then(|ctx: Arc<NodeContext>, me: UserView, req: SendRequest| async move {
            let client_msg_id = req.client_msg_id.clone();
            let ack = ctx.send(me.id, req, 0).await?;
            let resp = SendResponse {
                client_msg_id,
                message_id: ack.message_id,
                conversation_id: ack.conversation_id,
                seq: ack.seq,
                sent_at_ms: ack.sent_at_ms,
                duplicate: ack.duplicate,
            };
            Ok::<_, Rejection>(json(&resp, if ack.duplicate { StatusCode::OK } else { StatusCode::CREATED }))
        });

    let conversations = warp::path!("v1" / "conversations").and(warp::get()).and(authed(ctx.clone())).and_then(
        |ctx: Arc<NodeContext>, me: UserView| async move {
            Ok::<_, Rejection>(json(&ctx.conversations(me.id).await?, StatusCode::OK))
        },
    );

    let history = warp::path!("v1" / "conversations" / String / "messages")
        .and(warp::get())
        // Authentication before the query: a request without a valid token learns nothing else.
        .and(authed(ctx.clone()))
        .and(warp::query::<PageQuery>())
        .and_then(|id: String, ctx: Arc<NodeContext>, me: UserView, q: PageQuery| async move {
            let conversation = parse_conversation(&id)?;
            let (messages, has_more) = ctx.history(me.id, conversation, q.before_seq, q.limit).await?;
            Ok::<_, Rejection>(json(
                &HistoryResponse { conversation_id: conversation, messages, has_more },
                StatusCode::OK,
            ))
        });

    let ws = warp::path!("v1" / "ws")
        .and(upgrade::websocket())
        .and(with_ctx(ctx.clone()))
        .and(warp::any().map(move || sessions.clone()))
        .and(warp::any().map(move || connections.clone()))
        .and_then(ws::upgrade);

    let seed = seed_routes(ctx.clone());
    let groups = group_routes(ctx.clone());

    let ui_dir = ctx.config.ui_dir.clone();
    let index = warp::path::end()
        .and(warp::get())
        .and(warp::fs::file(ui_dir.join("index.html")))
        .map(|f: warp::fs::File| ui_response(f.into_response()));
    let ui = warp::path("ui")
        .and(warp::get())
        .and(warp::fs::dir(ui_dir))
        .map(|f: warp::fs::File| ui_response(f.into_response()));

    // Boxed in two halves: every unboxed `or` nests the filter's type one level deeper, and the
    // compiler's time on this function grows much faster than the chain (one more route took the
    // node crate's build from ≈13 to ≈40 min on the 2-core box).
    let operations =
        health.or(ready).unify().or(cluster).unify().or(register).unify().or(login).unify().or(logout).unify().boxed();
    let chat = users
        .or(send)
        .unify()
        .or(conversations)
        .unify()
        .or(history)
        .unify()
        .or(groups)
        .unify()
        .or(media::routes(ctx.clone()))
        .unify()
        .or(push::routes(ctx.clone()))
        .unify()
        .or(privacy::routes(ctx.clone()))
        .unify()
        .boxed();
    let rest = ws.or(seed).unify().or(index).unify().or(ui).unify().boxed();
    operations
        .or(chat)
        .unify()
        .or(rest)
        .unify()
        .recover(handle_rejection)
        .unify()
        .with(cors())
        .with(warp::trace::request())
        .map(Reply::into_response)
        .boxed()
}

/// Cross-origin access to the whole API. Why: the browser UI served by one node must keep working
/// when that node dies — its socket fails over to another member, and its HTTP calls (history,
/// groups, media, mute, …) follow the socket there, which is another origin. Any origin may call:
/// the API authenticates with a bearer token the page sends explicitly, never with a cookie or
/// anything else a browser adds on its own, so a foreign page can do nothing with it that it could
/// not do from any HTTP client. Error answers carry the headers too, so the UI can read their codes.
fn cors() -> warp::cors::Builder {
    use warp::http::Method;
    warp::cors()
        .allow_any_origin()
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers(["authorization", "content-type"])
        .expose_headers(["content-disposition"])
        .max_age(std::time::Duration::from_secs(600))
}

/// Headers of the UI's static files. The page runs only its own script and style; it talks to
/// its node and, for failover and the cluster view, to the other members (any http/ws origin: a
/// member's address is whatever the operator configured). Never framed, never content-sniffed.
fn ui_response(mut res: warp::reply::Response) -> warp::reply::Response {
    use warp::http::header::{HeaderName, HeaderValue, CONTENT_SECURITY_POLICY, X_CONTENT_TYPE_OPTIONS};
    let headers = res.headers_mut();
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
             connect-src 'self' http: https: ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer"));
    res
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    before_seq: Option<Seq>,
    limit: Option<u32>,
}

pub(crate) fn parse_conversation(id: &str) -> Result<ConversationId, Rejection> {
    id.parse().map_err(|_| reject(ErrorCode::UnknownConversation, "no such conversation"))
}

fn parse_user(id: &str) -> Result<UserId, Rejection> {
    id.parse()
        .map_err(|_| reject(ErrorCode::UnknownUser, format!("no user {}", id.chars().take(64).collect::<String>())))
}

async fn register(ctx: Arc<NodeContext>, creds: Credentials) -> Result<warp::reply::Response, Rejection> {
    auth::validate_username(&creds.username)?;
    auth::validate_password(&creds.password)?;
    let hash = auth::hash_password(creds.password).await?;
    let user =
        UserRecord { id: UserId::random(), username: creds.username, password_hash: hash, created_at_ms: now_ms() };
    ctx.stores.directory.create_user(&user).await.map_err(NodeError::from)?;
    Ok(json(&issue_token(&ctx, user.id, user.username).await?, StatusCode::CREATED))
}

async fn login(ctx: Arc<NodeContext>, creds: Credentials) -> Result<warp::reply::Response, Rejection> {
    let bad = || reject(ErrorCode::BadCredentials, "wrong username or password");
    if creds.password.len() > parley_protocol::limits::MAX_PASSWORD_LEN {
        return Err(bad());
    }
    let user = ctx.stores.directory.user_by_name(&creds.username).await.map_err(NodeError::from)?.ok_or_else(bad)?;
    if !auth::verify_password(creds.password, user.password_hash).await? {
        return Err(bad());
    }
    Ok(json(&issue_token(&ctx, user.id, user.username).await?, StatusCode::OK))
}

async fn issue_token(ctx: &NodeContext, user: UserId, username: String) -> Result<TokenResponse, NodeError> {
    let token = auth::new_token();
    let expires_at_ms = now_ms() + (ctx.config.auth.token_ttl_secs as i64) * 1000;
    ctx.stores.directory.insert_token(&token_hash(&token), user, expires_at_ms).await?;
    Ok(TokenResponse { token, user_id: user, username, expires_at_ms })
}

async fn logout(ctx: Arc<NodeContext>, token: Option<String>) -> Result<warp::reply::Response, Rejection> {
    let token =
        token.ok_or_else(|| reject(ErrorCode::NotAuthenticated, "Authorization: Bearer <token> is required"))?;
    let grant = ctx.authenticate(&token).await?;
    let hash = token_hash(&token);
    ctx.stores.directory.delete_token(&hash).await.map_err(NodeError::from)?;
    // Open WebSockets authenticated by this token end too, wherever they are connected.
    ctx.fan_out(&[grant.user.id], UserEvent::TokenRevoked { token_hash: hash }, 0);
    Ok(warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response())
}

/// Groups: create, read, rename, add and remove members. Every change is the owner's, except
/// that any member may remove themselves (leave). Messages go through the usual send paths with
/// the group's `conversation_id`.
fn group_routes(ctx: Arc<NodeContext>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let create = warp::path!("v1" / "groups")
        .and(warp::post())
        .and(authed(ctx.clone()))
        .and(json_body::<CreateGroupRequest>())
        .and_then(|ctx: Arc<NodeContext>, me: UserView, req: CreateGroupRequest| async move {
            let group = ctx.create_group(me.id, &req.name, &req.members).await?;
            Ok::<_, Rejection>(json(&group, StatusCode::CREATED))
        });
    let get = warp::path!("v1" / "groups" / String).and(warp::get()).and(authed(ctx.clone())).and_then(
        |id: String, ctx: Arc<NodeContext>, me: UserView| async move {
            let group = ctx.group(me.id, parse_group(&id)?).await?;
            Ok::<_, Rejection>(json(&group, StatusCode::OK))
        },
    );
    let rename = warp::path!("v1" / "groups" / String)
        .and(warp::patch())
        .and(authed(ctx.clone()))
        .and(json_body::<RenameGroupRequest>())
        .and_then(|id: String, ctx: Arc<NodeContext>, me: UserView, req: RenameGroupRequest| async move {
            let group = ctx.change_group(me.id, parse_group(&id)?, GroupChange::Rename(req.name)).await?;
            Ok::<_, Rejection>(json(&group, StatusCode::OK))
        });
    let add = warp::path!("v1" / "groups" / String / "members")
        .and(warp::post())
        .and(authed(ctx.clone()))
        .and(json_body::<AddMembersRequest>())
        .and_then(|id: String, ctx: Arc<NodeContext>, me: UserView, req: AddMembersRequest| async move {
            let group = ctx.change_group(me.id, parse_group(&id)?, GroupChange::Add(req.members)).await?;
            Ok::<_, Rejection>(json(&group, StatusCode::OK))
        });
    let remove = warp::path!("v1" / "groups" / String / "members" / String)
        .and(warp::delete())
        .and(authed(ctx))
        .and_then(|id: String, user: String, ctx: Arc<NodeContext>, me: UserView| async move {
            let (group, user) = (parse_group(&id)?, parse_user(&user)?);
            let group = ctx.change_group(me.id, group, GroupChange::Remove(user)).await?;
            Ok::<_, Rejection>(json(&group, StatusCode::OK))
        });
    create.or(get).unify().or(rename).unify().or(add).unify().or(remove).unify().boxed()
}

fn parse_group(id: &str) -> Result<ConversationId, Rejection> {
    id.parse().map_err(|_| reject(ErrorCode::UnknownConversation, "no such group"))
}

/// The seed systems' REST API, same paths and JSON shapes, but authenticated.
fn seed_routes(ctx: Arc<NodeContext>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let send = warp::path!("api" / "messages")
        .and(warp::post())
        .and(authed(ctx.clone()))
        .and(json_body::<SeedSendRequest>())
        .and_then(|ctx: Arc<NodeContext>, me: UserView, req: SeedSendRequest| async move {
            // Compared as UUIDs: the same id in upper case is the same user, not a spoof.
            if req.from_user_id.parse::<UserId>().ok() != Some(me.id) {
                return Err(reject(ErrorCode::SpoofedSender, "from_user_id must be the authenticated user"));
            }
            let to = parse_user(&req.to_user_id)?;
            let client_msg_id = match req.client_msg_id {
                Some(id) => id,
                None => ClientMsgId::new(uuid::Uuid::new_v4().to_string()).map_err(NodeError::from)?,
            };
            let send = SendRequest {
                client_msg_id: client_msg_id.clone(),
                to: Some(to),
                conversation_id: None,
                body: req.content.clone(),
                media_id: None,
            };
            let ack = ctx.send(me.id, send, 0).await?;
            let shard_id = ctx.shard_of(ack.conversation_id).0;
            let message = SeedMessage {
                id: ack.message_id,
                from_user_id: me.id,
                to_user_id: to,
                content: req.content,
                created_at: rfc3339(ack.sent_at_ms),
                shard_id,
                conversation_id: ack.conversation_id,
                seq: ack.seq,
            };
            let body = SeedSendResponse { success: true, id: ack.message_id, shard_id, message };
            Ok(json(&body, if ack.duplicate { StatusCode::OK } else { StatusCode::CREATED }))
        });

    let conversation = warp::path!("api" / "conversations" / String / String)
        .and(warp::get())
        .and(authed(ctx.clone()))
        .and(warp::query::<PageQuery>())
        .and_then(|a: String, b: String, ctx: Arc<NodeContext>, me: UserView, q: PageQuery| async move {
            let (a, b) = (parse_user(&a)?, parse_user(&b)?);
            if me.id != a && me.id != b {
                return Err(reject(ErrorCode::UnknownConversation, "no such conversation"));
            }
            let peer = if me.id == a { b } else { a };
            let conversation = ConversationId::direct(a, b);
            let (messages, _) =
                match ctx.history(me.id, conversation, q.before_seq, Some(q.limit.unwrap_or(DEFAULT_PAGE))).await {
                    Ok(page) => page,
                    // A pair that never talked has an empty conversation, as in the seed.
                    Err(e) if e.code() == ErrorCode::UnknownConversation => {
                        ctx.stores
                            .directory
                            .users_by_id(&[peer])
                            .await
                            .map_err(NodeError::from)?
                            .first()
                            .ok_or_else(|| reject(ErrorCode::UnknownUser, "no such user"))?;
                        (Vec::new(), false)
                    }
                    Err(e) => return Err(e.into()),
                };
            let rows: Vec<SeedMessage> = messages.into_iter().map(|m| seed_row(&ctx, m, &[a, b])).collect();
            Ok(json(&rows, StatusCode::OK))
        });

    let user_messages = warp::path!("api" / "messages" / String).and(warp::get()).and(authed(ctx.clone())).and_then(
        |user: String, ctx: Arc<NodeContext>, me: UserView| async move {
            let user = parse_user(&user)?;
            if user != me.id {
                return Err(reject(ErrorCode::SpoofedSender, "you can only list your own messages"));
            }
            let mut rows = Vec::new();
            for c in ctx.stores.directory.user_conversations(me.id).await.map_err(NodeError::from)? {
                if c.kind != ConversationKind::Direct {
                    continue;
                }
                let (messages, _) = ctx.history(me.id, c.id, None, Some(DEFAULT_PAGE)).await?;
                rows.extend(messages.into_iter().map(|m| seed_row(&ctx, m, &c.members)));
            }
            rows.sort_by(|x, y| x.created_at.cmp(&y.created_at).then(x.seq.cmp(&y.seq)));
            Ok(json(&rows, StatusCode::OK))
        },
    );

    let shards = warp::path!("api" / "shards")
        .and(warp::get())
        .and(authed(ctx.clone()))
        .map(|ctx: Arc<NodeContext>, _me: UserView| json(&shard_views(&ctx), StatusCode::OK));
    let shard_health = warp::path!("api" / "health" / "shards").and(warp::get()).and(authed(ctx)).map(
        |ctx: Arc<NodeContext>, _me: UserView| {
            let shards = shard_views(&ctx);
            let healthy = shards.iter().all(|s| s.status == "healthy");
            let body = serde_json::json!({ "status": if healthy { "healthy" } else { "degraded" }, "shards": shards });
            json(&body, StatusCode::OK)
        },
    );

    send.or(conversation).unify().or(user_messages).unify().or(shards).unify().or(shard_health).unify().boxed()
}

fn shard_views(ctx: &NodeContext) -> Vec<ShardView> {
    ctx.routing
        .snapshot()
        .into_iter()
        .map(|(shard, route)| ShardView {
            shard_id: shard.0,
            group: ctx.stores.group_name(shard).to_string(),
            status: if route.is_some() { "healthy" } else { "unowned" }.into(),
            epoch: route.as_ref().map_or(0, |(_, e)| e.0),
            owner: route.map(|(n, _)| n),
        })
        .collect()
}

fn seed_row(ctx: &NodeContext, m: MessageView, members: &[UserId]) -> SeedMessage {
    let to = members.iter().copied().find(|u| *u != m.sender).unwrap_or(m.sender);
    SeedMessage {
        id: m.message_id,
        from_user_id: m.sender,
        to_user_id: to,
        content: m.body,
        created_at: rfc3339(m.sent_at_ms),
        shard_id: ctx.shard_of(m.conversation_id).0,
        conversation_id: m.conversation_id,
        seq: m.seq,
    }
}

/// RFC 3339 UTC with milliseconds, as the seed's `created_at`.
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Users with a session on this node (`local`), and on each live peer as this node knows them.
fn presence_view(ctx: &NodeContext) -> serde_json::Value {
    let (local, peers) = ctx.presence.counts();
    let peers: serde_json::Map<String, serde_json::Value> = peers.into_iter().map(|(n, c)| (n, c.into())).collect();
    serde_json::json!({ "local": local, "peers": peers })
}
