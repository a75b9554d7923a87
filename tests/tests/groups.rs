//! Groups end to end, against real `parley` processes: creation and the `group` push, messages to
//! every member's live sessions, membership changes (add, remove, leave, the owner leaving),
//! refusals that change nothing, receipts that go only to the senders they concern, reconnect sync,
//! and a cluster where the members sit on different nodes. Single-node tests run on both the
//! embedded store and a real Postgres; the cluster test on Postgres, like `cluster.rs`.
//!
//! "Does not arrive" is only ever asserted after the same event was seen to reach another member,
//! and, where the order is guaranteed (one node: the hub hands every frame of one fan-out to its
//! sessions before the next commit's), also against a sentinel sent afterwards: a frame that was
//! going to come would have come before the sentinel.

use std::time::Duration;

use parley_node::client::{Client, ClientError, Connection};
use parley_protocol::frames::{ClientFrame, ConversationKind, GroupView, MessageView, ReceiptKind, ServerFrame};
use parley_protocol::http::{SendRequest, TokenResponse};
use parley_protocol::limits::{MAX_GROUP_MEMBERS, MAX_GROUP_NAME_BYTES};
use parley_protocol::{ClientMsgId, ConversationId, ErrorCode, UserId};
use parley_tests::backend::Backend;
use parley_tests::cluster::TestCluster;
use parley_tests::node::Storage;
use parley_tests::postgres::TestPostgres;

/// Bound on anything that must happen.
const T: Duration = Duration::from_secs(15);
/// How long a session is watched for a frame that must not come, once the same event has reached
/// another member (so it is not merely slow).
const QUIET: Duration = Duration::from_millis(500);

parley_tests::both_backends!(
    a_group_of_three_is_created_told_and_chats,
    refused_group_requests_change_nothing,
    membership_changes_reach_old_and_new_members,
    group_receipts_reach_the_covered_senders_and_the_readers_devices,
    reconnect_sync_replays_missed_group_messages,
    concurrent_changes_to_one_group_are_all_kept,
    who_may_add_a_user_to_groups_is_theirs_to_say,
);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn register(client: &Client, name: &str) -> TokenResponse {
    let name = format!("{name}{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    client.register(&name, "password-123").await.expect("register")
}

/// A WebSocket session past its (empty or not) reconnect sync.
async fn connect(client: &Client, token: &str, device: &str) -> Connection {
    let mut conn = client.connect(token, device).await.expect("connect");
    conn.expect(T, |f| matches!(f, ServerFrame::SyncDone { .. })).await.expect("sync_done");
    conn
}

fn cid(s: &str) -> ClientMsgId {
    ClientMsgId::new(s).unwrap()
}

fn sorted(mut users: Vec<UserId>) -> Vec<UserId> {
    users.sort();
    users
}

/// The `group` push with this version.
async fn expect_group(conn: &mut Connection, version: u64) -> GroupView {
    match conn.expect(T, |f| matches!(f, ServerFrame::Group { group } if group.version == version)).await {
        Ok(ServerFrame::Group { group }) => group,
        other => panic!("expected a group push of version {version}, got {other:?}"),
    }
}

async fn expect_message(conn: &mut Connection, body: &str) -> MessageView {
    match conn.expect(T, |f| matches!(f, ServerFrame::Message { message } if message.body == body)).await {
        Ok(ServerFrame::Message { message }) => message,
        other => panic!("expected message {body:?}, got {other:?}"),
    }
}

async fn expect_receipt(
    conn: &mut Connection,
    conversation_id: ConversationId,
    user_id: UserId,
    kind: ReceiptKind,
    seq: u64,
) {
    let want = ServerFrame::Receipt { conversation_id, user_id, kind, seq };
    if let Err(e) = conn.expect(T, |f| *f == want).await {
        panic!("expected {want:?}: {e:?}");
    }
}

/// The next `error` frame (for frames without a client_msg_id, such as `history` and `read`).
async fn expect_error(conn: &mut Connection, code: ErrorCode) {
    match conn.expect(T, |f| matches!(f, ServerFrame::Error { .. })).await {
        Ok(ServerFrame::Error { code: got, .. }) => assert_eq!(got, code),
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

/// Watch `conn` for [`QUIET`] and fail if a frame matching `unwanted` comes. Call it only after the
/// same event was seen to reach someone else.
async fn expect_none(conn: &mut Connection, what: &str, unwanted: impl Fn(&ServerFrame) -> bool) {
    match conn.expect(QUIET, &unwanted).await {
        Err(ClientError::Timeout) => {}
        Ok(f) => panic!("{what}: got {f:?}"),
        Err(e) => panic!("{what}: {e:?}"),
    }
}

/// Wait for the message `sentinel` (fanned out after anything `unwanted` would have been) and fail
/// if a frame matching `unwanted` came before it.
async fn expect_sentinel_without(
    conn: &mut Connection,
    sentinel: &str,
    what: &str,
    unwanted: impl Fn(&ServerFrame) -> bool,
) {
    expect_message(conn, sentinel).await;
    if let Some(f) = conn.buffered().find(|&f| unwanted(f)) {
        panic!("{what}: got {f:?} before the sentinel {sentinel:?}");
    }
}

fn is_message(body: &'static str) -> impl Fn(&ServerFrame) -> bool {
    move |f| matches!(f, ServerFrame::Message { message } if message.body == body)
}

/// Send into `group` and return (seq, message id); a refusal fails the test.
async fn send(conn: &mut Connection, group: ConversationId, body: &str, id: &str) -> (u64, parley_protocol::MessageId) {
    match conn.send_to_conversation(group, body, id).await {
        Ok(ServerFrame::Ack { seq, message_id, conversation_id, duplicate: false, .. }) => {
            assert_eq!(conversation_id, group, "{id} acked for its conversation");
            (seq, message_id)
        }
        other => panic!("{id}: expected a fresh ack, got {other:?}"),
    }
}

/// The messages of a fresh connection's reconnect sync, up to its `sync_done` (whose count must
/// match, with nothing truncated). Nothing but messages comes before it.
async fn replay(conn: &mut Connection) -> Vec<MessageView> {
    let mut got = Vec::new();
    loop {
        match conn.next(T).await.unwrap() {
            ServerFrame::Message { message } => got.push(message),
            ServerFrame::SyncDone { messages, truncated } => {
                assert!(truncated.is_empty(), "{truncated:?}");
                assert_eq!(messages, got.len() as u64, "sync_done counts what was replayed");
                return got;
            }
            other => panic!("unexpected {other:?} during sync"),
        }
    }
}

/// [`replay`], all of it in `group`, as (seq, body).
async fn replay_group(conn: &mut Connection, group: ConversationId) -> Vec<(u64, String)> {
    let got = replay(conn).await;
    assert!(got.iter().all(|m| m.conversation_id == group), "{got:?}");
    got.into_iter().map(|m| (m.seq, m.body)).collect()
}

/// The code (and HTTP status) of a refused client call.
fn refusal<V: std::fmt::Debug>(result: Result<V, ClientError>) -> (u16, ErrorCode) {
    match result {
        Err(ClientError::Server { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn random_users(n: usize) -> Vec<UserId> {
    (0..n).map(|_| UserId::random()).collect()
}

// ---------------------------------------------------------------------------------------------
// Single node, both backends
// ---------------------------------------------------------------------------------------------

/// Create a group of three: `201` with the view (name trimmed, owner included, members sorted,
/// version 0), every member's sessions get the `group` push; a message reaches the other members
/// and the sender's other session but not the sending session; seqs start at 1; HTTP sends work
/// with `conversation_id`; members read history (HTTP and WebSocket) and see the group in their
/// conversation list with its kind, name and owner.
async fn a_group_of_three_is_created_told_and_chats(pg: bool) {
    let backend = Backend::new(pg).await;
    let node = backend.node("").await;
    let http = node.client();
    let alice = register(&http, "alice").await;
    let bob = register(&http, "bob").await;
    let carol = register(&http, "carol").await;
    let mut a1 = connect(&http, &alice.token, "a1").await;
    let mut a2 = connect(&http, &alice.token, "a2").await;
    let mut b = connect(&http, &bob.token, "b1").await;
    let mut c = connect(&http, &carol.token, "c1").await;

    // The owner may list themselves too; they are one member.
    let body = serde_json::json!({
        "name": "  Weekend plans  ",
        "members": [carol.user_id, bob.user_id, alice.user_id],
    });
    let (status, value) =
        http.raw("POST", "/v1/groups", Some(&alice.token), Some(serde_json::to_vec(&body).unwrap())).await.unwrap();
    assert_eq!(status, 201, "{value}");
    let view: GroupView = serde_json::from_value(value).unwrap();
    let group = view.conversation_id;
    let everyone = sorted(vec![alice.user_id, bob.user_id, carol.user_id]);
    assert_eq!(
        view,
        GroupView {
            conversation_id: group,
            name: "Weekend plans".into(),
            owner: alice.user_id,
            members: everyone.clone(),
            version: 0
        }
    );
    assert!(group.is_group(), "a group id is a random one");
    for conn in [&mut a1, &mut a2, &mut b, &mut c] {
        assert_eq!(expect_group(conn, 0).await, view);
    }
    assert_eq!(http.group(&carol.token, group).await.unwrap(), view);

    // A message from alice's first session.
    let (seq, message_id) = send(&mut a1, group, "hello all", "g-1").await;
    assert_eq!(seq, 1);
    for conn in [&mut b, &mut c, &mut a2] {
        let m = expect_message(conn, "hello all").await;
        assert_eq!((m.conversation_id, m.seq, m.sender, m.message_id), (group, 1, alice.user_id, message_id));
    }
    // Over HTTP, with the conversation id: no session sent it, so every session gets it.
    let req = SendRequest {
        client_msg_id: cid("g-2"),
        to: None,
        conversation_id: Some(group),
        body: "from bob".into(),
        media_id: None,
    };
    let resp = http.send(&bob.token, &req).await.unwrap();
    assert_eq!((resp.conversation_id, resp.seq, resp.duplicate), (group, 2, false));
    for conn in [&mut a1, &mut a2, &mut b, &mut c] {
        assert_eq!(expect_message(conn, "from bob").await.seq, 2);
    }
    // The sending session got no echo of its own message (it would have come before seq 2).
    assert!(!a1.buffered().any(is_message("hello all")), "the sending session got its own message back");

    // History, for every member, over HTTP and over the WebSocket.
    for who in [&alice, &bob, &carol] {
        let page = http.history(&who.token, group, None, None).await.unwrap();
        let got: Vec<(u64, &str, UserId)> = page.messages.iter().map(|m| (m.seq, m.body.as_str(), m.sender)).collect();
        assert_eq!(got, vec![(1, "hello all", alice.user_id), (2, "from bob", bob.user_id)]);
        assert!(!page.has_more);
    }
    c.send(&ClientFrame::History { req_id: None, conversation_id: group, before_seq: None, limit: Some(1) })
        .await
        .unwrap();
    match c.expect(T, |f| matches!(f, ServerFrame::History { .. })).await.unwrap() {
        ServerFrame::History { conversation_id, messages, has_more, .. } => {
            assert_eq!(conversation_id, group);
            assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2]);
            assert!(has_more);
        }
        _ => unreachable!(),
    }

    // The conversation list: kind, name, owner, members, counts.
    let list = http.conversations(&carol.token).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let entry = &list[0];
    assert_eq!(
        (entry.conversation_id, entry.kind, entry.name.as_deref(), entry.owner, &entry.members),
        (group, ConversationKind::Group, Some("Weekend plans"), Some(alice.user_id), &everyone)
    );
    assert_eq!((entry.last_seq, entry.unread), (2, 2));
    let list = http.conversations(&alice.token).await.unwrap();
    assert_eq!((list.len(), list[0].unread), (1, 1), "her own message is never unread: {list:?}");
}

/// A user's `groups` privacy setting decides who may put them in a group, at creation and when
/// members are added: everyone, their contacts (people on *their* list), or nobody. A refusal is
/// `forbidden`, names nobody else's choice, and changes nothing; the people already in a group
/// stay whatever they choose later.
async fn who_may_add_a_user_to_groups_is_theirs_to_say(pg: bool) {
    use parley_protocol::privacy::{Audience, PrivacySettings};
    let backend = Backend::new(pg).await;
    let node = backend.node("").await;
    let http = node.client();
    let alice = register(&http, "alice").await;
    let bob = register(&http, "bob").await;
    let carol = register(&http, "carol").await;
    let groups = |groups| PrivacySettings { groups, ..PrivacySettings::default() };

    // Bob: contacts only, and alice is not one yet.
    http.set_privacy(&bob.token, groups(Audience::Contacts)).await.unwrap();
    let refused = refusal(http.create_group(&alice.token, "hike", &[bob.user_id, carol.user_id]).await);
    assert_eq!(refused, (403, ErrorCode::Forbidden), "a creation with bob in it");
    assert!(http.conversations(&alice.token).await.unwrap().is_empty(), "no group was made");
    let view = http.create_group(&alice.token, "hike", &[carol.user_id]).await.unwrap();
    let group = view.conversation_id;
    assert_eq!(refusal(http.add_members(&alice.token, group, &[bob.user_id]).await), (403, ErrorCode::Forbidden));
    assert_eq!(http.group(&alice.token, group).await.unwrap().members.len(), 2, "nobody was added");
    // Once bob lists alice as a contact, she may; carol, not his contact, still may not (in a group
    // of her own).
    http.set_contact(&bob.token, alice.user_id, true).await.unwrap();
    let view = http.add_members(&alice.token, group, &[bob.user_id]).await.unwrap();
    assert!(view.members.contains(&bob.user_id));
    let other = refusal(http.create_group(&carol.token, "carol's", &[bob.user_id]).await);
    assert_eq!(other, (403, ErrorCode::Forbidden), "carol is not bob's contact");

    // Nobody: not even a contact. Being in the group already is not undone.
    http.set_privacy(&bob.token, groups(Audience::Nobody)).await.unwrap();
    let refused = refusal(http.create_group(&alice.token, "again", &[bob.user_id]).await);
    assert_eq!(refused, (403, ErrorCode::Forbidden), "nobody means nobody");
    assert!(http.group(&alice.token, group).await.unwrap().members.contains(&bob.user_id), "bob stays");
    // Adding someone who is already a member is not adding them.
    http.add_members(&alice.token, group, &[bob.user_id]).await.unwrap();
    // Unknown users are still unknown, checked first; everyone (the default) lets anyone add.
    assert_eq!(refusal(http.add_members(&alice.token, group, &[UserId::random()]).await).1, ErrorCode::UnknownUser);
    http.set_privacy(&bob.token, groups(Audience::Everyone)).await.unwrap();
    http.create_group(&carol.token, "carol's", &[bob.user_id]).await.unwrap();
}

/// Every refused group request gets its code, and none of them changes anything: non-members see
/// `unknown_conversation` (as for a group that does not exist), non-owners `forbidden`, unknown
/// users `unknown_user`, bad names and too many members `invalid_field`. The checks run in that
/// order (an outsider's bad request is still `unknown_conversation`, a member's `forbidden`), and
/// the size comes before existence: 1025 made-up ids are `invalid_field`, 1024 `unknown_user`.
async fn refused_group_requests_change_nothing(pg: bool) {
    let backend = Backend::new(pg).await;
    let node = backend.node("").await;
    let http = node.client();
    let alice = register(&http, "alice").await;
    let bob = register(&http, "bob").await;
    let mallory = register(&http, "mallory").await;
    let mut b = connect(&http, &bob.token, "b1").await;
    let mut m = connect(&http, &mallory.token, "m1").await;
    let view = http.create_group(&alice.token, "team", &[bob.user_id]).await.unwrap();
    let group = view.conversation_id;
    expect_group(&mut b, 0).await;
    // A direct chat between the two members: a real conversation, but no group.
    let direct = ConversationId::direct(alice.user_id, bob.user_id);
    let dm = SendRequest {
        client_msg_id: cid("dm-1"),
        to: Some(bob.user_id),
        conversation_id: None,
        body: "dm".into(),
        media_id: None,
    };
    http.send(&alice.token, &dm).await.unwrap();
    expect_message(&mut b, "dm").await;

    // --- HTTP, through the typed client.
    let outsider = (404, ErrorCode::UnknownConversation);
    let forbidden = (403, ErrorCode::Forbidden);
    let unknown_user = (404, ErrorCode::UnknownUser);
    let invalid = (400, ErrorCode::InvalidField);
    let (a, b_, m_) = (alice.token.as_str(), bob.token.as_str(), mallory.token.as_str());
    assert_eq!(refusal(http.group(m_, group).await), outsider, "a non-member reads the group");
    assert_eq!(refusal(http.group(a, ConversationId(uuid::Uuid::new_v4())).await), outsider, "no such group");
    assert_eq!(refusal(http.group(a, direct).await), outsider, "a direct chat is not a group");
    assert_eq!(refusal(http.history(m_, group, None, None).await), outsider, "a non-member reads history");
    let intrude = SendRequest {
        client_msg_id: cid("in-1"),
        to: None,
        conversation_id: Some(group),
        body: "x".into(),
        media_id: None,
    };
    assert_eq!(refusal(http.send(m_, &intrude).await), outsider, "a non-member sends over HTTP");
    assert_eq!(refusal(http.rename_group(m_, group, "mine").await), outsider, "a non-member renames");
    assert_eq!(refusal(http.add_members(m_, group, &[mallory.user_id]).await), outsider, "a non-member joins");
    assert_eq!(refusal(http.remove_member(m_, group, bob.user_id).await), outsider, "a non-member removes");
    assert_eq!(refusal(http.remove_member(m_, group, mallory.user_id).await), outsider, "a non-member leaves");
    assert_eq!(refusal(http.rename_group(b_, group, "bob's").await), forbidden, "a member renames");
    assert_eq!(refusal(http.add_members(b_, group, &[mallory.user_id]).await), forbidden, "a member adds");
    assert_eq!(refusal(http.remove_member(b_, group, alice.user_id).await), forbidden, "a member removes another");
    // Membership is checked before the right to change, and that before the input: an outsider
    // learns nothing from a bad request either, and a member only that they may not make it.
    let ghost = UserId::random();
    let crowd = random_users(MAX_GROUP_MEMBERS + 1);
    assert_eq!(refusal(http.add_members(m_, group, &[ghost]).await), outsider, "an outsider adds a ghost");
    assert_eq!(refusal(http.add_members(m_, group, &crowd).await), outsider, "an outsider adds a crowd");
    assert_eq!(refusal(http.rename_group(m_, group, "").await), outsider, "an outsider renames badly");
    assert_eq!(refusal(http.add_members(b_, group, &[ghost]).await), forbidden, "a member adds a ghost");
    assert_eq!(refusal(http.add_members(b_, group, &crowd).await), forbidden, "a member adds a crowd");
    assert_eq!(refusal(http.rename_group(b_, group, "").await), forbidden, "a member renames badly");
    assert_eq!(refusal(http.create_group(a, "ghosts", &[bob.user_id, ghost]).await), unknown_user, "create");
    assert_eq!(refusal(http.add_members(a, group, &[ghost]).await), unknown_user, "add");
    assert_eq!(refusal(http.remove_member(a, group, mallory.user_id).await), unknown_user, "remove a non-member");
    let too_long = "x".repeat(MAX_GROUP_NAME_BYTES + 1);
    let too_long_multibyte = "é".repeat(MAX_GROUP_NAME_BYTES / 2 + 1);
    for name in ["", "   ", too_long.as_str(), too_long_multibyte.as_str(), "bell\u{7}", "two\nlines", "tab\there"] {
        assert_eq!(refusal(http.create_group(a, name, &[bob.user_id]).await), invalid, "create named {name:?}");
        assert_eq!(refusal(http.rename_group(a, group, name).await), invalid, "rename to {name:?}");
    }
    // Size before existence: one over the limit (the owner counts) is invalid whoever they are...
    let over = random_users(MAX_GROUP_MEMBERS);
    assert_eq!(refusal(http.create_group(a, "crowd", &over).await), invalid, "create with 1025 members");
    let over = random_users(MAX_GROUP_MEMBERS + 1);
    assert_eq!(refusal(http.add_members(a, group, &over).await), invalid, "add 1025 members");
    // ...and exactly at the limit the made-up users are what is wrong.
    let at_limit = random_users(MAX_GROUP_MEMBERS - 1);
    assert_eq!(refusal(http.create_group(a, "crowd", &at_limit).await), unknown_user, "create with 1024 members");

    // --- HTTP, raw: malformed ids and bodies.
    let user_path = format!("/v1/groups/{group}/members/not-a-uuid");
    let bob_path = format!("/v1/groups/not-a-uuid/members/{}", bob.user_id);
    let name_body = Some(br#"{"name":"x"}"#.to_vec());
    let members_body = Some(format!(r#"{{"members":["{}"]}}"#, mallory.user_id).into_bytes());
    // (method, path, token, body, expected status, expected code)
    type Check<'a> = (&'a str, &'a str, Option<&'a str>, Option<Vec<u8>>, u16, &'a str);
    let checks: Vec<Check> = vec![
        ("GET", "/v1/groups/not-a-uuid", Some(a), None, 404, "unknown_conversation"),
        ("PATCH", "/v1/groups/not-a-uuid", Some(a), name_body.clone(), 404, "unknown_conversation"),
        ("POST", "/v1/groups/not-a-uuid/members", Some(a), members_body.clone(), 404, "unknown_conversation"),
        ("DELETE", &bob_path, Some(a), None, 404, "unknown_conversation"),
        ("DELETE", &user_path, Some(a), None, 404, "unknown_user"),
        ("GET", "/v1/conversations/not-a-uuid/messages", Some(a), None, 404, "unknown_conversation"),
        ("POST", "/v1/groups", None, name_body.clone(), 401, "not_authenticated"),
        ("POST", "/v1/groups", Some(a), Some(b"{nope".to_vec()), 400, "bad_json"),
        ("POST", "/v1/groups", Some(a), Some(br#"{"members":[]}"#.to_vec()), 400, "bad_json"),
    ];
    for (method, path, token, body, status, code) in checks {
        let (got_status, got) = http.raw(method, path, token, body).await.unwrap();
        assert_eq!((got_status, got["error"].as_str().unwrap_or("")), (status, code), "{method} {path}: {got}");
    }

    // --- WebSocket: the outsider cannot send, read history or acknowledge.
    let refused = m.send_to_conversation(group, "let me in", "ws-1").await;
    assert_eq!(refusal(refused).1, ErrorCode::UnknownConversation, "a non-member sends over the WebSocket");
    m.send(&ClientFrame::History { req_id: None, conversation_id: group, before_seq: None, limit: None })
        .await
        .unwrap();
    expect_error(&mut m, ErrorCode::UnknownConversation).await;
    m.send(&ClientFrame::Read { conversation_id: group, seq: 1 }).await.unwrap();
    expect_error(&mut m, ErrorCode::UnknownConversation).await;

    // --- Nothing changed. The group is as created; the first message is seq 1 (nothing of the
    // outsider's was stored) and bob was told of no change before it.
    assert_eq!(http.group(a, group).await.unwrap(), view);
    let mut a1 = connect(&http, a, "a1").await;
    assert_eq!(send(&mut a1, group, "still ours", "ok-1").await.0, 1);
    expect_sentinel_without(&mut b, "still ours", "a group change bob was told of", |f| {
        matches!(f, ServerFrame::Group { .. })
    })
    .await;
    let page = http.history(b_, group, None, None).await.unwrap();
    assert_eq!(page.messages.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), vec!["still ours"]);
    assert!(http.conversations(m_).await.unwrap().is_empty(), "the outsider is in nothing");
    let groups_of = |list: Vec<parley_protocol::frames::ConversationSummary>| {
        list.into_iter().filter(|c| c.kind == ConversationKind::Group).map(|c| c.conversation_id).collect::<Vec<_>>()
    };
    assert_eq!(groups_of(http.conversations(a).await.unwrap()), vec![group], "no refused create made a group");
    assert_eq!(groups_of(http.conversations(b_).await.unwrap()), vec![group]);

    // The limits themselves are allowed: a name of exactly 100 bytes (of two-byte characters).
    let longest = "é".repeat(MAX_GROUP_NAME_BYTES / 2);
    let solo = http.create_group(m_, &longest, &[]).await.unwrap();
    assert_eq!((solo.name, solo.members, solo.owner), (longest, vec![mallory.user_id], mallory.user_id));
}

/// Membership changes: a rename and an add are pushed to every member (the added ones too), and
/// the added members get the next messages; a removed member is told (a view without them), then
/// cannot send, read or see the group, and gets no later message; a member may leave; when the
/// owner leaves, the first remaining member by id owns the group; the last member leaving leaves
/// an empty group that still names its owner and that nobody can reach.
async fn membership_changes_reach_old_and_new_members(pg: bool) {
    let backend = Backend::new(pg).await;
    let node = backend.node("").await;
    let http = node.client();
    let alice = register(&http, "alice").await;
    let bob = register(&http, "bob").await;
    let carol = register(&http, "carol").await;
    let dave = register(&http, "dave").await;
    let erin = register(&http, "erin").await;
    let mut a = connect(&http, &alice.token, "a1").await;
    let mut b = connect(&http, &bob.token, "b1").await;
    let mut c = connect(&http, &carol.token, "c1").await;
    let mut d = connect(&http, &dave.token, "d1").await;
    let mut e = connect(&http, &erin.token, "e1").await;
    let group = http.create_group(&alice.token, "book club", &[bob.user_id, carol.user_id]).await.unwrap();
    let group = group.conversation_id;
    for conn in [&mut a, &mut b, &mut c] {
        expect_group(conn, 0).await;
    }

    // Rename: version 1, to every member. The same name again is no change.
    let renamed = http.rename_group(&alice.token, group, "Book club").await.unwrap();
    assert_eq!((renamed.name.as_str(), renamed.version), ("Book club", 1));
    for conn in [&mut a, &mut b, &mut c] {
        assert_eq!(expect_group(conn, 1).await, renamed);
    }
    assert_eq!(http.rename_group(&alice.token, group, "Book club").await.unwrap(), renamed, "no change");

    // Add two: version 2 (the no-op bumped nothing), to the old members and the new ones.
    let added = http.add_members(&alice.token, group, &[dave.user_id, erin.user_id]).await.unwrap();
    let five = sorted(vec![alice.user_id, bob.user_id, carol.user_id, dave.user_id, erin.user_id]);
    assert_eq!((added.version, &added.members, added.owner), (2, &five, alice.user_id));
    for conn in [&mut a, &mut b, &mut c, &mut d, &mut e] {
        assert_eq!(expect_group(conn, 2).await, added);
    }
    assert_eq!(http.add_members(&alice.token, group, &[bob.user_id]).await.unwrap(), added, "already a member");
    let list = http.conversations(&dave.token).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].conversation_id, list[0].kind, list[0].name.as_deref(), list[0].owner),
        (group, ConversationKind::Group, Some("Book club"), Some(alice.user_id))
    );
    send(&mut a, group, "welcome", "w-1").await;
    for conn in [&mut b, &mut c, &mut d, &mut e] {
        expect_message(conn, "welcome").await;
    }
    // The new members send too.
    send(&mut e, group, "thanks", "e-1").await;
    for conn in [&mut a, &mut b, &mut c, &mut d] {
        expect_message(conn, "thanks").await;
    }

    // Remove carol: everyone, carol included, gets the view without her.
    let without_carol = http.remove_member(&alice.token, group, carol.user_id).await.unwrap();
    let four = sorted(vec![alice.user_id, bob.user_id, dave.user_id, erin.user_id]);
    assert_eq!((without_carol.version, &without_carol.members), (3, &four));
    for conn in [&mut a, &mut b, &mut c, &mut d, &mut e] {
        assert_eq!(expect_group(conn, 3).await, without_carol);
    }
    let refused = c.send_to_conversation(group, "am I still here?", "c-1").await;
    assert_eq!(refusal(refused).1, ErrorCode::UnknownConversation, "a removed member sends");
    assert_eq!(refusal(http.history(&carol.token, group, None, None).await).1, ErrorCode::UnknownConversation);
    assert_eq!(refusal(http.group(&carol.token, group).await).1, ErrorCode::UnknownConversation);
    c.send(&ClientFrame::Read { conversation_id: group, seq: 1 }).await.unwrap();
    expect_error(&mut c, ErrorCode::UnknownConversation).await;
    assert!(http.conversations(&carol.token).await.unwrap().is_empty(), "the group left carol's list");
    // A later message reaches the others, and not carol.
    send(&mut b, group, "after carol", "b-1").await;
    for conn in [&mut a, &mut d, &mut e] {
        expect_message(conn, "after carol").await;
    }
    expect_none(&mut c, "a removed member got a later message", is_message("after carol")).await;
    let dm = SendRequest {
        client_msg_id: cid("dm-1"),
        to: Some(carol.user_id),
        conversation_id: None,
        body: "sentinel for carol".into(),
        media_id: None,
    };
    http.send(&alice.token, &dm).await.unwrap();
    expect_sentinel_without(
        &mut c,
        "sentinel for carol",
        "a removed member got a later message",
        is_message("after carol"),
    )
    .await;
    // Nor does a new device of hers replay the group: its sync has the direct message only.
    let mut c2 = http.connect(&carol.token, "c2").await.unwrap();
    let synced: Vec<String> = replay(&mut c2).await.into_iter().map(|m| m.body).collect();
    assert_eq!(synced, vec!["sentinel for carol"], "a removed member's new device");

    // Bob leaves by himself.
    let without_bob = http.remove_member(&bob.token, group, bob.user_id).await.unwrap();
    let three = sorted(vec![alice.user_id, dave.user_id, erin.user_id]);
    assert_eq!((without_bob.version, &without_bob.members, without_bob.owner), (4, &three, alice.user_id));
    for conn in [&mut a, &mut b, &mut d, &mut e] {
        assert_eq!(expect_group(conn, 4).await, without_bob);
    }
    let refused = b.send_to_conversation(group, "one more thing", "b-2").await;
    assert_eq!(refusal(refused).1, ErrorCode::UnknownConversation, "a member who left sends");

    // The owner leaves: the first remaining member by id owns the group.
    let heir = dave.user_id.min(erin.user_id);
    let without_alice = http.remove_member(&alice.token, group, alice.user_id).await.unwrap();
    assert_eq!(
        (without_alice.version, without_alice.members.clone(), without_alice.owner),
        (5, sorted(vec![dave.user_id, erin.user_id]), heir)
    );
    for conn in [&mut a, &mut d, &mut e] {
        assert_eq!(expect_group(conn, 5).await, without_alice);
    }
    assert_eq!(refusal(http.group(&alice.token, group).await).1, ErrorCode::UnknownConversation);
    let (heir_token, other_token) =
        if heir == dave.user_id { (&dave.token, &erin.token) } else { (&erin.token, &dave.token) };
    assert_eq!(refusal(http.rename_group(other_token, group, "mine").await).1, ErrorCode::Forbidden);
    let by_heir = http.rename_group(heir_token, group, "Book club II").await.unwrap();
    assert_eq!((by_heir.version, by_heir.owner), (6, heir));
    for conn in [&mut d, &mut e] {
        assert_eq!(expect_group(conn, 6).await, by_heir);
    }
    send(&mut d, group, "carry on", "d-1").await;
    expect_message(&mut e, "carry on").await;

    // The last two leave, the owner last: the group is left empty, still naming its last owner
    // (never a nil id), and nobody can see it, send to it or join it any more.
    let (heir_conn, other_conn) = if heir == dave.user_id { (&mut d, &mut e) } else { (&mut e, &mut d) };
    let other = if heir == dave.user_id { erin.user_id } else { dave.user_id };
    let only_heir = http.remove_member(other_token, group, other).await.unwrap();
    assert_eq!((only_heir.version, &only_heir.members, only_heir.owner), (7, &vec![heir], heir));
    assert_eq!(expect_group(heir_conn, 7).await, only_heir);
    assert_eq!(expect_group(other_conn, 7).await, only_heir);
    let empty = http.remove_member(heir_token, group, heir).await.unwrap();
    assert_eq!((empty.version, empty.members.len(), empty.owner), (8, 0, heir), "{empty:?}");
    assert_eq!(expect_group(heir_conn, 8).await, empty);
    for token in [&alice.token, &bob.token, &carol.token, &dave.token, &erin.token] {
        assert_eq!(refusal(http.group(token, group).await).1, ErrorCode::UnknownConversation);
        assert_eq!(refusal(http.add_members(token, group, &[alice.user_id]).await).1, ErrorCode::UnknownConversation);
        assert!(http.conversations(token).await.unwrap().iter().all(|c| c.conversation_id != group));
    }
    let refused = heir_conn.send_to_conversation(group, "anyone?", "h-1").await;
    assert_eq!(refusal(refused).1, ErrorCode::UnknownConversation, "a send to an empty group");
}

/// In a group a receipt goes to the reader's own sessions and to the senders of the messages it
/// covers, not to members who sent none of them.
async fn group_receipts_reach_the_covered_senders_and_the_readers_devices(pg: bool) {
    let backend = Backend::new(pg).await;
    let node = backend.node("").await;
    let http = node.client();
    let alice = register(&http, "alice").await;
    let bob = register(&http, "bob").await;
    let carol = register(&http, "carol").await;
    let dave = register(&http, "dave").await;
    let mut a = connect(&http, &alice.token, "a1").await;
    let mut b1 = connect(&http, &bob.token, "b1").await;
    let mut b2 = connect(&http, &bob.token, "b2").await;
    let mut c = connect(&http, &carol.token, "c1").await;
    let mut d = connect(&http, &dave.token, "d1").await;
    let members = [bob.user_id, carol.user_id, dave.user_id];
    let group = http.create_group(&alice.token, "receipts", &members).await.unwrap().conversation_id;
    assert_eq!(send(&mut a, group, "one", "a-1").await.0, 1);
    assert_eq!(send(&mut c, group, "two", "c-1").await.0, 2);
    for conn in [&mut b1, &mut b2, &mut d] {
        expect_message(conn, "one").await;
        expect_message(conn, "two").await;
    }
    expect_message(&mut a, "two").await;
    expect_message(&mut c, "one").await;

    // Bob's phone got seq 1 (alice's): alice hears of it, and both of bob's sessions.
    b1.send(&ClientFrame::Delivered { conversation_id: group, seq: 1 }).await.unwrap();
    for conn in [&mut a, &mut b1, &mut b2] {
        expect_receipt(conn, group, bob.user_id, ReceiptKind::Delivered, 1).await;
    }
    // Bob read up to seq 2 on his laptop: alice (seq 1) and carol (seq 2) hear of it.
    b2.send(&ClientFrame::Read { conversation_id: group, seq: 2 }).await.unwrap();
    for conn in [&mut a, &mut c, &mut b1, &mut b2] {
        expect_receipt(conn, group, bob.user_id, ReceiptKind::Read, 2).await;
    }
    // Dave read both: alice, carol and dave's own session, not bob (who sent neither).
    d.send(&ClientFrame::Read { conversation_id: group, seq: 2 }).await.unwrap();
    for conn in [&mut a, &mut c, &mut d] {
        expect_receipt(conn, group, dave.user_id, ReceiptKind::Read, 2).await;
    }

    // Nobody got a receipt about messages they did not send (besides their own receipts): carol
    // not bob's delivery of alice's seq 1, dave none of bob's, bob none of dave's. Each was
    // fanned out before a sentinel that follows it.
    let from =
        |user: UserId| move |f: &ServerFrame| matches!(f, ServerFrame::Receipt { user_id, .. } if *user_id == user);
    let delivered_by_bob = move |f: &ServerFrame| matches!(f, ServerFrame::Receipt { user_id, kind: ReceiptKind::Delivered, .. } if *user_id == bob.user_id);
    expect_none(&mut d, "dave got bob's receipt", from(bob.user_id)).await;
    send(&mut a, group, "sentinel", "a-2").await;
    expect_sentinel_without(&mut c, "sentinel", "carol got bob's delivery of alice's message", delivered_by_bob).await;
    expect_sentinel_without(&mut d, "sentinel", "dave got bob's receipt", from(bob.user_id)).await;
    expect_sentinel_without(&mut b1, "sentinel", "bob got dave's receipt", from(dave.user_id)).await;
    expect_sentinel_without(&mut b2, "sentinel", "bob got dave's receipt", from(dave.user_id)).await;

    // The receipts moved the cursors: nothing unread for bob and dave before the sentinel.
    for who in [&bob, &dave] {
        let list = http.conversations(&who.token).await.unwrap();
        assert_eq!((list[0].read_seq, list[0].unread), (2, 1), "{}", who.username);
    }

    // The list carries how far *every* other member has got, the ticks of a client's own messages
    // after a restart. For alice: carol acknowledged nothing yet, so nothing is everyone's.
    let floor = |token: String| {
        let http = http.clone();
        async move {
            let list = http.conversations(&token).await.unwrap();
            (list[0].others_delivered_seq, list[0].others_read_seq)
        }
    };
    assert_eq!(floor(alice.token.clone()).await, (0, 0), "carol has no cursor");
    for (conn, who) in [(&mut c, carol.user_id), (&mut d, dave.user_id)] {
        conn.send(&ClientFrame::Read { conversation_id: group, seq: 3 }).await.unwrap();
        expect_receipt(conn, group, who, ReceiptKind::Read, 3).await;
    }
    assert_eq!(floor(alice.token.clone()).await, (2, 2), "bob read up to 2, carol and dave 3");
    b1.send(&ClientFrame::Delivered { conversation_id: group, seq: 3 }).await.unwrap();
    expect_receipt(&mut b1, group, bob.user_id, ReceiptKind::Delivered, 3).await;
    assert_eq!(floor(alice.token.clone()).await, (3, 2), "delivered to all, read by all but bob up to 2");
    // A member who left no longer holds the group back.
    http.remove_member(&alice.token, group, bob.user_id).await.unwrap();
    assert_eq!(floor(alice.token.clone()).await, (3, 3), "carol and dave read everything");
}

/// A device that was offline gets the group's messages it missed on its next `hello`, in order,
/// then nothing again once it acknowledged them; a new device gets everything.
async fn reconnect_sync_replays_missed_group_messages(pg: bool) {
    let backend = Backend::new(pg).await;
    let node = backend.node("").await;
    let http = node.client();
    let alice = register(&http, "alice").await;
    let bob = register(&http, "bob").await;
    let carol = register(&http, "carol").await;
    let mut a = connect(&http, &alice.token, "a1").await;
    let mut b = connect(&http, &bob.token, "b1").await;
    let c = connect(&http, &carol.token, "c1").await;
    let group = http.create_group(&alice.token, "sync", &[bob.user_id, carol.user_id]).await.unwrap();
    let group = group.conversation_id;
    c.close().await;

    let sent = [("a", "m1"), ("b", "m2"), ("a", "m3"), ("a", "m4"), ("b", "m5")];
    for (i, (who, body)) in sent.iter().enumerate() {
        let conn = if *who == "a" { &mut a } else { &mut b };
        assert_eq!(send(conn, group, body, &format!("s-{i}")).await.0, i as u64 + 1);
    }
    let want: Vec<(u64, String)> =
        sent.iter().enumerate().map(|(i, (_, body))| (i as u64 + 1, body.to_string())).collect();
    let mut c = http.connect(&carol.token, "c1").await.unwrap();
    assert_eq!(replay_group(&mut c, group).await, want, "the offline device gets what it missed, in order");

    // Acknowledged (the reader's own sessions hear of the receipt: then it is stored).
    c.send(&ClientFrame::Delivered { conversation_id: group, seq: 5 }).await.unwrap();
    expect_receipt(&mut c, group, carol.user_id, ReceiptKind::Delivered, 5).await;
    c.close().await;
    let mut c = http.connect(&carol.token, "c1").await.unwrap();
    assert_eq!(replay_group(&mut c, group).await, vec![], "nothing again after the acknowledgement");
    let mut fresh = http.connect(&carol.token, "c-new").await.unwrap();
    assert_eq!(replay_group(&mut fresh, group).await, want, "a new device gets everything");
    // And live delivery continues on the reconnected device.
    send(&mut a, group, "live again", "s-live").await;
    assert_eq!(expect_message(&mut c, "live again").await.seq, 6);
}

/// Changes to one group made at the same moment are all kept: each is applied to the version
/// before it (compare-and-set, retried), so the versions are 1..=n and every member is told of each.
async fn concurrent_changes_to_one_group_are_all_kept(pg: bool) {
    let backend = Backend::new(pg).await;
    let node = backend.node("").await;
    let http = node.client();
    let alice = register(&http, "alice").await;
    let bob = register(&http, "bob").await;
    let (carol, dave, erin) =
        (register(&http, "carol").await, register(&http, "dave").await, register(&http, "erin").await);
    let mut b = connect(&http, &bob.token, "b1").await;
    let group = http.create_group(&alice.token, "busy", &[bob.user_id]).await.unwrap().conversation_id;
    expect_group(&mut b, 0).await;

    let token = alice.token.as_str();
    let clients: Vec<Client> = (0..4).map(|_| node.client()).collect();
    let (add_carol, add_dave, add_erin) = ([carol.user_id], [dave.user_id], [erin.user_id]);
    let (r1, r2, r3, r4) = tokio::join!(
        clients[0].add_members(token, group, &add_carol),
        clients[1].add_members(token, group, &add_dave),
        clients[2].add_members(token, group, &add_erin),
        clients[3].rename_group(token, group, "very busy"),
    );
    let mut versions: Vec<u64> =
        [r1, r2, r3, r4].into_iter().map(|r| r.expect("every change succeeds").version).collect();
    versions.sort_unstable();
    assert_eq!(versions, vec![1, 2, 3, 4], "each change applied once, on top of the one before");
    let last = http.group(token, group).await.unwrap();
    let everyone = sorted(vec![alice.user_id, bob.user_id, carol.user_id, dave.user_id, erin.user_id]);
    assert_eq!((last.version, last.name.as_str(), &last.members), (4, "very busy", &everyone));
    for v in 1..=4 {
        expect_group(&mut b, v).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

const SHARDS: u16 = 16;
const LEASE_MS: u64 = 2_000;

/// Send into `group` with the same client id until acked: a route may settle just after the maps
/// converge, which answers `unavailable` (retried by any client with the same id).
async fn send_until_acked(conn: &mut Connection, group: ConversationId, body: &str, id: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match conn.send_to_conversation(group, body, id).await {
            Ok(ServerFrame::Ack { seq, .. }) => return seq,
            Err(ClientError::Server { code: ErrorCode::Unavailable, .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("{id}: {other:?}"),
        }
    }
}

/// Members on three nodes, the group's shard wherever it lands. Messages cross nodes; a change made
/// through one node is pushed to members on the others and makes each node forget its copy of the
/// group: an added member on another node gets the next message sent there, a removed member's
/// sends through another node are refused at once, and concurrent changes through two nodes are
/// both kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_on_different_nodes() {
    let pg = TestPostgres::start().await.unwrap();
    let cluster = TestCluster::start(3, 3, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    cluster.wait_converged(&[0, 1, 2], T).await.unwrap();
    let (n1, n2, n3) = (cluster.client(0), cluster.client(1), cluster.client(2));
    let alice = register(&n1, "alice").await;
    let bob = register(&n1, "bob").await;
    let carol = register(&n1, "carol").await;
    let dave = register(&n1, "dave").await;
    let erin = register(&n1, "erin").await;
    let mut a = connect(&n1, &alice.token, "a").await;
    let mut b = connect(&n2, &bob.token, "b").await;
    let mut d = connect(&n2, &dave.token, "d").await;
    let mut c = connect(&n3, &carol.token, "c").await;
    let mut e = connect(&n3, &erin.token, "e").await;

    let view = n1.create_group(&alice.token, "across", &[bob.user_id, carol.user_id]).await.unwrap();
    let group = view.conversation_id;
    for conn in [&mut a, &mut b, &mut c] {
        assert_eq!(expect_group(conn, 0).await, view);
    }
    assert_eq!(send_until_acked(&mut a, group, "from n1", "x-1").await, 1);
    for conn in [&mut b, &mut c] {
        expect_message(conn, "from n1").await;
    }
    // Bob's send makes n2 read (and keep) the group as it is now, without dave.
    assert_eq!(send_until_acked(&mut b, group, "from n2", "x-2").await, 2);
    for conn in [&mut a, &mut c] {
        expect_message(conn, "from n2").await;
    }

    // Dave (on n2) is added through n1. Once his push arrived, n2 has forgotten its copy: bob's
    // next send through n2 reaches him.
    let with_dave = n1.add_members(&alice.token, group, &[dave.user_id]).await.unwrap();
    for conn in [&mut a, &mut b, &mut c, &mut d] {
        assert_eq!(expect_group(conn, 1).await, with_dave);
    }
    send_until_acked(&mut b, group, "hi dave", "x-3").await;
    for conn in [&mut a, &mut c, &mut d] {
        expect_message(conn, "hi dave").await;
    }
    // Carol's send makes n3 keep the group with her in it.
    send_until_acked(&mut c, group, "from n3", "x-4").await;
    for conn in [&mut a, &mut b, &mut d] {
        expect_message(conn, "from n3").await;
    }

    // Carol (on n3) is removed through n1: her sends through n3 are refused within moments (the
    // change reaches n3 as a cast, so a send racing it may still pass).
    let without_carol = n1.remove_member(&alice.token, group, carol.user_id).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match c.send_to_conversation(group, "still here?", &format!("late-{attempt}")).await {
            Err(ClientError::Server { code: ErrorCode::UnknownConversation, .. }) => break,
            Ok(ServerFrame::Ack { .. }) | Err(ClientError::Server { code: ErrorCode::Unavailable, .. }) => {
                assert!(tokio::time::Instant::now() < deadline, "n3 still accepts carol's sends after 2 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    for conn in [&mut a, &mut b, &mut c, &mut d] {
        assert_eq!(expect_group(conn, 2).await, without_carol);
    }
    for node in [&n3, &n2] {
        let refused = refusal(node.history(&carol.token, group, None, None).await).1;
        assert_eq!(refused, ErrorCode::UnknownConversation, "history through {}", node.base());
    }
    send_until_acked(&mut a, group, "after carol", "x-5").await;
    for conn in [&mut b, &mut d] {
        expect_message(conn, "after carol").await;
    }
    expect_none(&mut c, "a removed member got a later message", is_message("after carol")).await;

    // Two changes at once through two nodes: both kept.
    let add_erin = [erin.user_id];
    let (added, renamed) = tokio::join!(
        n1.add_members(&alice.token, group, &add_erin),
        n2.rename_group(&alice.token, group, "across nodes"),
    );
    let mut versions = vec![added.unwrap().version, renamed.unwrap().version];
    versions.sort_unstable();
    assert_eq!(versions, vec![3, 4]);
    // The members of both versions are told of both; erin of the one that added her and of any
    // after it, so at least of version 4. Once that came, n3 (which kept the group as it was when
    // carol's refused send read it) has forgotten its copy: reads and sends there see erin.
    for conn in [&mut a, &mut b, &mut d] {
        for v in [3, 4] {
            expect_group(conn, v).await;
        }
    }
    let last = expect_group(&mut e, 4).await;
    let members = sorted(vec![alice.user_id, bob.user_id, dave.user_id, erin.user_id]);
    assert_eq!((last.name.as_str(), &last.members), ("across nodes", &members));
    assert_eq!(n3.group(&erin.token, group).await.unwrap(), last);
    send_until_acked(&mut e, group, "hello from erin", "x-6").await;
    for conn in [&mut a, &mut b, &mut d] {
        expect_message(conn, "hello from erin").await;
    }
}
