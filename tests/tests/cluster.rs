//! Cluster behaviour with separate node processes on a real Postgres: cross-node routing, crash
//! takeover, fencing of a frozen owner, rebalancing on join, and robustness to garbage from a peer.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use parley_node::client::{Client, ClientError, Connection};
use parley_protocol::frames::{ClientFrame, ReceiptKind, ServerFrame};
use parley_protocol::http::TokenResponse;
use parley_protocol::shard::shard_for;
use parley_protocol::{ClientMsgId, ConversationId, ErrorCode, UserId};
use parley_storage::StoreConfig;
use parley_tests::cluster::{ShardEntry, TestCluster};
use parley_tests::node::Storage;
use parley_tests::postgres::TestPostgres;

const T: Duration = Duration::from_secs(20);
const SHARDS: u16 = 16;
const LEASE_MS: u64 = 2_000;

async fn register(client: &Client, name: &str) -> TokenResponse {
    let name = format!("{name}{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    client.register(&name, "password-123").await.expect("register")
}

/// Register user pairs until one's direct conversation lives on a shard owned by `owner`.
async fn pair_on(
    cluster: &TestCluster,
    map: &[ShardEntry],
    owner: usize,
) -> (TokenResponse, TokenResponse, ConversationId) {
    let http = cluster.client(0);
    for _ in 0..200 {
        let a = register(&http, "a").await;
        let b = register(&http, "b").await;
        let conv = ConversationId::direct(a.user_id, b.user_id);
        if cluster.owner_index(map, shard_for(conv, SHARDS).0) == Some(owner) {
            return (a, b, conv);
        }
    }
    panic!("no pair landed on node {owner}");
}

fn cid(s: &str) -> ClientMsgId {
    ClientMsgId::new(s).unwrap()
}

/// Send with the same client id until acked (as a real client does across failovers), moving to
/// the next node in `nodes` when the connection breaks. Returns (seq, message id).
async fn send_until_acked(
    cluster: &TestCluster,
    nodes: &[usize],
    conn: &mut Option<(usize, Connection)>,
    token: &str,
    to: UserId,
    body: &str,
    id: &str,
) -> (u64, uuid::Uuid) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut next = 0;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{id} never acked");
        if conn.is_none() {
            let i = nodes[next % nodes.len()];
            next += 1;
            match cluster.client(i).connect(token, "dev-1").await {
                Ok(c) => *conn = Some((i, c)),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let (_, c) = conn.as_mut().unwrap();
        match c.send_message(to, body, id).await {
            Ok(ServerFrame::Ack { seq, message_id, .. }) => return (seq, message_id.0),
            Ok(other) => panic!("{other:?}"),
            Err(ClientError::Server { code: ErrorCode::Unavailable, .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(_) => {
                *conn = None;
            }
        }
    }
}

/// Every stored message of `conv` as (client id, seq), via node `via`'s HTTP API.
async fn stored(client: &Client, token: &str, conv: ConversationId) -> Vec<(String, u64)> {
    let page = client.history(token, conv, None, Some(500)).await.expect("history");
    page.messages.into_iter().map(|m| (m.client_msg_id.to_string(), m.seq)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_delivery_with_sender_recipient_and_owner_on_three_nodes() {
    let pg = TestPostgres::start().await.unwrap();
    let cluster = TestCluster::start(3, 3, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    let map = cluster.wait_converged(&[0, 1, 2], T).await.unwrap();
    let (alice, bob, conv) = pair_on(&cluster, &map, 2).await;

    let mut a = cluster.client(0).connect(&alice.token, "a").await.unwrap();
    let mut b = cluster.client(1).connect(&bob.token, "b").await.unwrap();
    b.expect(T, |f| matches!(f, ServerFrame::SyncDone { .. })).await.unwrap();
    for i in 0..5 {
        let ack = a.send_message(bob.user_id, &format!("hop {i}"), &format!("x-{i}")).await.unwrap();
        assert!(matches!(ack, ServerFrame::Ack { seq, .. } if seq == i + 1), "{ack:?}");
    }
    for i in 0..5u64 {
        let f = b.expect(T, |f| matches!(f, ServerFrame::Message { message } if message.seq == i + 1)).await.unwrap();
        let ServerFrame::Message { message } = f else { unreachable!() };
        assert_eq!((message.body, message.sender), (format!("hop {i}"), alice.user_id));
    }
    // Receipts travel back across nodes too.
    b.send(&ClientFrame::Read { conversation_id: conv, seq: 5 }).await.unwrap();
    let r = a.expect(T, |f| matches!(f, ServerFrame::Receipt { kind: ReceiptKind::Read, .. })).await.unwrap();
    assert_eq!(
        r,
        ServerFrame::Receipt { conversation_id: conv, user_id: bob.user_id, kind: ReceiptKind::Read, seq: 5 }
    );
    // Reads from a node that does not own the shard: history and the conversation list.
    assert_eq!(stored(&cluster.client(0), &alice.token, conv).await.len(), 5);
    let list = cluster.client(1).conversations(&bob.token).await.unwrap();
    assert_eq!((list[0].last_seq, list[0].unread), (5, 0));
    // The sender's own device got no echo from the remote fan-out.
    assert!(!a.buffered().any(|f| matches!(f, ServerFrame::Message { .. })));

    // A photo: uploaded to n1, sent through n3 (the owner), delivered on n2 with its description,
    // and fetched from n2 byte for byte (uploads live in the shared store, not on one node).
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    let media =
        cluster.client(0).upload_media(&alice.token, bytes.clone(), "image/jpeg", Some("hop.jpg")).await.unwrap();
    a.send(&ClientFrame::Send {
        client_msg_id: cid("photo"),
        to: Some(bob.user_id),
        conversation_id: None,
        body: String::new(),
        media_id: Some(media.media_id),
    })
    .await
    .unwrap();
    a.expect(T, |f| matches!(f, ServerFrame::Ack { seq: 6, .. })).await.unwrap();
    let f = b.expect(T, |f| matches!(f, ServerFrame::Message { message } if message.seq == 6)).await.unwrap();
    let ServerFrame::Message { message } = f else { unreachable!() };
    assert_eq!(message.media.as_ref(), Some(&media), "the description crossed two hops");
    let (_, fetched) = cluster.client(1).download_media(&bob.token, media.media_id).await.unwrap();
    assert!(fetched == bytes, "n2 serves the upload n1 stored");

    // A group's "read by everyone" position in the conversation list, asked of every node: the
    // two that do not own the group's shard get it from the owner.
    let group = cluster.client(0).create_group(&alice.token, "hops", &[bob.user_id]).await.unwrap().conversation_id;
    let ack = a.send_to_conversation(group, "to the group", "g-1").await.unwrap();
    assert!(matches!(ack, ServerFrame::Ack { seq: 1, .. }), "{ack:?}");
    b.expect(T, |f| matches!(f, ServerFrame::Message { message } if message.conversation_id == group)).await.unwrap();
    b.send(&ClientFrame::Read { conversation_id: group, seq: 1 }).await.unwrap();
    a.expect(T, |f| matches!(f, ServerFrame::Receipt { conversation_id, .. } if *conversation_id == group))
        .await
        .unwrap();
    for i in 0..3 {
        let list = cluster.client(i).conversations(&alice.token).await.unwrap();
        let g = list.iter().find(|c| c.conversation_id == group).expect("the group is listed");
        assert_eq!((g.others_delivered_seq, g.others_read_seq), (1, 1), "through node {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_owner_loses_no_acked_message() {
    let pg = TestPostgres::start().await.unwrap();
    let mut cluster = TestCluster::start(3, 3, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    let map = cluster.wait_converged(&[0, 1, 2], T).await.unwrap();
    let (alice, bob, conv) = pair_on(&cluster, &map, 2).await;
    let shard = shard_for(conv, SHARDS).0;
    let epoch_before = map.iter().find(|s| s.shard == shard).unwrap().epoch;

    let mut conn = None;
    let mut acked = BTreeMap::new();
    for i in 0..20 {
        let id = format!("k-{i}");
        acked.insert(
            id.clone(),
            send_until_acked(&cluster, &[0, 1], &mut conn, &alice.token, bob.user_id, &format!("m{i}"), &id).await,
        );
    }
    cluster.nodes.nodes[2].kill9();
    for i in 20..40 {
        let id = format!("k-{i}");
        acked.insert(
            id.clone(),
            send_until_acked(&cluster, &[0, 1], &mut conn, &alice.token, bob.user_id, &format!("m{i}"), &id).await,
        );
    }
    let map = cluster.wait_converged(&[0, 1], T).await.unwrap();
    let entry = map.iter().find(|s| s.shard == shard).unwrap();
    assert!(entry.epoch > epoch_before, "a new owner took over under a new epoch");

    let rows = stored(&cluster.client(1), &bob.token, conv).await;
    assert_eq!(rows.len(), 40, "exactly the acked messages, once each");
    let seqs: Vec<u64> = rows.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    for (id, seq) in rows {
        assert_eq!(acked[&id].0, seq, "{id} stored at its acked seq");
    }
    // Bob, offline all along, gets all 40 on connect (via any node).
    let mut b = cluster.client(1).connect(&bob.token, "b").await.unwrap();
    match b.expect(T, |f| matches!(f, ServerFrame::SyncDone { .. })).await.unwrap() {
        ServerFrame::SyncDone { messages, .. } => assert_eq!(messages, 40),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_past_its_lease_cannot_write() {
    let pg = TestPostgres::start().await.unwrap();
    let cluster = TestCluster::start(3, 3, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    let map = cluster.wait_converged(&[0, 1, 2], T).await.unwrap();
    let (carol, dave, conv) = pair_on(&cluster, &map, 2).await;
    // Carol talks to the owner itself, so her next send sits in the frozen node's socket.
    let mut c = cluster.client(2).connect(&carol.token, "c").await.unwrap();
    c.send_message(dave.user_id, "before", "f-0").await.unwrap();

    let pid = cluster.nodes.nodes[2].pid().unwrap();
    let _resume = Resume(pid);
    assert!(parley_node::launcher::freeze(pid, T), "the owner did not stop");
    c.send(&ClientFrame::Send {
        client_msg_id: cid("f-1"),
        to: Some(dave.user_id),
        conversation_id: None,
        body: "frozen".into(),
        media_id: None,
    })
    .await
    .unwrap();
    // The others notice, wait out the lease, take the shard.
    let map = cluster.wait_converged(&[0, 1], Duration::from_secs(30)).await.unwrap();
    // Meanwhile the conversation goes on through a live node.
    let mut conn = None;
    send_until_acked(&cluster, &[0, 1], &mut conn, &carol.token, dave.user_id, "after", "f-2").await;
    parley_node::launcher::signal(pid, libc::SIGCONT);

    // The frozen node's send is refused, never acked.
    match c.expect_ack(&cid("f-1"), T).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::Unavailable),
        Err(ClientError::Closed(_)) | Err(ClientError::Transport(_)) => {}
        Ok(ack) => panic!("a frozen owner acked a write after losing its lease: {ack:?}"),
        Err(e) => panic!("{e:?}"),
    }
    let rows = stored(&cluster.client(0), &carol.token, conv).await;
    assert_eq!(rows.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), vec!["f-0", "f-2"]);
    // No row was committed under an epoch older than an earlier row's.
    let stores = parley_storage::open(&StoreConfig::Postgres { url: pg.url().into(), pool_size: 1, commit_slots: 1 })
        .await
        .unwrap();
    let epochs = stores.shard(shard_for(conv, SHARDS)).await.unwrap().epochs(conv).await.unwrap();
    assert!(epochs.windows(2).all(|w| w[0].1 <= w[1].1), "{epochs:?}");
    let owner = map.iter().find(|s| s.shard == shard_for(conv, SHARDS).0).unwrap();
    assert_ne!(owner.owner.as_deref(), Some("n3"));
}

/// SIGCONT on drop, so a failed assertion leaves no stopped process.
struct Resume(u32);
impl Drop for Resume {
    fn drop(&mut self) {
        parley_node::launcher::signal(self.0, libc::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_takes_its_shards_without_loss() {
    let pg = TestPostgres::start().await.unwrap();
    let mut cluster = TestCluster::start(3, 2, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    let http = cluster.client(0);
    let mut pairs = Vec::new();
    for _ in 0..6 {
        pairs.push((register(&http, "s").await, register(&http, "r").await));
    }
    let mut acked: Vec<(ConversationId, String)> = Vec::new();
    let mut conns: Vec<Option<(usize, Connection)>> = (0..pairs.len()).map(|_| None).collect();
    for round in 0..12 {
        if round == 4 {
            cluster.nodes.spawn(2).unwrap();
        }
        for (p, (s, r)) in pairs.iter().enumerate() {
            let id = format!("j-{p}-{round}");
            send_until_acked(&cluster, &[0, 1], &mut conns[p], &s.token, r.user_id, "x", &id).await;
            acked.push((ConversationId::direct(s.user_id, r.user_id), id));
        }
    }
    cluster.nodes.nodes[2].wait_ready(parley_node::launcher::READY_TIMEOUT).await.unwrap();
    let map = cluster.wait_converged(&[0, 1, 2], T).await.unwrap();
    assert!(map.iter().any(|s| s.owner.as_deref() == Some("n3")), "the new node serves shards: {map:?}");
    for (p, (s, r)) in pairs.iter().enumerate() {
        let conv = ConversationId::direct(s.user_id, r.user_id);
        let rows = stored(&cluster.client(2), &s.token, conv).await;
        let ids: HashSet<String> = rows.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(rows.len(), 12, "pair {p}: {rows:?}");
        assert_eq!(ids.len(), 12);
        assert_eq!(rows.iter().map(|(_, s)| *s).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    }
}

/// Register pairs until one's conversation lands on a shard accepted by `want`.
async fn pair_where(http: &Client, want: impl Fn(u16) -> bool) -> (TokenResponse, TokenResponse, ConversationId) {
    for _ in 0..200 {
        let (a, b) = (register(http, "g").await, register(http, "h").await);
        let conv = ConversationId::direct(a.user_id, b.user_id);
        if want(shard_for(conv, SHARDS).0) {
            return (a, b, conv);
        }
    }
    panic!("no pair landed where wanted");
}

/// `[[shard_group]]`: shards 0-7 live in their own Postgres database with a Redis history cache;
/// 8-15 stay in the home database without one. Each conversation's rows and lease are in its
/// group's store only, the cache fills for the group that has one, and a kill -9 of the owner
/// loses nothing and serves correct pages from the new owner (new epoch, fresh cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_groups_keep_their_rows_leases_and_cache_apart() {
    let home = TestPostgres::start().await.unwrap();
    let east = TestPostgres::start().await.unwrap();
    let redis = parley_tests::redis::TestRedis::start().await.unwrap();
    let extra = format!(
        "[[shard_group]]\nname = \"east\"\nshards = [0, 7]\nstorage = {{ kind = \"postgres\", pool_size = 4, postgres_url = \"{}\" }}\nredis_url = \"{}\"\n",
        east.url(),
        redis.url()
    );
    let mut cluster =
        TestCluster::start_with(3, 3, &Storage::Postgres(home.url().into()), SHARDS, LEASE_MS, &extra).await.unwrap();
    let http = cluster.client(0);
    let (ea, eb, east_conv) = pair_where(&http, |s| s <= 7).await;
    let (ha, hb, home_conv) = pair_where(&http, |s| s >= 8).await;
    let mut conn = None;
    for i in 0..3 {
        send_until_acked(&cluster, &[0, 1, 2], &mut conn, &ea.token, eb.user_id, "e", &format!("e-{i}")).await;
    }
    let mut conn = None;
    for i in 0..3 {
        send_until_acked(&cluster, &[0, 1, 2], &mut conn, &ha.token, hb.user_id, "h", &format!("h-{i}")).await;
    }
    // Two reads each: the first fills the east cache, the second is served from it.
    for _ in 0..2 {
        assert_eq!(stored(&cluster.client(1), &eb.token, east_conv).await.len(), 3);
        assert_eq!(stored(&cluster.client(1), &hb.token, home_conv).await.len(), 3);
    }

    let pg_store = |url: &str| StoreConfig::Postgres { url: url.into(), pool_size: 1, commit_slots: 1 };
    let home_db = parley_storage::open(&pg_store(home.url())).await.unwrap();
    let east_db = parley_storage::open(&pg_store(east.url())).await.unwrap();
    let (east_shard, home_shard) = (shard_for(east_conv, SHARDS), shard_for(home_conv, SHARDS));
    let count = |stores: &parley_storage::Stores, shard, conv| {
        let stores = stores.clone();
        async move { stores.shard(shard).await.unwrap().history(conv, None, 100).await.unwrap().0.len() }
    };
    assert_eq!(count(&east_db, east_shard, east_conv).await, 3, "east rows in the east database");
    assert_eq!(count(&home_db, east_shard, east_conv).await, 0, "and not in the home database");
    assert_eq!(count(&home_db, home_shard, home_conv).await, 3, "home rows in the home database");
    assert_eq!(count(&east_db, home_shard, home_conv).await, 0, "and not in the east database");
    let lease = |stores: &parley_storage::Stores, shard| {
        let stores = stores.clone();
        async move { stores.shard(shard).await.unwrap().lease_info().await.unwrap() }
    };
    assert!(lease(&east_db, east_shard).await.owner.is_some(), "the east shard's lease is in its store");
    assert_eq!(lease(&home_db, east_shard).await.epoch.0, 0, "the home store never leased an east shard");
    // Users and tokens live in the home store only.
    assert!(home_db.directory.user_by_name(&ea.username).await.unwrap().is_some());
    assert!(east_db.directory.user_by_name(&ea.username).await.unwrap().is_none());

    let mut r = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("parley:h:*").query_async(&mut r).await.unwrap();
    assert!(keys.iter().any(|k| k.contains(&east_conv.0.to_string())), "the east page was cached: {keys:?}");
    assert!(!keys.iter().any(|k| k.contains(&home_conv.0.to_string())), "home has no cache: {keys:?}");

    // The owner of the east shard dies; the survivors take over and pages stay exact.
    let map = cluster.wait_converged(&[0, 1, 2], T).await.unwrap();
    let owner = cluster.owner_index(&map, east_shard.0).unwrap();
    let (_, body) = cluster.client(0).raw("GET", "/v1/cluster", None, None).await.unwrap();
    assert_eq!(body["shards"][east_shard.0 as usize]["group"], "east");
    cluster.nodes.nodes[owner].kill9();
    let live: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let mut conn = None;
    send_until_acked(&cluster, &live, &mut conn, &ea.token, eb.user_id, "e", "e-3").await;
    let rows = stored(&cluster.client(live[0]), &eb.token, east_conv).await;
    assert_eq!(
        rows.iter().map(|(id, seq)| (id.as_str(), *seq)).collect::<Vec<_>>(),
        vec![("e-0", 1), ("e-1", 2), ("e-2", 3), ("e-3", 4)]
    );
    assert_eq!(count(&east_db, east_shard, east_conv).await, 4);
}

/// A node no config lists joins through a seed: it learns the other members by gossip, they learn
/// it, every pair connects, and it serves shards that the others route to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_missing_from_the_config_joins_through_a_seed() {
    let pg = TestPostgres::start().await.unwrap();
    let mut cluster = TestCluster::start(2, 2, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    // Seeded with n1 only; n2 (whose name sorts before "n9") must learn of it by gossip and dial it.
    let seed = cluster.config.nodes[0].cluster.to_string();
    let joiner = cluster.nodes.add_joiner(
        "n9",
        format!("127.0.0.1:{}", parley_tests::free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", parley_tests::free_port()).parse().unwrap(),
        &[seed],
    );
    cluster.nodes.spawn(joiner).unwrap();
    cluster.nodes.nodes[joiner].wait_ready(parley_node::launcher::READY_TIMEOUT).await.unwrap();
    let map = cluster.wait_converged(&[0, 1, joiner], T).await.unwrap();
    assert!(map.iter().any(|s| s.owner.as_deref() == Some("n9")), "the joiner serves shards: {map:?}");
    for via in [0, 1] {
        let (_, body) = cluster.client(via).raw("GET", "/v1/cluster", None, None).await.unwrap();
        let n9 = body["members"].as_array().unwrap().iter().find(|m| m["node"] == "n9").cloned();
        assert_eq!(
            n9.map(|m| m["alive"].clone()),
            Some(serde_json::json!(true)),
            "{} sees n9 alive",
            cluster.name(via)
        );
    }
    // Sender on n1, recipient on n2, the conversation's shard on n9: both links to n9 carry it.
    let (alice, bob, _) = pair_on(&cluster, &map, joiner).await;
    let mut b = cluster.client(1).connect(&bob.token, "b").await.unwrap();
    b.expect(T, |f| matches!(f, ServerFrame::SyncDone { .. })).await.unwrap();
    // A client retries `unavailable` with the same id (a route may settle just after the maps).
    let mut a = None;
    send_until_acked(&cluster, &[0], &mut a, &alice.token, bob.user_id, "via the joiner", "s-1").await;
    expect_body(&mut b, "via the joiner").await;
}

async fn expect_body(conn: &mut Connection, body: &str) {
    match conn.expect(T, |f| matches!(f, ServerFrame::Message { message } if message.body == body)).await {
        Ok(_) => {}
        other => panic!("expected {body:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payloads_from_a_peer_crash_nobody() {
    use parley_node::actors::gateway::{GatewayMsg, GATEWAY_GROUP};
    use ractor::Actor;

    let pg = TestPostgres::start().await.unwrap();
    let mut cluster = TestCluster::start(3, 3, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    // Join the cluster from this process, as a peer with the right cookie but bad manners.
    let cookie = cluster.nodes.env_value("PARLEY_COOKIE").unwrap();
    let port = parley_tests::free_port();
    let server = ractor_cluster::NodeServer::new(
        port,
        cookie,
        "intruder".into(),
        "127.0.0.1".into(),
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr("127.0.0.1".parse().unwrap());
    let (ns, _) = Actor::spawn(None, server, ()).await.unwrap();
    for n in &cluster.config.nodes {
        ractor_cluster::client_connect(&ns, n.cluster).await.unwrap();
    }
    let gateways = loop {
        let remote: Vec<_> = ractor::pg::get_members(&GATEWAY_GROUP.to_string())
            .into_iter()
            .filter(|c| !c.get_id().is_local())
            .collect();
        if remote.len() == 3 {
            break remote;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xde, 0xad, 0xbe, 0xef],
        vec![0, 1, 255, 255, 255, 255, 255, 255, 255, 255, 255],
        vec![0, 9, 1, 2, 3],
        (0..=255u8).collect(),
    ];
    for cell in &gateways {
        let gw: ractor::ActorRef<GatewayMsg> = cell.clone().into();
        for g in &garbage {
            gw.cast(GatewayMsg::Frame(g.clone())).unwrap();
            let (tx, _rx) = ractor::concurrency::oneshot();
            gw.cast(GatewayMsg::Call(g.clone(), tx.into())).unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Everyone is alive, serving, and still delivering across nodes.
    for node in &mut cluster.nodes.nodes {
        assert!(node.is_running(), "{} died", node.name);
    }
    let map = cluster.wait_converged(&[0, 1, 2], T).await.unwrap();
    let (alice, bob, _) = pair_on(&cluster, &map, 2).await;
    let mut b = cluster.client(1).connect(&bob.token, "b").await.unwrap();
    let mut a = cluster.client(0).connect(&alice.token, "a").await.unwrap();
    a.send_message(bob.user_id, "still here", "g-1").await.unwrap();
    b.expect(T, |f| matches!(f, ServerFrame::Message { message } if message.body == "still here")).await.unwrap();
    for i in 0..3 {
        assert!(cluster.log(i).contains("undecodable"), "node {i} logged the bad frames");
    }
    ns.stop(None);
}

/// How many users node `via` believes online on `peer` (`/v1/cluster` → `presence.peers`).
async fn online_on(cluster: &TestCluster, via: usize, peer: &str) -> Option<u64> {
    let (_, body) = cluster.client(via).raw("GET", "/v1/cluster", None, None).await.ok()?;
    body["presence"]["peers"][peer].as_u64()
}

/// Presence across processes: a user online on one node is online to watchers on the others —
/// also on a node that joins later (it is sent the lists when it becomes a peer) — and when
/// their node is killed they are offline everywhere at once, with a last-seen time the
/// survivors recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_crosses_nodes_and_a_killed_node_takes_its_users_offline() {
    let pg = TestPostgres::start().await.unwrap();
    let mut cluster = TestCluster::start(3, 2, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    let http = cluster.client(0);
    let (alice, bob, carol) =
        (register(&http, "alice").await, register(&http, "bob").await, register(&http, "carol").await);

    let mut a = cluster.client(0).connect(&alice.token, "a").await.unwrap();
    a.send(&ClientFrame::Presence { user_ids: vec![bob.user_id] }).await.unwrap();
    assert_eq!(a.expect_presence(bob.user_id, T).await.unwrap(), (false, None));
    let b = cluster.client(1).connect(&bob.token, "b").await.unwrap();
    assert_eq!(a.expect_presence(bob.user_id, T).await.unwrap(), (true, None), "bob came online on n2");

    // n3 joins while bob is online on n2: it learns n2's list (and n1's) from them.
    cluster.nodes.spawn(2).unwrap();
    cluster.nodes.nodes[2].wait_ready(parley_node::launcher::READY_TIMEOUT).await.unwrap();
    cluster.wait_converged(&[0, 1, 2], T).await.unwrap();
    let learned = parley_tests::wait_until(T, || async {
        online_on(&cluster, 2, "n2").await == Some(1) && online_on(&cluster, 2, "n1").await == Some(1)
    })
    .await;
    assert!(learned, "n3 learns who is online on n2 and n1");
    let mut c = cluster.client(2).connect(&carol.token, "c").await.unwrap();
    c.send(&ClientFrame::Presence { user_ids: vec![bob.user_id, alice.user_id] }).await.unwrap();
    assert_eq!(c.expect_presence(bob.user_id, T).await.unwrap(), (true, None), "bob, online on n2, seen from n3");
    assert_eq!(c.expect_presence(alice.user_id, T).await.unwrap(), (true, None), "alice, online on n1, seen from n3");

    // kill -9 of bob's node: both other nodes report him offline, at about the kill.
    let before = parley_storage::now_ms();
    cluster.nodes.nodes[1].kill9();
    drop(b);
    let (online_a, seen_a) = a.expect_presence(bob.user_id, T).await.unwrap();
    let (online_c, seen_c) = c.expect_presence(bob.user_id, T).await.unwrap();
    let after = parley_storage::now_ms();
    assert!(!online_a && !online_c, "bob is offline once his node is gone");
    for seen in [seen_a, seen_c] {
        let seen = seen.expect("a last-seen time");
        assert!((before..=after).contains(&seen), "last seen {seen} within [{before}, {after}]");
    }

    // The survivors recorded it: a new session on a restarted n1 (nothing in memory) reads it.
    cluster.nodes.nodes[0].kill9();
    cluster.nodes.spawn(0).unwrap();
    cluster.nodes.nodes[0].wait_ready(parley_node::launcher::READY_TIMEOUT).await.unwrap();
    let mut a2 = cluster.client(0).connect(&alice.token, "a2").await.unwrap();
    a2.send(&ClientFrame::Presence { user_ids: vec![bob.user_id] }).await.unwrap();
    let (online, seen) = a2.expect_presence(bob.user_id, T).await.unwrap();
    assert!(!online);
    let seen = seen.expect("recorded by a survivor");
    let (seen_a, seen_c) = (seen_a.unwrap(), seen_c.unwrap());
    assert!(
        (seen_a.min(seen_c)..=seen_a.max(seen_c)).contains(&seen),
        "a survivor's time {seen} (n1 {seen_a}, n3 {seen_c}; the later one wins if both were written)"
    );
}

/// Presence privacy across processes: alice (on n1) changes who may see her, and watchers on n2
/// see the change at once, filtered by the same rules as on her own node. A change made while n2
/// was frozen (so n1 had dropped it and cast it nothing) reaches n2's watchers once it is back,
/// because n2 reads the rules again when n1 lists its users to it anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_privacy_crosses_nodes_and_a_missed_change_is_read_again() {
    use parley_protocol::privacy::{Audience as L, OnlineAudience as O, PrivacySettings};
    let pg = TestPostgres::start().await.unwrap();
    let cluster = TestCluster::start(2, 2, &Storage::Postgres(pg.url().into()), SHARDS, LEASE_MS).await.unwrap();
    cluster.wait_converged(&[0, 1], T).await.unwrap();
    let (n1, n2) = (cluster.client(0), cluster.client(1));
    let (alice, bob, carol) = (register(&n1, "alice").await, register(&n1, "bob").await, register(&n1, "carol").await);
    let mut b = n2.connect(&bob.token, "b").await.unwrap();
    let mut c = n2.connect(&carol.token, "c").await.unwrap();
    for conn in [&mut b, &mut c] {
        conn.send(&ClientFrame::Presence { user_ids: vec![alice.user_id] }).await.unwrap();
        assert_eq!(conn.expect_presence(alice.user_id, T).await.unwrap(), (false, None));
    }
    let _a = n1.connect(&alice.token, "a").await.unwrap();
    for conn in [&mut b, &mut c] {
        assert_eq!(conn.expect_presence(alice.user_id, T).await.unwrap(), (true, None), "online, seen from n2");
    }

    let hidden = PrivacySettings { last_seen: L::Contacts, online: O::SameAsLastSeen, ..PrivacySettings::default() };
    n1.set_privacy(&alice.token, hidden).await.unwrap();
    for conn in [&mut b, &mut c] {
        assert_eq!(conn.expect_presence(alice.user_id, T).await.unwrap(), (false, None), "hidden on n2 at once");
    }
    n1.set_contact(&alice.token, bob.user_id, true).await.unwrap();
    assert_eq!(b.expect_presence(alice.user_id, T).await.unwrap(), (true, None), "bob, now a contact, on n2");

    // n2 stops until n1 drops it; alice shows herself to everyone meanwhile (n1 casts n2 nothing).
    let pid = cluster.nodes.nodes[1].pid().unwrap();
    let resume = Resume(pid);
    assert!(parley_node::launcher::freeze(pid, T), "n2 did not stop");
    let dropped =
        parley_tests::wait_until(Duration::from_secs(30), || async { online_on(&cluster, 0, "n2").await.is_none() })
            .await;
    assert!(dropped, "n1 dropped the frozen n2");
    n1.set_privacy(&alice.token, PrivacySettings::default()).await.unwrap();
    drop(resume);
    // Carol may first see alice go and come back (n2 may drop n1 too as it wakes), but she must
    // end up seeing her online: without reading the rules again, n2 hides alice from her forever.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.expect_presence(alice.user_id, left).await {
            Ok((true, None)) => break,
            Ok(_) => continue,
            Err(e) => panic!("carol on n2 never saw alice online after the change n2 missed: {e:?}"),
        }
    }
}

/// A node that listens on 0.0.0.0 (or behind a published port) tells browsers and peers where to
/// reach it (`advertise_http`), not where it is bound; without it, its bound address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lists_the_http_address_it_advertises() {
    let dir = parley_tests::TempDir::new("parley-advertise");
    let mut options = parley_tests::node::NodeOptions::new("n1", Storage::Embedded(dir.path().join("data")));
    options.advertise_http = Some("chat.example.test:8443".into());
    let node = parley_tests::node::NodeProcess::start(options.clone()).await.unwrap();
    let members = |client: Client| async move {
        let (_, view) = client.raw("GET", "/v1/cluster", None, None).await.unwrap();
        view["members"].as_array().unwrap().iter().map(|m| m["http"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(members(node.client()).await, ["chat.example.test:8443"]);
    let plain = parley_tests::node::NodeProcess::start(parley_tests::node::NodeOptions::new(
        "n1",
        Storage::Embedded(dir.path().join("data2")),
    ))
    .await
    .unwrap();
    assert_eq!(members(plain.client()).await, [plain.http.to_string()], "the bound address by default");
}
