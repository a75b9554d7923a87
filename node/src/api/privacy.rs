//! Privacy routes (PROTOCOL.md §5, "Privacy and contacts"): who may see one's presence, and the
//! contact list that "contacts" means.
//!
//! Every change is stored first, then applied to this node's watchers and cast to its peers with
//! the version the store gave it (`Presence::rules_changed_here`): a watcher anywhere in the
//! cluster sees the new rules from its next presence event on, and at once when what it may see
//! changed.

use std::sync::Arc;

use parley_protocol::cluster::RulesChange;
use parley_protocol::error::ErrorCode;
use parley_protocol::http::UserView;
use parley_protocol::limits::MAX_CONTACTS;
use parley_protocol::privacy::{ContactsResponse, PrivacySettings};
use parley_storage::ContactChange;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::{authed, json, json_body, parse_user, reject};
use crate::context::NodeContext;
use crate::error::NodeError;

pub fn routes(ctx: Arc<NodeContext>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let privacy = warp::path!("v1" / "me" / "privacy");
    let get =
        privacy.and(warp::get()).and(authed(ctx.clone())).and_then(|ctx: Arc<NodeContext>, me: UserView| async move {
            let (settings, _) = ctx
                .stores
                .directory
                .privacy(me.id)
                .await
                .map_err(NodeError::from)?
                .ok_or_else(|| reject(ErrorCode::UnknownUser, "your account no longer exists"))?;
            Ok::<_, Rejection>(json(&settings, StatusCode::OK))
        });
    let put = privacy.and(warp::put()).and(authed(ctx.clone())).and(json_body::<PrivacySettings>()).and_then(
        |ctx: Arc<NodeContext>, me: UserView, settings: PrivacySettings| async move {
            let version = ctx
                .stores
                .directory
                .set_privacy(me.id, settings)
                .await
                .map_err(NodeError::from)?
                .ok_or_else(|| reject(ErrorCode::UnknownUser, "your account no longer exists"))?;
            ctx.presence.rules_changed_here(me.id, version, RulesChange::Settings(settings));
            Ok::<_, Rejection>(json(&settings, StatusCode::OK))
        },
    );
    let list = warp::path!("v1" / "me" / "contacts").and(warp::get()).and(authed(ctx.clone())).and_then(
        |ctx: Arc<NodeContext>, me: UserView| async move {
            let contacts = ctx.stores.directory.contacts(me.id).await.map_err(NodeError::from)?;
            Ok::<_, Rejection>(json(&ContactsResponse { contacts }, StatusCode::OK))
        },
    );
    let contact = warp::path!("v1" / "me" / "contacts" / String);
    let add = contact.and(warp::put()).and(authed(ctx.clone())).and_then(
        |id: String, ctx: Arc<NodeContext>, me: UserView| async move { set_contact(&ctx, &me, &id, true).await },
    );
    let remove = contact.and(warp::delete()).and(authed(ctx)).and_then(
        |id: String, ctx: Arc<NodeContext>, me: UserView| async move { set_contact(&ctx, &me, &id, false).await },
    );
    get.or(put).unify().or(list).unify().or(add).unify().or(remove).unify().boxed()
}

/// Add (`is_contact`) or remove a contact: 204 when it is so afterwards (adding twice is fine);
/// removing someone who is not a contact is `not_found`.
async fn set_contact(
    ctx: &NodeContext,
    me: &UserView,
    id: &str,
    is_contact: bool,
) -> Result<warp::reply::Response, Rejection> {
    let contact = parse_user(id)?;
    if contact == me.id {
        return Err(reject(ErrorCode::InvalidField, "you cannot be your own contact"));
    }
    let change =
        ctx.stores.directory.set_contact(me.id, contact, is_contact, MAX_CONTACTS).await.map_err(NodeError::from)?;
    match change {
        ContactChange::Changed { version } => {
            ctx.presence.rules_changed_here(me.id, version, RulesChange::Contact { contact, is_contact });
        }
        ContactChange::Unchanged if !is_contact => {
            return Err(reject(ErrorCode::NotFound, format!("{contact} is not one of your contacts")));
        }
        ContactChange::Unchanged => {}
        ContactChange::UnknownUser => return Err(reject(ErrorCode::UnknownUser, format!("no user {contact}"))),
        ContactChange::TooMany => {
            return Err(reject(
                ErrorCode::TooManyContacts,
                format!("a contact list holds at most {MAX_CONTACTS} users; remove one first"),
            ))
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
