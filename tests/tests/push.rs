//! Push notifications end to end: real `parley` nodes send Web Push (RFC 8030) requests to a push
//! service run by this test on loopback, which plays both the push service (records each request,
//! answers as scripted) and the browser behind it (holds the subscription's private key and auth
//! secret, decrypts the payload as RFC 8291 says, checks the VAPID signature of RFC 8292 against
//! the key the node advertised). Nothing in the node is mocked: the only stand-in is the third
//! party the node calls, as FCM or Mozilla's push service would be in production.
//!
//! Absence is shown by order, not by waiting: a user's subscriptions are tried newest first, one
//! after the other, so when a notification reaches an older subscription, one that should not
//! have been sent to a newer one would already have arrived.

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parley_node::client::{Client, Connection};
use parley_protocol::frames::{ClientFrame, ServerFrame};
use parley_protocol::http::TokenResponse;
use parley_protocol::push::MUTED_FOREVER_MS;
use parley_protocol::shard::shard_for;
use parley_protocol::{ConversationId, ErrorCode, MessageId, Seq, UserId};
use parley_tests::backend::Backend;
use parley_tests::cluster::TestCluster;
use parley_tests::node::Storage;
use parley_tests::postgres::TestPostgres;
use parley_tests::push::{Device, PushService};

const T: Duration = Duration::from_secs(15);

parley_tests::both_backends!(notifications_reach_offline_devices_only);

async fn register(http: &Client, name: &str) -> TokenResponse {
    http.register(name, "correct horse battery").await.unwrap()
}

async fn online(http: &Client, who: &TokenResponse) -> Connection {
    let mut c = http.connect(&who.token, "laptop").await.unwrap();
    c.expect(T, |f| matches!(f, ServerFrame::SyncDone { .. })).await.unwrap();
    c
}

fn acked(frame: ServerFrame) -> (MessageId, Seq) {
    match frame {
        ServerFrame::Ack { message_id, seq, .. } => (message_id, seq),
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// Wait until `watcher` sees `user` go offline (their last session has ended on every node).
async fn await_offline(watcher: &mut Connection, user: UserId) {
    watcher.send(&ClientFrame::Presence { user_ids: vec![user] }).await.unwrap();
    watcher
        .expect(T, |f| matches!(f, ServerFrame::Presence { user_id, online: false, .. } if *user_id == user))
        .await
        .unwrap();
}

fn code(r: Result<(), parley_node::client::ClientError>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

/// Offline users get an encrypted, VAPID-signed notification on each subscribed device; online
/// users get none; bad subscriptions are refused and never called; a push service's "gone"
/// forgets the subscription, its 5xx is retried; signing out and unsubscribing end
/// notifications; the key survives a restart.
async fn notifications_reach_offline_devices_only(pg: bool) {
    let mut service = PushService::start().await;
    let backend = Backend::new(pg).await;
    let mut node = backend.node(&service.toml()).await;
    let http = node.client();
    let key = http.push_key().await.unwrap().vapid_public_key;
    assert_eq!(URL_SAFE_NO_PAD.decode(&key).unwrap().len(), 65, "an uncompressed P-256 point");
    let alice = register(&http, "alice").await;
    let bob = register(&http, "bob").await;
    let carol = register(&http, "carol").await;
    let audience = service.origin.clone();

    // Refused, each with a clear code; none of these endpoints is ever called (checked at the end).
    let b1 = Device::new(&service, "/b1");
    let mut sub = b1.subscription();
    assert_eq!(code(http.push_subscribe("not-a-token", &sub).await), Some(ErrorCode::BadToken));
    let (status, _) = http.raw("POST", "/v1/push/subscriptions", None, Some(b"{}".to_vec())).await.unwrap();
    assert_eq!(status, 401, "no token");
    sub.endpoint = "https://push.evil.example/x".into();
    assert_eq!(code(http.push_subscribe(&bob.token, &sub).await), Some(ErrorCode::InvalidField), "not allowed");
    sub.endpoint = "http://127.0.0.1:1/x".into();
    assert_eq!(code(http.push_subscribe(&bob.token, &sub).await), Some(ErrorCode::InvalidField), "other port");
    let mut bad_point = b1.subscription();
    bad_point.endpoint = format!("{}/bad-point", service.origin);
    bad_point.keys.p256dh = URL_SAFE_NO_PAD.encode([4u8; 65]);
    assert_eq!(code(http.push_subscribe(&bob.token, &bad_point).await), Some(ErrorCode::InvalidField), "off the curve");
    let mut bad_auth = b1.subscription();
    bad_auth.endpoint = format!("{}/bad-auth", service.origin);
    bad_auth.keys.auth = URL_SAFE_NO_PAD.encode([7u8; 15]);
    assert_eq!(code(http.push_subscribe(&bob.token, &bad_auth).await), Some(ErrorCode::InvalidField), "short auth");
    let (status, body) =
        http.raw("POST", "/v1/push/subscriptions", Some(&bob.token), Some(b"{\"endpoint\":".to_vec())).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_json")));
    let (status, _) = http.raw("GET", "/v1/push/subscriptions", Some(&bob.token), None).await.unwrap();
    assert_eq!(status, 405);

    // Bob turns notifications on and is offline: alice's message reaches his device.
    http.push_subscribe(&bob.token, &b1.subscription()).await.unwrap();
    let mut a = online(&http, &alice).await;
    let (message_id, seq) = acked(a.send_message(bob.user_id, "hello bob", "m1").await.unwrap());
    let n = b1.open(&service.next().await, &key, &audience);
    let direct = ConversationId::direct(alice.user_id, bob.user_id);
    assert_eq!(
        (n.kind.as_str(), n.conversation_id, n.message_id, n.seq, n.sender_id, n.sender_name.as_str()),
        ("message", direct, message_id, seq, alice.user_id, "alice")
    );
    assert_eq!((n.preview.as_deref(), n.group_name, n.count, n.media_mime), (Some("hello bob"), None, 1, None));

    // Online, he gets the message live and no notification; offline again, the next one is
    // notified — and it is the first to reach the push service since.
    let b = online(&http, &bob).await;
    a.send_message(bob.user_id, "you are here", "m2").await.unwrap();
    let mut b = b;
    b.expect(T, |f| matches!(f, ServerFrame::Message { message } if message.body == "you are here")).await.unwrap();
    b.close().await;
    await_offline(&mut a, bob.user_id).await;
    let (_, seq3) = acked(a.send_message(bob.user_id, "gone again?", "m3").await.unwrap());
    let n = b1.open(&service.next().await, &key, &audience);
    assert_eq!((n.seq, n.preview.as_deref()), (seq3, Some("gone again?")), "nothing was sent while he was online");

    // Carol has not turned notifications on: her message is not pushed, and the node remembers
    // that she has none — until she subscribes through it, which it sees at once.
    a.send_message(carol.user_id, "carol?", "c0").await.unwrap();
    let counted = parley_tests::wait_until(T, || async {
        let (_, view) = http.raw("GET", "/v1/cluster", None, None).await.unwrap();
        view["push"]["unsubscribed"].as_u64() == Some(1)
    })
    .await;
    assert!(counted, "carol's notification was skipped: she has no subscription");
    // A group: each offline member is notified, with the group's name.
    let c1 = Device::new(&service, "/c1");
    http.push_subscribe(&carol.token, &c1.subscription()).await.unwrap();
    let group = http.create_group(&alice.token, "Trip", &[bob.user_id, carol.user_id]).await.unwrap();
    a.send_to_conversation(group.conversation_id, "tickets booked", "g1").await.unwrap();
    let mut seen = HashMap::new();
    for _ in 0..2 {
        let pushed = service.next().await;
        let device = if pushed.path == "/b1" { &b1 } else { &c1 };
        seen.insert(pushed.path.clone(), device.open(&pushed, &key, &audience));
    }
    for path in ["/b1", "/c1"] {
        let n = &seen[path];
        assert_eq!(
            (n.conversation_id, n.group_name.as_deref(), n.preview.as_deref()),
            (group.conversation_id, Some("Trip"), Some("tickets booked")),
            "{path}"
        );
    }

    // Carol mutes the group: bob is still notified, she is not (her messages still arrive by
    // sync). Refused: a negative time, a conversation one is not in, a malformed id. Unmuted, she
    // is notified again.
    let mute = |token: String, id: String, body: serde_json::Value| {
        let http = http.clone();
        async move {
            let path = format!("/v1/conversations/{id}/mute");
            let (status, answer) =
                http.raw("PUT", &path, Some(&token), Some(body.to_string().into_bytes())).await.unwrap();
            (status, answer["error"].as_str().map(String::from))
        }
    };
    let group_id = group.conversation_id.to_string();
    let forever = serde_json::json!({ "muted_until_ms": MUTED_FOREVER_MS });
    assert_eq!(mute(carol.token.clone(), group_id.clone(), forever.clone()).await, (204, None));
    let negative = serde_json::json!({ "muted_until_ms": -5 });
    assert_eq!(mute(carol.token.clone(), group_id.clone(), negative).await, (400, Some("invalid_field".into())));
    let alice_carol = ConversationId::direct(alice.user_id, carol.user_id).to_string();
    let not_his = mute(bob.token.clone(), alice_carol, forever.clone()).await;
    assert_eq!(not_his, (404, Some("unknown_conversation".into())));
    let malformed = mute(carol.token.clone(), "not-an-id".into(), forever).await;
    assert_eq!(malformed, (404, Some("unknown_conversation".into())));
    let listed = http.conversations(&carol.token).await.unwrap();
    let muted: Vec<_> = listed.iter().filter_map(|c| c.muted_until_ms.map(|t| (c.conversation_id, t))).collect();
    assert_eq!(muted, [(group.conversation_id, MUTED_FOREVER_MS)], "the list shows the mute");
    a.send_to_conversation(group.conversation_id, "quiet please", "g-m1").await.unwrap();
    assert_eq!(b1.open(&service.next().await, &key, &audience).preview.as_deref(), Some("quiet please"));
    let skipped = parley_tests::wait_until(T, || async {
        let (_, view) = http.raw("GET", "/v1/cluster", None, None).await.unwrap();
        view["push"]["muted"].as_u64() == Some(1)
    })
    .await;
    assert!(skipped, "carol's notification was skipped: she muted the group");
    assert_eq!(mute(carol.token.clone(), group_id, serde_json::json!({ "muted_until_ms": null })).await, (204, None));
    a.send_to_conversation(group.conversation_id, "loud again", "g-m2").await.unwrap();
    let mut paths = Vec::new();
    for _ in 0..2 {
        let pushed = service.next().await;
        let device = if pushed.path == "/b1" { &b1 } else { &c1 };
        assert_eq!(device.open(&pushed, &key, &audience).preview.as_deref(), Some("loud again"));
        paths.push(pushed.path);
    }
    paths.sort();
    assert_eq!(paths, ["/b1", "/c1"], "both notified once carol unmuted");

    // A second device of bob's (newer: tried first). Its push service fails once (retried), then
    // says it is gone (forgotten: the next message reaches only b1).
    let bob2 = http.login("bob", "correct horse battery").await.unwrap();
    let b2 = Device::new(&service, "/b2");
    http.push_subscribe(&bob2.token, &b2.subscription()).await.unwrap();
    service.answer("/b2", &[503, 201, 410]);
    let (m4, _) = acked(a.send_message(bob.user_id, "four", "m4").await.unwrap());
    for attempt in ["503", "retry"] {
        let n = b2.open(&service.next().await, &key, &audience);
        assert_eq!(n.message_id, m4, "{attempt}");
    }
    assert_eq!(b1.open(&service.next().await, &key, &audience).message_id, m4);
    let (m5, _) = acked(a.send_message(bob.user_id, "five", "m5").await.unwrap());
    assert_eq!(b2.open(&service.next().await, &key, &audience).message_id, m5, "answered 410");
    assert_eq!(b1.open(&service.next().await, &key, &audience).message_id, m5);
    let (m6, _) = acked(a.send_message(bob.user_id, "six", "m6").await.unwrap());
    assert_eq!(b1.open(&service.next().await, &key, &audience).message_id, m6, "b2 was forgotten");

    // Signing out ends that token's notifications (b3, newer than b1, would come first).
    let bob3 = http.login("bob", "correct horse battery").await.unwrap();
    let b3 = Device::new(&service, "/b3");
    http.push_subscribe(&bob3.token, &b3.subscription()).await.unwrap();
    http.logout(&bob3.token).await.unwrap();
    let (m7, _) = acked(a.send_message(bob.user_id, "seven", "m7").await.unwrap());
    assert_eq!(b1.open(&service.next().await, &key, &audience).message_id, m7, "b3 signed out");

    // Unsubscribing: only one's own, once.
    assert_eq!(code(http.push_unsubscribe(&carol.token, &b1.endpoint).await), Some(ErrorCode::NotFound), "not hers");
    http.push_unsubscribe(&bob.token, &b1.endpoint).await.unwrap();
    assert_eq!(code(http.push_unsubscribe(&bob.token, &b1.endpoint).await), Some(ErrorCode::NotFound), "already off");
    let stores = backend.open().await;
    assert!(stores.directory.push_subscriptions(bob.user_id, parley_storage::now_ms()).await.unwrap().is_empty());
    assert_eq!(stores.directory.push_subscriptions(carol.user_id, parley_storage::now_ms()).await.unwrap().len(), 1);

    // What the node counted; and nothing ever reached the refused endpoints.
    let (_, cluster) = http.raw("GET", "/v1/cluster", None, None).await.unwrap();
    let push = &cluster["push"];
    assert_eq!(
        (push["sent"].as_u64(), push["gone"].as_u64(), push["failed"].as_u64()),
        (Some(12), Some(1), Some(0)),
        "{push}"
    );
    assert!(service.received.try_recv().is_err(), "no other request");

    // The key is the cluster's, kept in the directory: the same after a restart. This restart also
    // narrows the push services the node may call: carol's subscription, made while it was
    // allowed, is forgotten instead of called.
    node.terminate(T).await.unwrap();
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    let narrowed = config.replace(&service.toml(), "[push]\nallowed_endpoints = [\"https://fcm.googleapis.com\"]\n");
    assert_ne!(config, narrowed);
    std::fs::write(node.config_path(), narrowed).unwrap();
    node.restart().await.unwrap();
    let http = node.client();
    assert_eq!(http.push_key().await.unwrap().vapid_public_key, key);
    assert_eq!(code(http.push_subscribe(&carol.token, &c1.subscription()).await), Some(ErrorCode::InvalidField));
    let mut a = online(&http, &alice).await;
    a.send_to_conversation(group.conversation_id, "anyone?", "g2").await.unwrap();
    let forgotten = parley_tests::wait_until(T, || async {
        stores.directory.push_subscriptions(carol.user_id, parley_storage::now_ms()).await.unwrap().is_empty()
    })
    .await;
    assert!(forgotten, "carol's subscription to a service no longer allowed is forgotten");
    assert!(service.received.try_recv().is_err(), "and never called");
}

/// In a cluster: every node advertises the same key, and the node that commits a message (the
/// conversation's owner) notifies a device that subscribed through another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_notifies_a_subscription_made_through_another() {
    let mut service = PushService::start().await;
    let pg = TestPostgres::start().await.unwrap();
    let cluster =
        TestCluster::start_with(2, 2, &Storage::Postgres(pg.url().into()), 8, 3_000, &service.toml()).await.unwrap();
    let key = cluster.client(0).push_key().await.unwrap().vapid_public_key;
    assert_eq!(cluster.client(1).push_key().await.unwrap().vapid_public_key, key, "one key for the cluster");

    let alice = register(&cluster.client(0), "alice").await;
    let bob = register(&cluster.client(0), "bob").await;
    let direct = ConversationId::direct(alice.user_id, bob.user_id);
    let map = cluster.shard_map(0).await.unwrap();
    let owner = cluster.owner_index(&map, shard_for(direct, cluster.shard_count).0).expect("an owner");
    let other = 1 - owner;

    // Bob subscribes through the node that does not own the chat; alice writes on that node too.
    let b1 = Device::new(&service, "/b1");
    cluster.client(other).push_subscribe(&bob.token, &b1.subscription()).await.unwrap();
    let mut a = online(&cluster.client(other), &alice).await;
    let (message_id, _) = acked(a.send_message(bob.user_id, "across the cluster", "x1").await.unwrap());
    let n = b1.open(&service.next().await, &key, &service.origin);
    assert_eq!((n.message_id, n.preview.as_deref()), (message_id, Some("across the cluster")));
    let (_, owner_view) = cluster.client(owner).raw("GET", "/v1/cluster", None, None).await.unwrap();
    assert_eq!(owner_view["push"]["sent"].as_u64(), Some(1), "sent by the owner: {}", owner_view["push"]);
}
