//! The node's live-session registry: which local session actors serve which user.
//!
//! Not an actor on purpose: fan-out is the hottest path (every message, every receipt) and a
//! read-mostly map behind a std `RwLock` (never held across `.await`) costs nanoseconds, where a
//! registry actor would add a mailbox hop per delivery.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use parley_protocol::cluster::{Delivery, UserEvent};
use parley_protocol::frames::ServerFrame;
use parley_protocol::UserId;
use ractor::ActorRef;

use crate::actors::session::SessionMsg;

/// An event on its way to the local sessions of its users. One `Arc` is shared by all of them, and
/// so is the frame it becomes on their sockets: the first session to push it encodes the JSON,
/// the others copy the text. A message to a 1,024-member group is encoded once per node, not once
/// per member (JSON encoding, with its five UUIDs, was most of a delivery's cost in a session).
pub struct LocalEvent {
    pub event: UserEvent,
    frame: OnceLock<String>,
}

impl LocalEvent {
    pub fn new(event: UserEvent) -> LocalEvent {
        LocalEvent { event, frame: OnceLock::new() }
    }

    /// The text of the frame this event is pushed as; `None` for an event that is not pushed to the
    /// client as it is (a revoked token closes the sessions that used it instead).
    pub fn frame_text(&self) -> Option<&str> {
        if let Some(text) = self.frame.get() {
            return Some(text);
        }
        // Two sessions on different threads may both encode it once; one copy is kept.
        let text = event_frame(&self.event)?.encode();
        Some(self.frame.get_or_init(|| text))
    }
}

/// The client frame of an event, if it has one.
fn event_frame(event: &UserEvent) -> Option<ServerFrame> {
    Some(match event {
        UserEvent::Message(m) => ServerFrame::Message { message: m.clone() },
        UserEvent::Group(group) => ServerFrame::Group { group: group.clone() },
        UserEvent::Receipt { conversation_id, user_id, kind, seq } => {
            ServerFrame::Receipt { conversation_id: *conversation_id, user_id: *user_id, kind: *kind, seq: *seq }
        }
        UserEvent::Typing { conversation_id, user_id } => {
            ServerFrame::Typing { conversation_id: *conversation_id, user_id: *user_id }
        }
        UserEvent::Presence { user_id, online, last_seen_ms } => {
            ServerFrame::Presence { user_id: *user_id, online: *online, last_seen_ms: *last_seen_ms }
        }
        UserEvent::TokenRevoked { .. } => return None,
    })
}

/// The live sessions of one user: (session id, actor).
type UserSessions = Vec<(u64, ActorRef<SessionMsg>)>;

#[derive(Default)]
pub struct Hub {
    users: RwLock<HashMap<UserId, UserSessions>>,
}

impl Hub {
    pub fn register(&self, user: UserId, session: u64, actor: ActorRef<SessionMsg>) {
        let mut map = self.users.write().unwrap_or_else(|p| p.into_inner());
        map.entry(user).or_default().push((session, actor));
    }

    pub fn unregister(&self, user: UserId, session: u64) {
        let mut map = self.users.write().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(&user) {
            list.retain(|(id, _)| *id != session);
            if list.is_empty() {
                map.remove(&user);
            }
        }
    }

    /// Hand each delivery's event (in order, under one read lock) to every local session of its
    /// users except its `skip_session`. The event is shared (one [`LocalEvent`]) by all its
    /// sessions and not even allocated when none of them is on this node.
    pub fn deliver_all(&self, deliveries: Vec<Delivery>) {
        let map = self.users.read().unwrap_or_else(|p| p.into_inner());
        for Delivery { users, event, skip_session } in deliveries {
            let mut event = Some(event);
            let mut shared: Option<Arc<LocalEvent>> = None;
            for user in &users {
                for (id, actor) in map.get(user).into_iter().flatten() {
                    if *id == skip_session {
                        continue;
                    }
                    let e = shared
                        .get_or_insert_with(|| Arc::new(LocalEvent::new(event.take().expect("taken once"))))
                        .clone();
                    let _ = actor.cast(SessionMsg::Event(e));
                }
            }
        }
    }

    /// Number of authenticated sessions on this node.
    pub fn session_count(&self) -> usize {
        self.users.read().unwrap_or_else(|p| p.into_inner()).values().map(Vec::len).sum()
    }

    pub fn is_online(&self, user: UserId) -> bool {
        self.users.read().unwrap_or_else(|p| p.into_inner()).contains_key(&user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::frames::{MessageView, ReceiptKind};
    use parley_protocol::{ClientMsgId, ConversationId, MessageId};

    /// The shared text is exactly what each session encoded for itself before.
    #[test]
    fn a_local_event_encodes_the_frame_a_session_would() {
        let (a, b) = (UserId::random(), UserId::random());
        let conversation_id = ConversationId::direct(a, b);
        let message = MessageView {
            message_id: MessageId::new(),
            conversation_id,
            seq: 7,
            sender: a,
            client_msg_id: ClientMsgId::new("c-1").unwrap(),
            body: "héllo \"quoted\"\n".into(),
            sent_at_ms: 1_700_000_000_000,
            media: None,
        };
        let receipt = UserEvent::Receipt { conversation_id, user_id: b, kind: ReceiptKind::Read, seq: 7 };
        let cases = [
            (UserEvent::Message(message.clone()), ServerFrame::Message { message }),
            (receipt, ServerFrame::Receipt { conversation_id, user_id: b, kind: ReceiptKind::Read, seq: 7 }),
        ];
        for (event, frame) in cases {
            let local = LocalEvent::new(event);
            assert_eq!(local.frame_text(), Some(frame.encode().as_str()));
            assert_eq!(local.frame_text(), Some(frame.encode().as_str()), "the second push reuses it");
        }
        let revoked = LocalEvent::new(UserEvent::TokenRevoked { token_hash: "h".into() });
        assert_eq!(revoked.frame_text(), None);
    }
}
