//! The Postgres store's hot paths never scan a growing table, whatever the planner statistics say.
//!
//! Our statements are prepared, and Postgres runs a prepared statement with a generic plan made at
//! its first executions and kept until the next ANALYZE. On a fresh database those plans are made
//! over empty tables, where a join is cheapest as a hash join over a sequential scan — a plan
//! that then reads the whole `messages` table on every commit as it grows (seen in the benchmark:
//! 176 M rows read in 25 s). This check forces generic plans (`plan_cache_mode =
//! force_generic_plan`) on an empty database, drives every hot path of the directory and a shard
//! through the storage crate, and then asks Postgres's own statistics how often each table was
//! sequentially scanned: it must be never, except for the two tables that are small by
//! construction (`shard_leases`: one row per shard; `parley_migrations`).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use parley_protocol::cluster::SyncRequest;
use parley_protocol::frames::{ConversationKind, ReceiptKind};
use parley_protocol::media::MediaRef;
use parley_protocol::{ClientMsgId, ConversationId, DeviceId, MediaId, MessageId, ShardId, UserId};
use parley_storage::{
    now_ms, sha256_hex, token_hash, CursorUpdate, MediaDeletion, MediaRecord, NewMessage, PushSubscriptionRecord,
    StoreConfig, UserRecord, WriteBatch,
};
use parley_tests::postgres::TestPostgres;

/// Tables that stay small however much traffic there is: a scan of them is not a defect.
const SMALL_TABLES: &[&str] = &["shard_leases", "parley_migrations"];

/// How long Postgres may take to publish the statistics of the store's closed connections.
const STATS_TIMEOUT: Duration = Duration::from_secs(20);

fn user(name: &str) -> UserRecord {
    parley_tests::user_record(name)
}

fn message(conversation: ConversationId, sender: UserId, id: &str) -> NewMessage {
    NewMessage {
        message_id: MessageId::new(),
        conversation_id: conversation,
        sender,
        client_msg_id: ClientMsgId::new(id).expect("valid client id"),
        body: format!("body of {id}"),
        sent_at_ms: now_ms(),
        media: None,
    }
}

#[tokio::test]
async fn hot_paths_probe_indexes_even_with_plans_made_on_empty_tables() -> Result<()> {
    let pg = TestPostgres::start().await?;
    let admin = pg.connect().await?;
    let database: String = admin.query_one("SELECT current_database()", &[]).await?.get(0);
    admin.batch_execute(&format!("ALTER DATABASE \"{database}\" SET plan_cache_mode = force_generic_plan")).await?;

    // Migrations build tables and indexes (scans of empty tables): count from after them.
    let config = StoreConfig::Postgres { url: pg.url().to_string(), pool_size: 2, commit_slots: 1 };
    drop(parley_storage::open(&config).await?);
    let before = scans(&admin, 0).await?;
    let stores = parley_storage::open(&config).await?;
    let directory = stores.directory.clone();
    let (alice, bob) = (user("alice"), user("bob"));
    let conversation = ConversationId::direct(alice.id, bob.id);
    let device = DeviceId::new("web").expect("valid device id");

    // Twice: the first round plans every statement over empty tables, the second runs those plans
    // over rows (a generic plan is the same either way; both rounds are counted).
    for round in 0..2 {
        if round == 0 {
            directory.create_user(&alice).await?;
            directory.create_user(&bob).await?;
        }
        ensure!(directory.user_by_name("alice").await?.is_some(), "alice exists");
        ensure!(directory.users_by_id(&[alice.id, bob.id, UserId::random()]).await?.len() == 2, "two users");
        // Presence: every watch reads last-seen times, privacy settings and the watcher's place on
        // each contact list; every user going offline records one; users change their settings
        // and contacts.
        directory.record_last_seen(&[(alice.id, now_ms()), (bob.id, now_ms())]).await?;
        let watched = directory.presence_view(bob.id, &[alice.id, bob.id, UserId::random()]).await?;
        ensure!(watched.len() == 2, "two presence rows");
        ensure!(directory.set_privacy(alice.id, Default::default()).await?.is_some(), "settings stored");
        ensure!(directory.privacy(alice.id).await?.is_some(), "settings read");
        directory.set_contact(alice.id, bob.id, round == 0, 10).await?;
        ensure!(directory.contacts(alice.id).await?.len() == usize::from(round == 0), "alice's contacts");
        let token = format!("token-{round}");
        directory.insert_token(&token_hash(&token), alice.id, now_ms() + 60_000).await?;
        ensure!(directory.token_user(&token_hash(&token), now_ms()).await?.is_some(), "token grants");
        // Push: every message to an offline user reads their subscriptions; browsers register
        // and unregister; push services report gone ones; every node reads the VAPID key at start.
        let subscription = PushSubscriptionRecord {
            endpoint: format!("https://push.example/{round}"),
            user: alice.id,
            token_hash: token_hash(&token),
            p256dh: "key".into(),
            auth: "auth".into(),
            created_at_ms: now_ms(),
        };
        directory.put_push_subscription(&subscription, 16).await?;
        directory
            .put_push_subscription(
                &PushSubscriptionRecord { endpoint: "https://push.example/x".into(), ..subscription },
                1,
            )
            .await?;
        ensure!(directory.push_subscriptions(alice.id, now_ms()).await?.len() == 1, "the newest subscription");
        directory.delete_push_subscription("https://push.example/x", Some(alice.id)).await?;
        directory.delete_push_subscription("https://push.example/gone", None).await?;
        directory.setting_or_init("push.vapid_private_key", "k").await?;
        directory.add_conversation(conversation, ConversationKind::Direct, &[alice.id, bob.id], now_ms()).await?;
        ensure!(directory.user_conversations(alice.id).await?.len() == 1, "alice's conversation");
        // Muting: every notification to an offline user reads their mutes.
        directory.set_muted(alice.id, conversation, Some(now_ms() + 60_000)).await?;
        ensure!(directory.muted(alice.id, now_ms()).await?.len() == 1, "one muted conversation");
        ensure!(directory.conversation(conversation).await?.is_some(), "conversation record");
        // Media: every upload sums its owner's uploads (the quota), and `GET /v1/media` also
        // lists them by pages; a send reads the description and a download the bytes by id; the
        // uploader deletes.
        let bytes = vec![round as u8; 10];
        let media = MediaRef {
            media_id: MediaId(uuid::Uuid::new_v4()),
            mime: "image/png".into(),
            size: bytes.len() as u64,
            name: None,
            sha256: sha256_hex(&bytes),
        };
        let record = MediaRecord { media, owner: alice.id, created_at_ms: now_ms() };
        directory.put_media(&record, &bytes, None, 1 << 30).await?;
        ensure!(directory.media_totals(alice.id).await?.uploads == 1, "alice's upload");
        let listed = directory.media_list(alice.id, None, 10).await?;
        ensure!(listed.len() == 1, "alice's list");
        directory.media_list(alice.id, Some((listed[0].created_at_ms, listed[0].media.media_id)), 10).await?;
        ensure!(directory.media(record.media.media_id).await?.is_some(), "its description");
        ensure!(directory.media_bytes(record.media.media_id).await?.is_some(), "its bytes");
        let deleted = directory.delete_media(record.media.media_id, alice.id).await?;
        ensure!(deleted == MediaDeletion::Deleted, "deleted by its uploader");
        ensure!(directory.delete_media(record.media.media_id, bob.id).await? == MediaDeletion::Unknown, "gone");

        let store = stores.shard(ShardId(3)).await?;
        let epoch = match round {
            0 => store.acquire_lease("node-a", 60_000).await?.context("fresh lease")?.epoch,
            _ => store.lease_info().await?.epoch,
        };
        let sends: Vec<NewMessage> =
            (0..50).map(|i| message(conversation, alice.id, &format!("r{round}-{i}"))).collect();
        let mut batch = WriteBatch { messages: sends.clone(), cursors: vec![] };
        batch.cursors.push(CursorUpdate {
            conversation_id: conversation,
            user: bob.id,
            device: Some(device.clone()),
            kind: ReceiptKind::Read,
            seq: 10,
        });
        store.commit(epoch, &batch).await?;
        // A retry of the same batch: the dedupe lookup finds every key.
        let again = store.commit(epoch, &WriteBatch { messages: sends, cursors: vec![] }).await?;
        ensure!(again.messages.len() == 50, "one result per retried message");
        let (page, _) = store.history(conversation, None, 20).await?;
        ensure!(page.len() == 20, "a full page");
        store.history(conversation, Some(page[0].seq), 20).await?;
        let sync = SyncRequest {
            user: bob.id,
            device: device.clone(),
            conversations: vec![conversation],
            per_conversation_limit: 100,
        };
        store.sync(&sync).await?;
        ensure!(store.summaries(bob.id, &[conversation]).await?.len() == 1, "one summary");
        store.member_cursor(conversation, bob.id).await?;
        // A group's floor in the conversation list: one cursor probe per (group, member).
        let floors = store.group_floors(&[(conversation, vec![alice.id, bob.id])]).await?;
        ensure!(floors.len() == 1, "one group floor");
    }
    drop(directory);
    drop(stores);

    let after = scans(&admin, 100).await?;
    let scanned: Vec<(String, i64)> = after
        .into_iter()
        .map(|(table, n)| {
            let earlier = before.iter().find(|(t, _)| *t == table).map_or(0, |(_, n)| *n);
            (table, n - earlier)
        })
        .filter(|(table, n)| *n > 0 && !SMALL_TABLES.contains(&table.as_str()))
        .collect();
    assert!(scanned.is_empty(), "sequential scans of growing tables (table, scans): {scanned:?}");
    Ok(())
}

/// Sequential scans per table, once every other connection to the database is gone and the rows
/// inserted into `messages` number `inserted` (a backend publishes its statistics when it exits).
async fn scans(admin: &tokio_postgres::Client, inserted: i64) -> Result<Vec<(String, i64)>> {
    let settled = parley_tests::wait_until(STATS_TIMEOUT, || async {
        let others: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        let rows: i64 = admin
            .query_one("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'messages'", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        others == 0 && rows == inserted
    })
    .await;
    ensure!(settled, "Postgres did not publish the store's statistics in {STATS_TIMEOUT:?}");
    Ok(admin
        .query("SELECT relname::text, seq_scan FROM pg_stat_user_tables ORDER BY relname", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
