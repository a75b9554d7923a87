//! Push notification routes (PROTOCOL.md §5, "Push notifications"): the key browsers subscribe
//! with, and registering or forgetting a subscription. Sending is `crate::push`.
//!
//! A subscription belongs to the token it was registered with: signing out (or the token
//! expiring) ends its notifications, and registering the same endpoint again — another account
//! signing in on that browser — moves it to the new token.

use std::sync::Arc;

use parley_protocol::error::ErrorCode;
use parley_protocol::limits::MAX_PUSH_SUBSCRIPTIONS_PER_USER;
use parley_protocol::push::{MuteRequest, PushKeyResponse, PushSubscriptionRequest, PushUnsubscribeRequest};
use parley_storage::token_hash;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::{authed_token, json, json_body, reject, with_ctx};
use crate::context::NodeContext;
use crate::error::NodeError;
use crate::push;

/// Refuses every push route with `not_found` when push is off on this node.
fn enabled(ctx: &NodeContext) -> Result<(), Rejection> {
    if ctx.push.enabled() {
        Ok(())
    } else {
        Err(reject(ErrorCode::NotFound, "push notifications are turned off on this server"))
    }
}

/// Push must be on (else `not_found`, before any token check); then the request is
/// authenticated. Yields the context, the user's id and the token's hash.
fn signed_in(
    ctx: Arc<NodeContext>,
) -> impl Filter<Extract = (Arc<NodeContext>, parley_protocol::UserId, String), Error = Rejection> + Clone {
    let on = ctx.clone();
    warp::any()
        .and_then(move || {
            let on = on.clone();
            async move { enabled(&on) }
        })
        .untuple_one()
        .and(authed_token(ctx))
        .map(|ctx, user: parley_protocol::http::UserView, token: String| (ctx, user.id, token_hash(&token)))
        .untuple_one()
}

pub fn routes(ctx: Arc<NodeContext>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let key = warp::path!("v1" / "push" / "key").and(warp::get()).and(with_ctx(ctx.clone())).and_then(
        |ctx: Arc<NodeContext>| async move {
            enabled(&ctx)?;
            let key = ctx.push.public_key().ok_or_else(|| reject(ErrorCode::Unavailable, "no push key yet"))?;
            Ok::<_, Rejection>(json(&PushKeyResponse { vapid_public_key: key.to_string() }, StatusCode::OK))
        },
    );

    let subscriptions = warp::path!("v1" / "push" / "subscriptions");
    let subscribe = subscriptions
        .and(warp::post())
        .and(signed_in(ctx.clone()))
        .and(json_body::<PushSubscriptionRequest>())
        .and_then(
            |ctx: Arc<NodeContext>, user: parley_protocol::UserId, token: String, sub: PushSubscriptionRequest| async move {
                ctx.push.check_subscription(&sub)?;
                let record = push::record(&sub, user, token);
                ctx.stores
                    .directory
                    .put_push_subscription(&record, MAX_PUSH_SUBSCRIPTIONS_PER_USER)
                    .await
                    .map_err(NodeError::from)?;
                ctx.push.subscribed(user);
                tracing::debug!(%user, "push subscription registered");
                Ok::<_, Rejection>(StatusCode::NO_CONTENT.into_response())
            },
        );
    let unsubscribe = subscriptions
        .and(warp::delete())
        .and(signed_in(ctx.clone()))
        .and(json_body::<PushUnsubscribeRequest>())
        .and_then(
            |ctx: Arc<NodeContext>, user: parley_protocol::UserId, _token: String, req: PushUnsubscribeRequest| async move {
                let forgotten = ctx
                    .stores
                    .directory
                    .delete_push_subscription(&req.endpoint, Some(user))
                    .await
                    .map_err(NodeError::from)?;
                if !forgotten {
                    return Err(reject(ErrorCode::NotFound, "you have no push subscription with that endpoint"));
                }
                Ok::<_, Rejection>(StatusCode::NO_CONTENT.into_response())
            },
        );
    // Muting a conversation's notifications: members only (others learn nothing, as for every
    // conversation route). Works whether or not push is on, like the conversation list showing it.
    let mute = warp::path!("v1" / "conversations" / String / "mute")
        .and(warp::put())
        .and(super::authed(ctx))
        .and(json_body::<MuteRequest>())
        .and_then(
            |id: String, ctx: Arc<NodeContext>, me: parley_protocol::http::UserView, req: MuteRequest| async move {
                let conversation = super::parse_conversation(&id)?;
                if req.muted_until_ms.is_some_and(|t| t < 0) {
                    return Err(reject(
                        ErrorCode::InvalidField,
                        "muted_until_ms must be a time (ms since the epoch) or null",
                    ));
                }
                ctx.member_conversation(me.id, conversation).await?;
                if !ctx
                    .stores
                    .directory
                    .set_muted(me.id, conversation, req.muted_until_ms)
                    .await
                    .map_err(NodeError::from)?
                {
                    return Err(reject(ErrorCode::UnknownConversation, "no such conversation"));
                }
                Ok::<_, Rejection>(StatusCode::NO_CONTENT.into_response())
            },
        );
    key.or(subscribe).unify().or(unsubscribe).unify().or(mute).unify().boxed()
}
