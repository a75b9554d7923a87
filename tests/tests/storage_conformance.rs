//! Storage conformance: one suite, both backends.
//!
//! Every check below is written once against the `Directory` / `ShardStore` traits and run twice by
//! the `conformance!` macro: `embedded::<check>` (SQLite in a temp dir) and `postgres::<check>` (a
//! fresh database from [`TestPostgres`]). A behaviour the node relies on belongs here, so that the
//! two backends cannot drift apart. Run one half with a filter, e.g.
//! `cargo nextest run -p parley-tests --test storage_conformance postgres::`.
//!
//! Checks that need two nodes open the same storage twice ([`Fixture::reopen`]): each open is what
//! one node process would hold, with its own session locks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use parley_protocol::cluster::{StoredAck, SyncRequest};
use parley_protocol::frames::{ConversationKind, MessageView, ReceiptKind};
use parley_protocol::http::UserView;
use parley_protocol::media::MediaRef;
use parley_protocol::{ClientMsgId, ConversationId, DeviceId, Epoch, MediaId, MessageId, Seq, ShardId, UserId};
use parley_storage::{
    now_ms, token_hash, Committed, ConversationRecord, CursorUpdate, LeaseGrant, MediaDeletion, MediaRecord,
    MediaTotals, MessageResult, NewMessage, PresenceRecord, PushSubscriptionRecord, ShardStore, StorageError,
    StoreConfig, Stores, Thumbnail, TokenGrant, UserRecord, WriteBatch,
};
use parley_tests::postgres::TestPostgres;
use uuid::Uuid;

/// Lease TTL for checks that must not see a lease expire while they run.
const LONG_TTL_MS: u64 = 60_000;

/// A quota no upload of these checks reaches.
const NO_QUOTA: u64 = u64::MAX;

/// How long the crash check waits for the session lock of a dropped node to be released.
const LOCK_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Storage for one check, and what it takes to tear it down.
struct Fixture {
    config: StoreConfig,
    stores: Stores,
    backing: Backing,
}

enum Backing {
    /// The SQLite directory, removed on drop.
    Embedded(PathBuf),
    Postgres(TestPostgres),
}

impl Fixture {
    async fn embedded() -> Result<Fixture> {
        let dir = std::env::temp_dir().join(format!("parley-conformance-{}", Uuid::new_v4().simple()));
        let config = StoreConfig::Embedded { dir: dir.clone() };
        let backing = Backing::Embedded(dir);
        let stores = parley_storage::open(&config).await.context("open embedded store")?;
        Ok(Fixture { config, stores, backing })
    }

    async fn postgres() -> Result<Fixture> {
        let pg = TestPostgres::start().await.context("start test postgres")?;
        let config = StoreConfig::Postgres { url: pg.url().to_string(), pool_size: 4, commit_slots: 1 };
        let stores = parley_storage::open(&config).await.context("open postgres store")?;
        Ok(Fixture { config, stores, backing: Backing::Postgres(pg) })
    }

    /// The same storage opened again, as a second node process would.
    async fn reopen(&self) -> Result<Stores> {
        Ok(parley_storage::open(&self.config).await?)
    }

    /// The Postgres behind this fixture, for checks that look at rows directly.
    fn postgres_db(&self) -> Option<&TestPostgres> {
        match &self.backing {
            Backing::Postgres(pg) => Some(pg),
            Backing::Embedded(_) => None,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Backing::Embedded(dir) = &self.backing {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs each named check against both backends.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $check() -> anyhow::Result<()> {
                    let fixture = super::Fixture::embedded().await?;
                    super::$check(&fixture).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $check() -> anyhow::Result<()> {
                    let fixture = super::Fixture::postgres().await?;
                    super::$check(&fixture).await
                }
            )*
        }
    };
}

conformance!(
    users_and_usernames,
    users_by_id_returns_only_existing,
    last_seen_only_moves_forward_and_survives_a_reopen,
    privacy_and_contacts_are_versioned_per_user,
    tokens_expire_and_can_be_deleted,
    conversations_are_idempotent,
    groups_change_only_from_the_version_read,
    lease_lifecycle,
    expired_lease_is_taken_over,
    dead_owner_is_replaced_through_the_session_lock,
    commit_assigns_gapless_seqs_in_batch_order,
    retry_in_later_commit_returns_the_original,
    repeat_within_a_batch_is_a_duplicate_of_the_first,
    client_id_is_scoped_to_its_conversation,
    stale_epoch_commit_stores_nothing,
    concurrent_commits_of_many_shards_are_fenced_each_on_its_own,
    history_pages_backwards,
    sync_follows_each_device_cursor,
    summaries_count_unread_from_others,
    cursors_never_move_backwards,
    group_floors_are_the_lowest_cursor_of_the_members_listed,
    media_is_stored_whole_and_messages_carry_its_description,
    media_quota_holds_across_nodes_and_deleting_frees_room,
    push_subscriptions_follow_their_token_and_keep_the_newest,
    settings_keep_the_first_value,
    mutes_belong_to_members_and_expire,
);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn user(name: &str) -> UserRecord {
    parley_tests::user_record(name)
}

fn cid(s: &str) -> ClientMsgId {
    ClientMsgId::new(s).expect("valid client id")
}

fn device(s: &str) -> DeviceId {
    DeviceId::new(s).expect("valid device id")
}

fn new_conversation() -> ConversationId {
    ConversationId(Uuid::new_v4())
}

fn msg(conversation: ConversationId, sender: UserId, client_id: &str, body: &str) -> NewMessage {
    NewMessage {
        message_id: MessageId::new(),
        conversation_id: conversation,
        sender,
        client_msg_id: cid(client_id),
        body: body.to_string(),
        sent_at_ms: now_ms(),
        media: None,
    }
}

fn cursor(
    conversation: ConversationId,
    user: UserId,
    device_id: Option<&str>,
    kind: ReceiptKind,
    seq: Seq,
) -> CursorUpdate {
    CursorUpdate { conversation_id: conversation, user, device: device_id.map(device), kind, seq }
}

fn messages(messages: Vec<NewMessage>) -> WriteBatch {
    WriteBatch { messages, cursors: vec![] }
}

fn cursors(cursors: Vec<CursorUpdate>) -> WriteBatch {
    WriteBatch { messages: vec![], cursors }
}

/// The ack of a stored message, new or a duplicate. A match rather than [`MessageResult::ack`] so
/// that a refusal variant added to `MessageResult` later fails the check that meets it instead of
/// the build.
#[allow(unreachable_patterns)]
fn ack(result: &MessageResult) -> Result<&StoredAck> {
    match result {
        MessageResult::Stored(ack) | MessageResult::Duplicate { ack, .. } => Ok(ack),
        other => anyhow::bail!("expected a stored message, got {other:?}"),
    }
}

/// The body and media a duplicate's original holds (what the shard pushes again); `None` for a
/// message stored now.
fn original_of(result: &MessageResult) -> Option<(&str, Option<&MediaRef>)> {
    match result {
        MessageResult::Duplicate { original, .. } => Some((original.body.as_str(), original.media.as_ref())),
        _ => None,
    }
}

fn seqs(page: &[MessageView]) -> Vec<Seq> {
    page.iter().map(|m| m.seq).collect()
}

/// A shard store with a freshly acquired lease, ready for commits.
async fn leased(stores: &Stores, shard: u16, owner: &str) -> Result<(Arc<dyn ShardStore>, Epoch)> {
    let store = stores.shard(ShardId(shard)).await?;
    let grant = store.acquire_lease(owner, LONG_TTL_MS).await?.context("fresh shard lease")?;
    Ok((store, grant.epoch))
}

/// Commit `count` messages from `sender` to `conversation`, one batch, bodies `"{prefix}{i}"`.
async fn fill(
    store: &dyn ShardStore,
    epoch: Epoch,
    conversation: ConversationId,
    sender: UserId,
    prefix: &str,
    count: usize,
) -> Result<()> {
    let batch =
        (1..=count).map(|i| msg(conversation, sender, &format!("{prefix}-{i}"), &format!("{prefix}{i}"))).collect();
    let results = store.commit(epoch, &messages(batch)).await?.messages;
    ensure!(results.len() == count, "one result per message");
    Ok(())
}

fn assert_stale(result: Result<impl std::fmt::Debug, StorageError>, held: u64, current: u64) {
    match result {
        Err(StorageError::StaleEpoch { held: h, current: c, .. }) => {
            assert_eq!((h, c), (held, current), "StaleEpoch held/current");
        }
        other => {
            panic!("expected StaleEpoch {{ held: {held}, current: {current} }}, got {other:?}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Directory
// ---------------------------------------------------------------------------------------------

async fn users_and_usernames(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let bob = user("bob");
    let alice = user("alice");
    d.create_user(&bob).await?;
    d.create_user(&alice).await?;
    assert_eq!(d.user_by_name("alice").await?, Some(alice.clone()));
    assert_eq!(d.user_by_name("carol").await?, None);

    let impostor = UserRecord { id: UserId::random(), ..alice.clone() };
    let taken = d.create_user(&impostor).await;
    assert!(matches!(taken, Err(StorageError::UsernameTaken)), "{taken:?}");
    assert_eq!(d.user_by_name("alice").await?.map(|u| u.id), Some(alice.id), "first one kept");

    let view = |u: &UserRecord| UserView { id: u.id, username: u.username.clone() };
    assert_eq!(d.list_users(10).await?, vec![view(&alice), view(&bob)], "ordered by username");
    assert_eq!(d.list_users(1).await?, vec![view(&alice)], "limit honoured");
    Ok(())
}

async fn users_by_id_returns_only_existing(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let alice = user("alice");
    let bob = user("bob");
    d.create_user(&alice).await?;
    d.create_user(&bob).await?;
    let mut found = d.users_by_id(&[bob.id, UserId::random(), alice.id]).await?;
    found.sort_by(|a, b| a.username.cmp(&b.username));
    assert_eq!(
        found,
        vec![UserView { id: alice.id, username: "alice".into() }, UserView { id: bob.id, username: "bob".into() },]
    );
    assert_eq!(d.users_by_id(&[UserId::random()]).await?, vec![]);
    assert_eq!(d.users_by_id(&[]).await?, vec![]);
    Ok(())
}

async fn last_seen_only_moves_forward_and_survives_a_reopen(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let (alice, bob, ghost) = (user("alice"), user("bob"), UserId::random());
    d.create_user(&alice).await?;
    d.create_user(&bob).await?;
    let seen = |v: Vec<PresenceRecord>| {
        let mut v: Vec<(UserId, Option<i64>)> = v.into_iter().map(|r| (r.user, r.last_seen_ms)).collect();
        v.sort();
        v
    };
    // Unknown ids are left out (that is how the node refuses to watch them); duplicates once.
    let mut want = vec![(alice.id, None), (bob.id, None)];
    want.sort();
    assert_eq!(seen(d.presence_view(bob.id, &[alice.id, ghost, bob.id, alice.id]).await?), want);
    assert_eq!(d.presence_view(bob.id, &[]).await?, vec![]);
    d.record_last_seen(&[(alice.id, 2_000), (ghost, 9_000)]).await?;
    d.record_last_seen(&[]).await?;
    // An older time (a slower writer) does not move it back; a newer one moves it forward.
    d.record_last_seen(&[(alice.id, 1_000), (bob.id, 500)]).await?;
    assert_eq!(seen(d.presence_view(bob.id, &[alice.id]).await?), vec![(alice.id, Some(2_000))]);
    d.record_last_seen(&[(alice.id, 3_000)]).await?;
    let mut want = vec![(alice.id, Some(3_000)), (bob.id, Some(500))];
    want.sort();
    assert_eq!(seen(d.presence_view(bob.id, &[alice.id, bob.id]).await?), want);
    assert_eq!(d.presence_view(bob.id, &[ghost]).await?, vec![], "recording an unknown user creates nothing");
    let reopened = f.reopen().await?;
    assert_eq!(seen(reopened.directory.presence_view(bob.id, &[alice.id, bob.id]).await?), want);
    Ok(())
}

/// Privacy settings and contact lists: new accounts show everything; every change of a user's
/// settings or contacts bumps their rules version by one, from whichever node (open of the store)
/// it comes; a watcher's contact flag is read from the *watched* user's list; a contact list stops
/// at its limit also when additions race through two nodes, and repeats change nothing.
async fn privacy_and_contacts_are_versioned_per_user(f: &Fixture) -> Result<()> {
    use parley_protocol::privacy::{Audience, OnlineAudience, PrivacySettings};
    use parley_storage::ContactChange;
    const MAX: usize = 3;
    let d = f.stores.directory.clone();
    let other = f.reopen().await?.directory;
    let users: Vec<UserRecord> = ["alice", "bob", "carol", "dave", "erin", "frank"].iter().map(|n| user(n)).collect();
    for u in &users {
        d.create_user(u).await?;
    }
    let (alice, bob, carol) = (users[0].id, users[1].id, users[2].id);
    let ghost = UserId::random();
    let defaults = PrivacySettings::default();
    assert_eq!(d.privacy(alice).await?, Some((defaults, 0)), "a new account shows everything");
    assert_eq!(d.privacy(ghost).await?, None);
    assert_eq!(d.set_privacy(ghost, defaults).await?, None, "no account, nothing stored");

    let hidden = PrivacySettings {
        last_seen: Audience::Contacts,
        online: OnlineAudience::SameAsLastSeen,
        groups: Audience::Nobody,
        read_receipts: false,
    };
    assert_eq!(d.set_privacy(alice, hidden).await?, Some(1));
    assert_eq!(other.privacy(alice).await?, Some((hidden, 1)), "another node reads the change");
    // Alice adds bob: bob (watching alice) is her contact; alice (watching bob) is not his.
    assert_eq!(other.set_contact(alice, bob, true, MAX).await?, ContactChange::Changed { version: 2 });
    assert_eq!(d.set_contact(alice, bob, true, MAX).await?, ContactChange::Unchanged, "added twice");
    let view = d.presence_view(bob, &[alice]).await?;
    assert_eq!(
        view,
        vec![PresenceRecord {
            user: alice,
            last_seen_ms: None,
            settings: hidden,
            version: 2,
            watcher_is_contact: true
        }]
    );
    ensure!(!d.presence_view(carol, &[alice]).await?[0].watcher_is_contact, "carol is not on alice's list");
    ensure!(!d.presence_view(alice, &[bob]).await?[0].watcher_is_contact, "bob's list is his own");
    assert_eq!(d.privacy(bob).await?, Some((defaults, 0)), "bob's rules did not change");

    assert_eq!(d.set_contact(alice, ghost, true, MAX).await?, ContactChange::UnknownUser);
    assert_eq!(d.set_contact(ghost, bob, true, MAX).await?, ContactChange::UnknownUser);
    assert_eq!(d.set_contact(alice, carol, false, MAX).await?, ContactChange::Unchanged, "not a contact");

    // Four additions race through two nodes for the two places left: two are stored.
    let mut racing = tokio::task::JoinSet::new();
    for (i, u) in users[2..].iter().enumerate() {
        let store = if i % 2 == 0 { d.clone() } else { other.clone() };
        let contact = u.id;
        racing.spawn(async move { store.set_contact(alice, contact, true, MAX).await });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = racing.join_next().await {
        outcomes.push(joined??);
    }
    let mut versions: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| match o {
            ContactChange::Changed { version } => Some(*version),
            _ => None,
        })
        .collect();
    versions.sort();
    assert_eq!(versions, vec![3, 4], "two additions fit, numbered in order");
    assert_eq!(outcomes.iter().filter(|o| **o == ContactChange::TooMany).count(), 2);
    let listed = other.contacts(alice).await?;
    assert_eq!(listed.len(), MAX);
    ensure!(listed.windows(2).all(|w| w[0].username < w[1].username), "by username: {listed:?}");
    ensure!(listed.iter().any(|u| u.id == bob), "bob stays");

    // Removing frees a place; the version moves on.
    assert_eq!(d.set_contact(alice, bob, false, MAX).await?, ContactChange::Changed { version: 5 });
    ensure!(!other.presence_view(bob, &[alice]).await?[0].watcher_is_contact, "bob was removed");
    assert_eq!(other.set_contact(alice, bob, true, MAX).await?, ContactChange::Changed { version: 6 });
    assert_eq!(d.set_privacy(alice, defaults).await?, Some(7));
    let reopened = f.reopen().await?;
    assert_eq!(reopened.directory.privacy(alice).await?, Some((defaults, 7)));
    assert_eq!(reopened.directory.contacts(alice).await?.len(), MAX);
    assert_eq!(reopened.directory.contacts(bob).await?, vec![]);
    Ok(())
}

/// A user's stored uploads stop at their quota, also when uploads race through two nodes' stores
/// (two opens of the same storage): of twelve 100-byte uploads against a 1,000-byte quota exactly
/// ten are stored, and the refused ones say the quota and the use. Another user's quota is their
/// own. Deleting is the uploader's alone; it removes the upload (description and bytes) and frees
/// its room; deleting it again, or an unknown id, finds nothing.
async fn media_quota_holds_across_nodes_and_deleting_frees_room(f: &Fixture) -> Result<()> {
    const QUOTA: u64 = 1_000;
    let d = f.stores.directory.clone();
    let other = f.reopen().await?.directory;
    let (alice, bob) = (user("alice"), user("bob"));
    d.create_user(&alice).await?;
    d.create_user(&bob).await?;
    let upload = |owner: UserId, size: usize| {
        let bytes = vec![7u8; size];
        let media = MediaRef {
            media_id: MediaId(Uuid::new_v4()),
            mime: "application/octet-stream".into(),
            size: size as u64,
            name: None,
            sha256: parley_storage::sha256_hex(&bytes),
        };
        (MediaRecord { media, owner, created_at_ms: now_ms() }, bytes)
    };

    let mut racing = tokio::task::JoinSet::new();
    for i in 0..12 {
        let store = if i % 2 == 0 { d.clone() } else { other.clone() };
        let (record, bytes) = upload(alice.id, 100);
        racing.spawn(async move { (record.media.media_id, store.put_media(&record, &bytes, None, QUOTA).await) });
    }
    let (mut stored, mut refused) = (Vec::new(), 0);
    while let Some(joined) = racing.join_next().await {
        match joined? {
            (id, Ok(())) => stored.push(id),
            (id, Err(StorageError::MediaQuotaExceeded { used, quota: QUOTA })) if used + 100 > QUOTA => {
                ensure!(d.media(id).await?.is_none(), "a refused upload is not stored");
                refused += 1;
            }
            (_, Err(e)) => return Err(e.into()),
        }
    }
    assert_eq!((stored.len(), refused), (10, 2), "exactly the uploads that fit");
    assert_eq!(d.media_totals(alice.id).await?, MediaTotals { uploads: 10, bytes: 1_000 });
    let (one_byte, bytes) = upload(alice.id, 1);
    ensure!(
        matches!(
            d.put_media(&one_byte, &bytes, None, QUOTA).await,
            Err(StorageError::MediaQuotaExceeded { used: 1_000, .. })
        ),
        "a full quota takes not one byte more"
    );
    let (bobs, bytes) = upload(bob.id, 100);
    other.put_media(&bobs, &bytes, None, QUOTA).await?;
    assert_eq!(d.media_totals(bob.id).await?, MediaTotals { uploads: 1, bytes: 100 });

    let victim = stored[0];
    assert_eq!(d.delete_media(victim, bob.id).await?, MediaDeletion::NotOwner);
    ensure!(d.media(victim).await?.is_some(), "someone else's delete changes nothing");
    assert_eq!(other.delete_media(victim, alice.id).await?, MediaDeletion::Deleted);
    assert_eq!((d.media(victim).await?, d.media_bytes(victim).await?), (None, None));
    assert_eq!(d.delete_media(victim, alice.id).await?, MediaDeletion::Unknown);
    assert_eq!(d.delete_media(MediaId(Uuid::new_v4()), alice.id).await?, MediaDeletion::Unknown);
    assert_eq!(d.media_totals(alice.id).await?, MediaTotals { uploads: 9, bytes: 900 });
    let (fits, bytes) = upload(alice.id, 100);
    d.put_media(&fits, &bytes, None, QUOTA).await?;
    assert_eq!(d.media_totals(alice.id).await?, MediaTotals { uploads: 10, bytes: 1_000 });

    // Listed newest first (time, then id), a page at a time, each exactly once; only one's own.
    let all = d.media_list(alice.id, None, 100).await?;
    let key = |r: &MediaRecord| (r.created_at_ms, r.media.media_id);
    ensure!(all.windows(2).all(|w| key(&w[0]) > key(&w[1])), "newest first");
    let ids: Vec<MediaId> = all.iter().map(|r| r.media.media_id).collect();
    ensure!(ids.len() == 10 && !ids.contains(&victim) && ids.contains(&fits.media.media_id), "{ids:?}");
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = other.media_list(alice.id, before, 3).await?;
        paged.extend(page.iter().map(|r| r.media.media_id));
        match page.last() {
            Some(last) if page.len() == 3 => before = Some(key(last)),
            _ => break,
        }
    }
    assert_eq!(paged, ids, "pages cover the list once, in order");
    assert_eq!(
        d.media_list(bob.id, None, 100).await?.iter().map(|r| r.media.media_id).collect::<Vec<_>>(),
        vec![bobs.media.media_id]
    );
    Ok(())
}

/// An upload's bytes come back whole (also after a reopen), an id is never stored twice, unknown
/// ids are `None`; a message's media description survives the commit and every read path
/// (history, sync, the conversation summary), and messages without media read back `None`.
async fn media_is_stored_whole_and_messages_carry_its_description(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let alice = user("alice");
    d.create_user(&alice).await?;
    // Every byte value, and more than one page of SQLite / one TOAST chunk of Postgres.
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let media = MediaRef {
        media_id: MediaId(Uuid::new_v4()),
        mime: "image/png".into(),
        size: bytes.len() as u64,
        name: Some("résumé photo.png".into()),
        sha256: parley_storage::sha256_hex(&bytes),
    };
    let record = MediaRecord { media: media.clone(), owner: alice.id, created_at_ms: 1_700_000_000_000 };
    let thumbnail = Thumbnail { mime: "image/jpeg".into(), bytes: vec![0xFF, 0xD8, 0, 1, 2, 0xFF, 0xD9] };
    d.put_media(&record, &bytes, Some(&thumbnail), NO_QUOTA).await?;
    let other = Thumbnail { mime: "image/png".into(), bytes: vec![1] };
    ensure!(d.put_media(&record, b"other bytes", Some(&other), NO_QUOTA).await.is_err(), "an id is stored once");
    assert_eq!(d.media_thumbnail(media.media_id).await?, Some((record.clone(), Some(thumbnail.clone()))));
    assert_eq!(d.media_totals(alice.id).await?.bytes, bytes.len() as u64, "a thumbnail takes no quota");
    assert_eq!(d.media(media.media_id).await?, Some(record.clone()));
    assert_eq!(d.media_bytes(media.media_id).await?, Some((record.clone(), bytes.clone())), "the first bytes stay");
    let unknown = MediaId(Uuid::new_v4());
    assert_eq!(d.media(unknown).await?, None);
    assert_eq!(d.media_bytes(unknown).await?, None);
    assert_eq!(d.media_thumbnail(unknown).await?, None);
    let unnamed = MediaRef { media_id: MediaId(Uuid::new_v4()), name: None, size: 1, ..media.clone() };
    let unnamed_record = MediaRecord { media: unnamed.clone(), ..record.clone() };
    d.put_media(&unnamed_record, b"x", None, NO_QUOTA).await?;
    assert_eq!(d.media(unnamed.media_id).await?, Some(unnamed_record.clone()));
    assert_eq!(d.media_thumbnail(unnamed.media_id).await?, Some((unnamed_record, None)), "stored without one");
    // Deleting an upload deletes its thumbnail (nothing is left to serve or count).
    let doomed = MediaRef { media_id: MediaId(Uuid::new_v4()), size: 1, ..media.clone() };
    d.put_media(&MediaRecord { media: doomed.clone(), ..record.clone() }, b"y", Some(&thumbnail), NO_QUOTA).await?;
    assert_eq!(d.delete_media(doomed.media_id, alice.id).await?, MediaDeletion::Deleted);
    assert_eq!(d.media_thumbnail(doomed.media_id).await?, None);
    let put_back = MediaRecord { media: doomed.clone(), ..record.clone() };
    d.put_media(&put_back, b"y", None, NO_QUOTA).await?;
    assert_eq!(d.media_thumbnail(doomed.media_id).await?, Some((put_back, None)), "no thumbnail outlived it");

    let (store, epoch) = leased(&f.stores, 5, "node-a").await?;
    let c = new_conversation();
    let with_media = NewMessage { media: Some(media.clone()), ..msg(c, alice.id, "p1", "") };
    let plain = msg(c, alice.id, "p2", "plain");
    store.commit(epoch, &messages(vec![with_media, plain])).await?;
    let (page, _) = store.history(c, None, 10).await?;
    assert_eq!(page.iter().map(|m| m.media.clone()).collect::<Vec<_>>(), vec![Some(media.clone()), None]);
    assert_eq!(page[0].body, "", "a photo without a caption");
    let synced = store
        .sync(&SyncRequest { user: alice.id, device: device("d1"), conversations: vec![c], per_conversation_limit: 10 })
        .await?;
    assert_eq!(synced.messages.first().and_then(|m| m.media.clone()), Some(media.clone()));
    let with_media_last = NewMessage { media: Some(media.clone()), ..msg(c, alice.id, "p3", "caption") };
    store.commit(epoch, &messages(vec![with_media_last])).await?;
    let summaries = store.summaries(alice.id, &[c]).await?;
    let last = summaries.first().and_then(|s| s.last_message.clone()).context("a last message")?;
    assert_eq!((last.body.as_str(), last.media), ("caption", Some(media.clone())));

    let reopened = f.reopen().await?;
    assert_eq!(reopened.directory.media_bytes(media.media_id).await?, Some((record.clone(), bytes)));
    assert_eq!(reopened.directory.media_thumbnail(media.media_id).await?, Some((record, Some(thumbnail))));
    Ok(())
}

async fn tokens_expire_and_can_be_deleted(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let alice = user("alice");
    d.create_user(&alice).await?;
    let alice_view = UserView { id: alice.id, username: "alice".into() };
    let now = now_ms();
    let live = token_hash("live-token");
    let stale = token_hash("stale-token");
    d.insert_token(&live, alice.id, now + 60_000).await?;
    d.insert_token(&stale, alice.id, now - 1).await?;

    let expires_at_ms = now + 60_000;
    assert_eq!(d.token_user(&live, now).await?, Some(TokenGrant { user: alice_view, expires_at_ms }));
    assert_eq!(d.token_user(&stale, now).await?, None, "expired token");
    assert_eq!(d.token_user(&live, now + 120_000).await?, None, "expired by the given clock");
    assert_eq!(d.token_user(&token_hash("never-issued"), now).await?, None);

    d.delete_token(&live).await?;
    assert_eq!(d.token_user(&live, now).await?, None, "deleted token");
    d.delete_token(&live).await?;
    Ok(())
}

fn subscription(endpoint: &str, user: UserId, token: &str, at: i64) -> PushSubscriptionRecord {
    PushSubscriptionRecord {
        endpoint: endpoint.into(),
        user,
        token_hash: token_hash(token),
        p256dh: format!("key-of-{endpoint}"),
        auth: "auth".into(),
        created_at_ms: at,
    }
}

async fn push_subscriptions_follow_their_token_and_keep_the_newest(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let (alice, bob) = (user("alice"), user("bob"));
    d.create_user(&alice).await?;
    d.create_user(&bob).await?;
    let now = now_ms();
    for (token, who, expires) in
        [("a-phone", alice.id, now + 60_000), ("a-laptop", alice.id, now + 60_000), ("a-old", alice.id, now - 1)]
    {
        d.insert_token(&token_hash(token), who, expires).await?;
    }
    d.insert_token(&token_hash("b-laptop"), bob.id, now + 60_000).await?;

    let keep = 3;
    d.put_push_subscription(&subscription("https://p/phone", alice.id, "a-phone", now), keep).await?;
    d.put_push_subscription(&subscription("https://p/laptop", alice.id, "a-laptop", now + 1), keep).await?;
    d.put_push_subscription(&subscription("https://p/expired", alice.id, "a-old", now + 2), keep).await?;
    let endpoints = |subs: Vec<PushSubscriptionRecord>| subs.into_iter().map(|s| s.endpoint).collect::<Vec<_>>();
    assert_eq!(
        endpoints(d.push_subscriptions(alice.id, now).await?),
        ["https://p/laptop", "https://p/phone"],
        "newest first, and none whose token expired"
    );
    let got = d.push_subscriptions(alice.id, now).await?;
    assert_eq!(got[1], subscription("https://p/phone", alice.id, "a-phone", now), "stored as given");
    assert!(d.push_subscriptions(bob.id, now).await?.is_empty());

    // The same browser signed in as bob: the endpoint moves to him, with his token and keys.
    let mut moved = subscription("https://p/laptop", bob.id, "b-laptop", now + 3);
    moved.p256dh = "new-key".into();
    d.put_push_subscription(&moved, keep).await?;
    assert_eq!(d.push_subscriptions(bob.id, now).await?, vec![moved]);
    assert_eq!(endpoints(d.push_subscriptions(alice.id, now).await?), ["https://p/phone"]);

    // Past `keep`, the user's oldest are forgotten (the expired one counts: it is still stored).
    for i in 0..3 {
        d.put_push_subscription(&subscription(&format!("https://p/new-{i}"), alice.id, "a-phone", now + 10 + i), keep)
            .await?;
    }
    assert_eq!(
        endpoints(d.push_subscriptions(alice.id, now).await?),
        ["https://p/new-2", "https://p/new-1", "https://p/new-0"],
        "the three newest"
    );

    // A user may delete only their own; a push service's "gone" deletes whoever's.
    assert!(!d.delete_push_subscription("https://p/new-2", Some(bob.id)).await?, "not bob's");
    assert!(d.delete_push_subscription("https://p/new-2", Some(alice.id)).await?);
    assert!(!d.delete_push_subscription("https://p/new-2", Some(alice.id)).await?, "already gone");
    assert!(d.delete_push_subscription("https://p/new-1", None).await?);
    assert_eq!(endpoints(d.push_subscriptions(alice.id, now).await?), ["https://p/new-0"]);

    // Signing out ends the token's subscriptions, not the others'.
    d.delete_token(&token_hash("a-phone")).await?;
    assert!(d.push_subscriptions(alice.id, now).await?.is_empty());
    assert_eq!(d.push_subscriptions(bob.id, now).await?.len(), 1);
    let reopened = f.reopen().await?;
    assert_eq!(reopened.directory.push_subscriptions(bob.id, now).await?.len(), 1, "durable");
    Ok(())
}

async fn mutes_belong_to_members_and_expire(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let (alice, bob) = (user("alice"), user("bob"));
    d.create_user(&alice).await?;
    d.create_user(&bob).await?;
    let (chat, other) = (new_conversation(), new_conversation());
    let now = now_ms();
    d.add_conversation(chat, ConversationKind::Direct, &[alice.id, bob.id], now).await?;
    d.add_conversation(other, ConversationKind::Direct, &[alice.id], now).await?;
    assert!(d.muted(alice.id, now).await?.is_empty());
    assert!(d.set_muted(alice.id, chat, Some(now + 60_000)).await?);
    assert!(d.set_muted(alice.id, other, Some(now - 1)).await?, "a time already past: allowed, not muted");
    assert_eq!(d.muted(alice.id, now).await?, vec![(chat, now + 60_000)], "only hers, only unexpired");
    assert_eq!(d.muted(alice.id, now + 60_000).await?, vec![], "expired by the given clock");
    assert!(d.muted(bob.id, now).await?.is_empty(), "alice's mute is not bob's");
    assert!(!d.set_muted(bob.id, other, Some(now + 60_000)).await?, "not a member: nothing changes");
    assert!(d.muted(bob.id, now).await?.is_empty());
    let reopened = f.reopen().await?;
    assert_eq!(reopened.directory.muted(alice.id, now).await?.len(), 1, "durable");
    assert!(d.set_muted(alice.id, chat, None).await?);
    assert!(d.muted(alice.id, now).await?.is_empty(), "unmuted");
    Ok(())
}

async fn settings_keep_the_first_value(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    assert_eq!(d.setting_or_init("vapid", "first").await?, "first");
    assert_eq!(d.setting_or_init("vapid", "second").await?, "first", "the first value stays");
    let other = f.reopen().await?;
    assert_eq!(other.directory.setting_or_init("vapid", "third").await?, "first", "as another node sees it");
    assert_eq!(d.setting_or_init("other", "x").await?, "x");
    Ok(())
}

async fn conversations_are_idempotent(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let (a, b, c) = (UserId::random(), UserId::random(), UserId::random());
    let direct = ConversationId::direct(a, b);
    let group = new_conversation();
    d.add_conversation(direct, ConversationKind::Direct, &[b, a], now_ms()).await?;
    d.add_conversation(direct, ConversationKind::Direct, &[a, b], now_ms()).await?;
    d.add_conversation(group, ConversationKind::Group, &[c, a, b, a], now_ms()).await?;
    d.add_conversation(group, ConversationKind::Group, &[c, a, b, a], now_ms()).await?;

    let mut pair = vec![a, b];
    pair.sort();
    let mut trio = vec![a, b, c];
    trio.sort();
    let direct_record = ConversationRecord::direct(direct, pair);
    let group_record = ConversationRecord {
        id: group,
        kind: ConversationKind::Group,
        members: trio,
        name: None,
        owner: None,
        version: 0,
    };
    assert_eq!(d.conversation(direct).await?, Some(direct_record.clone()));
    assert_eq!(d.conversation(group).await?, Some(group_record.clone()));
    assert_eq!(d.conversation(new_conversation()).await?, None);

    let mut of_a = d.user_conversations(a).await?;
    of_a.sort_by_key(|r| r.id);
    let mut want = vec![direct_record, group_record.clone()];
    want.sort_by_key(|r| r.id);
    assert_eq!(of_a, want, "each conversation listed once");
    assert_eq!(d.user_conversations(c).await?, vec![group_record]);
    assert_eq!(d.user_conversations(UserId::random()).await?, vec![]);
    Ok(())
}

/// Groups: `create_group` records name, owner and version 0 and indexes every member;
/// `update_group` is a compare-and-set on the version: with the version read it replaces name,
/// owner and members, bumps the version and moves the index (removed members lose the group,
/// added ones gain it); with a stale version (or for a conversation that is not a group) it
/// changes nothing and says so.
async fn groups_change_only_from_the_version_read(f: &Fixture) -> Result<()> {
    let d = &f.stores.directory;
    let mut ids: Vec<UserId> = (0..5).map(|_| UserId::random()).collect();
    ids.sort();
    let (a, b, c, dave, erin) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    let id = new_conversation();
    let group = ConversationRecord {
        id,
        kind: ConversationKind::Group,
        members: vec![a, b, c],
        name: Some("climbing".into()),
        owner: Some(b),
        version: 0,
    };
    d.create_group(&group, now_ms()).await?;
    assert_eq!(d.conversation(id).await?, Some(group.clone()), "name, owner and version 0 as created");
    for m in [a, b, c] {
        assert_eq!(d.user_conversations(m).await?, vec![group.clone()], "listed for each member");
    }
    assert_eq!(d.user_conversations(dave).await?, vec![], "not for others");

    // An id that is taken is refused, and the group stays as it was.
    let clash =
        ConversationRecord { members: vec![dave], name: Some("clash".into()), owner: Some(dave), ..group.clone() };
    assert!(d.create_group(&clash, now_ms()).await.is_err(), "a second group under a taken id");
    assert_eq!(d.conversation(id).await?, Some(group.clone()));
    assert_eq!(d.user_conversations(dave).await?, vec![]);

    // With the version read: replaced, version 1, index moved.
    let mut next = ConversationRecord {
        members: vec![a, b, dave],
        name: Some("bouldering".into()),
        owner: Some(a),
        ..group.clone()
    };
    assert!(d.update_group(0, &next, &[c]).await?, "update from the current version");
    next.version = 1;
    assert_eq!(d.conversation(id).await?, Some(next.clone()));
    assert_eq!(d.user_conversations(c).await?, vec![], "a removed member no longer lists it");
    assert_eq!(d.user_conversations(dave).await?, vec![next.clone()], "an added member does");
    assert_eq!(d.user_conversations(a).await?, vec![next.clone()], "a member who stays lists it once");

    // From a stale version: refused, nothing changed.
    let stale = ConversationRecord {
        members: vec![c, erin],
        name: Some("lost update".into()),
        owner: Some(erin),
        ..group.clone()
    };
    assert!(!d.update_group(0, &stale, &[a, b, dave]).await?, "update from a stale version");
    assert_eq!(d.conversation(id).await?, Some(next.clone()), "the stale update changed nothing");
    for m in [a, b, dave] {
        assert_eq!(d.user_conversations(m).await?, vec![next.clone()], "still listed");
    }
    for m in [c, erin] {
        assert_eq!(d.user_conversations(m).await?, vec![], "not listed by the stale update");
    }

    // Nothing to update: an unknown id, and a direct chat (never changed as a group).
    let nowhere = ConversationRecord { id: new_conversation(), ..next.clone() };
    assert!(!d.update_group(0, &nowhere, &[]).await?, "no such group");
    assert_eq!(d.conversation(nowhere.id).await?, None);
    let direct = ConversationId::direct(a, b);
    d.add_conversation(direct, ConversationKind::Direct, &[a, b], now_ms()).await?;
    let as_group = ConversationRecord {
        id: direct,
        kind: ConversationKind::Group,
        members: vec![a, b, erin],
        name: Some("hijack".into()),
        owner: Some(a),
        version: 0,
    };
    assert!(!d.update_group(0, &as_group, &[]).await?, "a direct chat is not a group");
    assert_eq!(d.conversation(direct).await?, Some(ConversationRecord::direct(direct, vec![a, b])));
    assert_eq!(d.user_conversations(erin).await?, vec![]);

    // The next change goes from version 1.
    let mut renamed = ConversationRecord { name: Some("crag".into()), ..next.clone() };
    assert!(d.update_group(1, &renamed, &[]).await?);
    renamed.version = 2;
    assert_eq!(d.conversation(id).await?, Some(renamed));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

async fn lease_lifecycle(f: &Fixture) -> Result<()> {
    let node_b = f.reopen().await?;
    let a = f.stores.shard(ShardId(3)).await?;
    let b = node_b.shard(ShardId(3)).await?;
    assert_eq!(a.shard(), ShardId(3));

    let fresh = a.lease_info().await?;
    assert_eq!((fresh.owner.as_deref(), fresh.epoch), (None, Epoch(0)), "fresh shard");

    let g1 = a.acquire_lease("node-a", LONG_TTL_MS).await?.context("fresh shard is free")?;
    assert_eq!(g1.epoch, Epoch(1));
    assert!(g1.expires_at_ms > fresh.now_ms, "lease ends in the future");
    let info = b.lease_info().await?;
    assert_eq!((info.owner.as_deref(), info.epoch), (Some("node-a"), Epoch(1)));
    assert!(info.expires_at_ms > info.now_ms, "live lease");

    assert_eq!(b.acquire_lease("node-b", LONG_TTL_MS).await?, None, "held by a live owner");
    assert_eq!(b.lease_info().await?.epoch, Epoch(1), "a refused acquire bumps nothing");

    let renewed = a.renew_lease("node-a", g1.epoch, 2 * LONG_TTL_MS).await?;
    assert_eq!(renewed.epoch, g1.epoch);
    assert!(renewed.expires_at_ms > g1.expires_at_ms, "renew extends the lease");
    assert_stale(a.renew_lease("node-a", Epoch(7), LONG_TTL_MS).await, 7, 1);
    assert_stale(b.renew_lease("node-b", g1.epoch, LONG_TTL_MS).await, 1, 1);
    assert_eq!(b.acquire_lease("node-b", LONG_TTL_MS).await?, None, "still node-a's");

    a.release_lease("node-a", g1.epoch).await?;
    let released = b.lease_info().await?;
    assert_eq!(released.owner, None, "released lease is free");
    assert!(released.expires_at_ms <= released.now_ms, "released lease has expired");

    let g2 = b.acquire_lease("node-b", LONG_TTL_MS).await?.context("released lease is free")?;
    assert_eq!(g2.epoch, Epoch(2), "every grant bumps the epoch");
    assert_stale(a.renew_lease("node-a", g1.epoch, LONG_TTL_MS).await, 1, 2);
    assert_eq!(a.acquire_lease("node-a", LONG_TTL_MS).await?, None, "node-b holds it now");

    let again = b.acquire_lease("node-b", LONG_TTL_MS).await?.context("owner may re-acquire")?;
    assert_eq!(again.epoch, Epoch(3));
    Ok(())
}

async fn expired_lease_is_taken_over(f: &Fixture) -> Result<()> {
    let node_b = f.reopen().await?;
    let a = f.stores.shard(ShardId(4)).await?;
    let b = node_b.shard(ShardId(4)).await?;
    let g1 = a.acquire_lease("node-a", 1).await?.context("fresh shard is free")?;
    assert_eq!(g1.epoch, Epoch(1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let g2: LeaseGrant = b.acquire_lease("node-b", LONG_TTL_MS).await?.context("expired lease")?;
    assert_eq!(g2.epoch, Epoch(2));
    assert_eq!(b.lease_info().await?.owner.as_deref(), Some("node-b"));
    assert_stale(a.renew_lease("node-a", g1.epoch, LONG_TTL_MS).await, 1, 2);
    Ok(())
}

/// A node that dies holding a long lease loses the shard at once: its session lock dies with it.
async fn dead_owner_is_replaced_through_the_session_lock(f: &Fixture) -> Result<()> {
    let node_a = f.reopen().await?;
    let a = node_a.shard(ShardId(5)).await?;
    let g1 = a.acquire_lease("node-a", 10 * LONG_TTL_MS).await?.context("fresh shard is free")?;
    let b = f.stores.shard(ShardId(5)).await?;
    assert_eq!(b.acquire_lease("node-b", LONG_TTL_MS).await?, None, "node-a is alive");

    // "Kill" node A: drop everything it opened, which closes its files and connections.
    drop(a);
    drop(node_a);
    let deadline = tokio::time::Instant::now() + LOCK_RELEASE_TIMEOUT;
    let g2 = loop {
        if let Some(grant) = b.acquire_lease("node-b", LONG_TTL_MS).await? {
            break grant;
        }
        ensure!(tokio::time::Instant::now() < deadline, "dead owner's lock never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(g2.epoch, Epoch(g1.epoch.0 + 1));
    let info = b.lease_info().await?;
    assert_eq!(info.owner.as_deref(), Some("node-b"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Commits
// ---------------------------------------------------------------------------------------------

async fn commit_assigns_gapless_seqs_in_batch_order(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let (alice, bob) = (UserId::random(), UserId::random());
    let (c1, c2) = (new_conversation(), new_conversation());

    let first = vec![msg(c1, alice, "a1", "c1 one"), msg(c2, bob, "b1", "c2 one"), msg(c1, bob, "b2", "c1 two")];
    let results = store.commit(epoch, &messages(first.clone())).await?.messages;
    let acks = results.iter().map(ack).collect::<Result<Vec<_>>>()?;
    assert_eq!(acks.iter().map(|a| (a.conversation_id, a.seq)).collect::<Vec<_>>(), vec![(c1, 1), (c2, 1), (c1, 2)]);
    for (a, m) in acks.iter().zip(&first) {
        assert_eq!((a.message_id, a.sent_at_ms, a.duplicate), (m.message_id, m.sent_at_ms, false));
    }

    let second = vec![msg(c2, alice, "a2", "c2 two"), msg(c1, alice, "a3", "c1 three"), msg(c1, bob, "b3", "c1 four")];
    let results = store.commit(epoch, &messages(second)).await?.messages;
    let got = results.iter().map(|r| ack(r).map(|a| (a.conversation_id, a.seq))).collect::<Result<Vec<_>>>()?;
    assert_eq!(got, vec![(c2, 2), (c1, 3), (c1, 4)]);

    let results = store.commit(epoch, &messages(vec![msg(c1, bob, "b4", "c1 five")])).await?.messages;
    assert_eq!(ack(&results[0])?.seq, 5);
    assert_eq!(store.commit(epoch, &WriteBatch::default()).await?, Committed::default(), "empty batch");

    let (page, more) = store.history(c1, None, 100).await?;
    assert!(!more);
    assert_eq!(seqs(&page), vec![1, 2, 3, 4, 5]);
    let bodies: Vec<&str> = page.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, vec!["c1 one", "c1 two", "c1 three", "c1 four", "c1 five"]);
    let m1 = &first[0];
    assert_eq!(
        page[0],
        MessageView {
            message_id: m1.message_id,
            conversation_id: c1,
            seq: 1,
            sender: alice,
            client_msg_id: cid("a1"),
            body: "c1 one".into(),
            sent_at_ms: m1.sent_at_ms,
            media: None,
        }
    );
    let (page, _) = store.history(c2, None, 100).await?;
    assert_eq!(seqs(&page), vec![1, 2]);
    assert_eq!(page[1].body, "c2 two");
    Ok(())
}

async fn retry_in_later_commit_returns_the_original(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let (alice, bob) = (UserId::random(), UserId::random());
    let c1 = new_conversation();
    let original = msg(c1, alice, "x1", "hello");
    let results = store.commit(epoch, &messages(vec![original.clone()])).await?.messages;
    let first = ack(&results[0])?.clone();
    assert_eq!((first.seq, first.duplicate), (1, false));

    // The retry carries a new message id and time (the shard picks them per attempt).
    let retry =
        NewMessage { message_id: MessageId::new(), sent_at_ms: now_ms() + 5, body: "hello?".into(), ..original };
    let results = store.commit(epoch, &messages(vec![retry])).await?.messages;
    let dup = ack(&results[0])?;
    assert_eq!(*dup, StoredAck { duplicate: true, ..first.clone() }, "the original's ids");
    assert_eq!(original_of(&results[0]), Some(("hello", None)), "the original's body, not the retry's");
    assert_eq!(
        original_of(
            &store.commit(epoch, &messages(vec![msg(new_conversation(), alice, "y1", "new")])).await?.messages[0]
        ),
        None
    );

    let (page, _) = store.history(c1, None, 100).await?;
    assert_eq!(page.len(), 1, "nothing new stored");
    assert_eq!(page[0].body, "hello");

    // The key includes the sender: bob may use "x1" in the same conversation, and the duplicate
    // did not move the counter.
    let results = store.commit(epoch, &messages(vec![msg(c1, bob, "x1", "bob's")])).await?.messages;
    let bobs = ack(&results[0])?;
    assert_eq!((bobs.seq, bobs.duplicate), (2, false));
    Ok(())
}

async fn repeat_within_a_batch_is_a_duplicate_of_the_first(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let (alice, bob) = (UserId::random(), UserId::random());
    let c1 = new_conversation();
    let batch = vec![
        msg(c1, alice, "k", "first"),
        msg(c1, alice, "k", "second"),
        msg(c1, bob, "k", "bob's"),
        msg(c1, alice, "k", "third"),
    ];
    let results = store.commit(epoch, &messages(batch.clone())).await?.messages;
    let acks = results.iter().map(ack).collect::<Result<Vec<_>>>()?;
    assert_eq!((acks[0].seq, acks[0].duplicate, acks[0].message_id), (1, false, batch[0].message_id));
    assert_eq!(*acks[1], StoredAck { duplicate: true, ..acks[0].clone() });
    assert_eq!((acks[2].seq, acks[2].duplicate, acks[2].message_id), (2, false, batch[2].message_id));
    assert_eq!(*acks[3], StoredAck { duplicate: true, ..acks[0].clone() });
    let originals: Vec<_> = results.iter().map(original_of).collect();
    assert_eq!(originals, vec![None, Some(("first", None)), None, Some(("first", None))], "the first's body");
    let (page, _) = store.history(c1, None, 100).await?;
    assert_eq!(page.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), vec!["first", "bob's"]);
    // A later retry of a key stored with media gets that media back.
    let photo = MediaRef {
        media_id: MediaId(Uuid::new_v4()),
        mime: "image/png".into(),
        size: 3,
        name: None,
        sha256: "00".repeat(32),
    };
    let with_photo = NewMessage { media: Some(photo.clone()), ..msg(c1, alice, "p", "caption") };
    store.commit(epoch, &messages(vec![with_photo])).await?;
    let retry = store.commit(epoch, &messages(vec![msg(c1, alice, "p", "other")])).await?.messages;
    assert_eq!(original_of(&retry[0]), Some(("caption", Some(&photo))));
    Ok(())
}

/// The idempotency key is (conversation, sender, client_msg_id): the same client id in another
/// conversation is another message, and a retry resolves within its own conversation.
async fn client_id_is_scoped_to_its_conversation(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let alice = UserId::random();
    let (c1, c2, c3, c4) = (new_conversation(), new_conversation(), new_conversation(), new_conversation());
    let first = store.commit(epoch, &messages(vec![msg(c1, alice, "k", "to c1")])).await?.messages;
    let first = ack(&first[0])?.clone();

    let to_c2 = msg(c2, alice, "k", "to c2");
    let results = store.commit(epoch, &messages(vec![to_c2.clone()])).await?.messages;
    let second = ack(&results[0])?.clone();
    assert_eq!(
        (second.conversation_id, second.seq, second.duplicate, second.message_id),
        (c2, 1, false, to_c2.message_id),
        "a new message in c2"
    );
    let retry = store.commit(epoch, &messages(vec![msg(c2, alice, "k", "to c2 again")])).await?.messages;
    assert_eq!(*ack(&retry[0])?, StoredAck { duplicate: true, ..second }, "c2's original, not c1's");
    assert_eq!(original_of(&retry[0]), Some(("to c2", None)));
    let retry = store.commit(epoch, &messages(vec![msg(c1, alice, "k", "to c1 again")])).await?.messages;
    assert_eq!(*ack(&retry[0])?, StoredAck { duplicate: true, ..first }, "c1's original");
    assert_eq!(seqs(&store.history(c1, None, 100).await?.0), vec![1]);
    assert_eq!(seqs(&store.history(c2, None, 100).await?.0), vec![1]);

    // Within one batch, too.
    let batch = vec![msg(c3, alice, "z", "to c3"), msg(c4, alice, "z", "to c4"), msg(c3, alice, "z", "c3 again")];
    let results = store.commit(epoch, &messages(batch.clone())).await?.messages;
    let acks = results.iter().map(ack).collect::<Result<Vec<_>>>()?;
    assert_eq!((acks[0].conversation_id, acks[0].seq, acks[0].duplicate), (c3, 1, false));
    assert_eq!((acks[1].conversation_id, acks[1].seq, acks[1].duplicate), (c4, 1, false));
    assert_eq!(acks[1].message_id, batch[1].message_id);
    assert_eq!(*acks[2], StoredAck { duplicate: true, ..acks[0].clone() });
    assert_eq!(store.history(c3, None, 100).await?.0.len(), 1);
    assert_eq!(store.history(c4, None, 100).await?.0.len(), 1);
    Ok(())
}

async fn stale_epoch_commit_stores_nothing(f: &Fixture) -> Result<()> {
    let node_b = f.reopen().await?;
    let a = f.stores.shard(ShardId(2)).await?;
    let b = node_b.shard(ShardId(2)).await?;
    let (alice, bob) = (UserId::random(), UserId::random());
    let c1 = new_conversation();

    let g1 = a.acquire_lease("node-a", 1).await?.context("fresh shard is free")?;
    store_one(&*a, g1.epoch, msg(c1, alice, "a1", "under epoch 1"), 1).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let g2 = b.acquire_lease("node-b", LONG_TTL_MS).await?.context("expired lease")?;
    assert_eq!(g2.epoch, Epoch(2));

    let late = WriteBatch {
        messages: vec![msg(c1, alice, "a2", "late write")],
        cursors: vec![cursor(c1, bob, Some("phone"), ReceiptKind::Read, 1)],
    };
    assert_stale(a.commit(g1.epoch, &late).await, 1, 2);
    assert_stale(b.commit(g1.epoch, &late).await, 1, 2);
    assert_stale(a.commit(Epoch(9), &WriteBatch::default()).await, 9, 2);
    assert_eq!(seqs(&a.history(c1, None, 100).await?.0), vec![1], "the stale batch stored nothing");
    assert_eq!(a.member_cursor(c1, bob).await?, (0, 0), "nor moved a cursor");

    store_one(&*b, g2.epoch, msg(c1, alice, "a2", "under epoch 2"), 2).await?;
    assert_eq!(
        b.epochs(c1).await?,
        vec![(1, Epoch(1)), (2, Epoch(2))],
        "each row records the epoch it was written under"
    );
    assert_eq!(b.epochs(new_conversation()).await?, vec![]);
    if let Some(pg) = f.postgres_db() {
        // The same fact straight from the table, so the audit cannot hide a wrong column.
        let client = pg.connect().await?;
        let rows =
            client.query("SELECT seq, epoch FROM messages WHERE conversation_id = $1 ORDER BY seq", &[&c1.0]).await?;
        let got: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(got, vec![(1, 1), (2, 2)], "each row records the epoch it was written under");
    }
    Ok(())
}

/// Shards commit at the same moment, as a node's store actors do; the Postgres backend combines
/// such commits into shared statements (group commit). Whatever it combines, each shard's batch
/// must come out as if committed alone: its own gapless seqs in batch order, its own duplicates,
/// its own receipts (cursor moves), and a stale epoch refusing that shard's batch only — messages
/// and receipts alike.
async fn concurrent_commits_of_many_shards_are_fenced_each_on_its_own(f: &Fixture) -> Result<()> {
    const SHARDS: u16 = 8;
    const ROUNDS: u64 = 4;
    let stale_shard = 7;
    let mut shards = Vec::new();
    for i in 0..SHARDS {
        let (store, epoch) = leased(&f.stores, 20 + i, "node-a").await?;
        // One shard commits under an epoch it never held: refused, round after round.
        let epoch = if i == stale_shard { Epoch(epoch.0 + 5) } else { epoch };
        shards.push((store, epoch, new_conversation()));
    }
    let (alice, bob) = (UserId::random(), UserId::random());
    // Even shards, and the stale one, also carry a receipt: bob has the batch's second message.
    let with_receipt = |i: usize| i.is_multiple_of(2) || i == usize::from(stale_shard);
    for round in 0..ROUNDS {
        let batches: Vec<WriteBatch> = shards
            .iter()
            .enumerate()
            .map(|(i, (_, _, c))| {
                let mut batch: Vec<NewMessage> = (1..=3)
                    .map(|k| msg(*c, alice, &format!("r{round}-{k}"), &format!("shard {i} round {round}")))
                    .collect();
                if i == 1 {
                    // A repeat inside the batch, and a retry of the previous round's last message.
                    batch.push(msg(*c, alice, &format!("r{round}-1"), "repeat"));
                    if round > 0 {
                        batch.push(msg(*c, alice, &format!("r{}-3", round - 1), "retry"));
                    }
                }
                let mut batch = messages(batch);
                if with_receipt(i) {
                    batch.cursors.push(cursor(*c, bob, Some("phone"), ReceiptKind::Delivered, round * 3 + 2));
                }
                batch
            })
            .collect();
        // All at once: every commit is queued before any of them is answered.
        let results = futures_util::future::join_all(
            shards.iter().zip(&batches).map(|((store, epoch, _), batch)| store.commit(*epoch, batch)),
        )
        .await;
        for (i, result) in results.into_iter().enumerate() {
            if i == usize::from(stale_shard) {
                assert_stale(result, shards[i].1 .0, shards[i].1 .0 - 5);
                continue;
            }
            let committed = result?;
            let want_cursors = if with_receipt(i) { vec![round * 3 + 2] } else { vec![] };
            assert_eq!(committed.cursors, want_cursors, "shard {i}, round {round}: the receipt as if committed alone");
            let results = committed.messages;
            let got: Vec<(Seq, bool)> =
                results.iter().map(|r| ack(r).map(|a| (a.seq, a.duplicate))).collect::<Result<_>>()?;
            let mut want: Vec<(Seq, bool)> = (1..=3).map(|k| (round * 3 + k, false)).collect();
            if i == 1 {
                want.push((round * 3 + 1, true));
                if round > 0 {
                    want.push((round * 3, true));
                }
            }
            assert_eq!(got, want, "shard {i}, round {round}: seqs and duplicates as if committed alone");
        }
    }
    for (i, (store, _, c)) in shards.iter().enumerate() {
        let want: Vec<Seq> = if i == usize::from(stale_shard) { vec![] } else { (1..=ROUNDS * 3).collect() };
        assert_eq!(seqs(&store.history(*c, None, 100).await?.0), want, "shard {i}: history");
        let want_cursor = if i == usize::from(stale_shard) || !with_receipt(i) { (0, 0) } else { (ROUNDS * 3 - 1, 0) };
        assert_eq!(store.member_cursor(*c, bob).await?, want_cursor, "shard {i}: bob's delivered/read cursor");
    }
    if let Some(pg) = f.postgres_db() {
        // The combining did happen: rows of different shards share a transaction. (Without it
        // these checks fail and the rest of the test proves nothing about group commit.)
        let client = pg.connect().await?;
        // How many transactions wrote the messages of these conversations.
        let transactions = |conversations: Vec<Uuid>| {
            let client = &client;
            async move {
                let sql = "SELECT count(DISTINCT xmin::text) FROM messages WHERE conversation_id = ANY($1)";
                Ok::<i64, anyhow::Error>(client.query_one(sql, &[&conversations]).await?.get(0))
            }
        };
        let txs = transactions(shards.iter().map(|(_, _, c)| c.0).collect()).await?;
        let batches = i64::from(SHARDS - 1) * ROUNDS as i64;
        assert!(txs < batches, "{batches} batches in {txs} transactions: nothing was combined");
        // Batches with receipts are combined too (they used to commit alone).
        let receipted: Vec<Uuid> = (0..shards.len())
            .filter(|&i| with_receipt(i) && i != usize::from(stale_shard))
            .map(|i| shards[i].2 .0)
            .collect();
        let batches = receipted.len() as i64 * ROUNDS as i64;
        let txs = transactions(receipted).await?;
        assert!(txs < batches, "{batches} batches with receipts in {txs} transactions: none combined");
    }
    Ok(())
}

/// Commit one message and check the seq it got.
async fn store_one(store: &dyn ShardStore, epoch: Epoch, m: NewMessage, seq: Seq) -> Result<()> {
    let results = store.commit(epoch, &messages(vec![m])).await?.messages;
    ensure!(results.len() == 1);
    assert_eq!(ack(&results[0])?.seq, seq);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

async fn history_pages_backwards(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let c1 = new_conversation();
    fill(&*store, epoch, c1, UserId::random(), "m", 25).await?;

    let (page, more) = store.history(c1, None, 10).await?;
    assert_eq!((seqs(&page), more), ((16..=25).collect(), true), "newest page, ascending");
    let (page, more) = store.history(c1, Some(16), 10).await?;
    assert_eq!((seqs(&page), more), ((6..=15).collect(), true));
    let (page, more) = store.history(c1, Some(6), 10).await?;
    assert_eq!((seqs(&page), more), ((1..=5).collect(), false), "oldest page");
    assert_eq!(store.history(c1, Some(1), 10).await?, (vec![], false));
    let (page, more) = store.history(c1, None, 25).await?;
    assert_eq!((page.len(), more), (25, false), "exactly everything");
    let (page, more) = store.history(c1, Some(u64::MAX), 5).await?;
    assert_eq!((seqs(&page), more), ((21..=25).collect(), true), "huge before_seq = from the end");
    let (page, more) = store.history(c1, None, 0).await?;
    assert_eq!((seqs(&page), more), (vec![25], true), "limit clamped to at least one");
    assert_eq!(store.history(new_conversation(), None, 10).await?, (vec![], false));
    Ok(())
}

async fn sync_follows_each_device_cursor(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let (alice, bob) = (UserId::random(), UserId::random());
    let (c1, c2) = (new_conversation(), new_conversation());
    fill(&*store, epoch, c1, alice, "c1m", 5).await?;
    fill(&*store, epoch, c2, alice, "c2m", 3).await?;
    let request = |dev: &str, conversations: Vec<ConversationId>, limit: u32| SyncRequest {
        user: bob,
        device: device(dev),
        conversations,
        per_conversation_limit: limit,
    };
    let view = |reply: &parley_protocol::cluster::SyncReply| {
        reply.messages.iter().map(|m| (m.conversation_id, m.seq)).collect::<Vec<_>>()
    };

    let reply = store.sync(&request("phone", vec![c1], 100)).await?;
    assert_eq!(seqs(&reply.messages), vec![1, 2, 3, 4, 5]);
    assert!(reply.truncated.is_empty());

    store.commit(epoch, &cursors(vec![cursor(c1, bob, Some("phone"), ReceiptKind::Delivered, 3)])).await?;
    let reply = store.sync(&request("phone", vec![c1], 100)).await?;
    assert_eq!(seqs(&reply.messages), vec![4, 5], "after the phone's cursor");
    let reply = store.sync(&request("laptop", vec![c1], 100)).await?;
    assert_eq!(seqs(&reply.messages), vec![1, 2, 3, 4, 5], "the laptop acknowledged nothing");
    assert_eq!(store.member_cursor(c1, bob).await?, (3, 0), "device raises the member cursor");

    store.commit(epoch, &cursors(vec![cursor(c1, bob, Some("laptop"), ReceiptKind::Delivered, 5)])).await?;
    let reply = store.sync(&request("phone", vec![c1], 100)).await?;
    assert_eq!(seqs(&reply.messages), vec![4, 5], "the laptop's ack does not move the phone");
    assert_eq!(store.member_cursor(c1, bob).await?, (5, 0));

    let reply = store.sync(&request("tablet", vec![c1, c2], 2)).await?;
    assert_eq!(view(&reply), vec![(c1, 1), (c1, 2), (c2, 1), (c2, 2)], "grouped, ascending, limited");
    assert_eq!(reply.truncated, vec![c1, c2]);
    let reply = store.sync(&request("phone", vec![c2, c1], 2)).await?;
    assert_eq!(view(&reply), vec![(c2, 1), (c2, 2), (c1, 4), (c1, 5)]);
    assert_eq!(reply.truncated, vec![c2], "exactly the limit left is not truncated");
    let reply = store.sync(&request("laptop", vec![c1, new_conversation()], 100)).await?;
    assert_eq!((reply.messages.len(), reply.truncated.len()), (0, 0), "nothing new");
    Ok(())
}

async fn summaries_count_unread_from_others(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let (alice, bob) = (UserId::random(), UserId::random());
    let c1 = ConversationId::direct(alice, bob);
    let c2 = new_conversation();
    let batch = vec![
        msg(c1, bob, "b1", "hi"),
        msg(c1, bob, "b2", "there"),
        msg(c1, alice, "a1", "hello"),
        msg(c1, bob, "b3", "how are you"),
        msg(c2, bob, "b4", "other chat"),
    ];
    store.commit(epoch, &messages(batch.clone())).await?;

    let got = store.summaries(alice, &[c2, new_conversation(), c1]).await?;
    let ids: Vec<ConversationId> = got.iter().map(|s| s.conversation_id).collect();
    assert_eq!(ids, vec![c2, c1], "in request order, unknown conversations left out");
    let s1 = &got[1];
    assert_eq!((s1.last_seq, s1.read_seq, s1.unread), (4, 0, 3), "bob's three");
    let last = s1.last_message.as_ref().context("last message")?;
    assert_eq!((last.seq, last.body.as_str(), last.message_id), (4, "how are you", batch[3].message_id));
    assert_eq!((got[0].last_seq, got[0].unread), (1, 1));

    let bobs = store.summaries(bob, &[c1]).await?;
    assert_eq!((bobs[0].read_seq, bobs[0].unread), (0, 1), "alice's one");
    assert_eq!((bobs[0].peer_cursor, s1.peer_cursor), (None, None), "nobody has a cursor yet");

    store.commit(epoch, &cursors(vec![cursor(c1, alice, Some("web"), ReceiptKind::Read, 2)])).await?;
    let s1 = store.summaries(alice, &[c1]).await?.pop().context("summary")?;
    assert_eq!((s1.read_seq, s1.unread), (2, 1), "own message at 3 is never unread");
    assert_eq!(store.member_cursor(c1, alice).await?, (2, 2), "read implies delivered");
    assert_eq!(s1.peer_cursor, None, "a user's own cursor is not a peer's");
    store.commit(epoch, &cursors(vec![cursor(c1, alice, Some("phone"), ReceiptKind::Delivered, 4)])).await?;
    let bobs = store.summaries(bob, &[c1]).await?;
    assert_eq!(bobs[0].peer_cursor, Some((4, 2)), "bob sees alice's member-level cursor (max over her devices)");

    // With two other users holding cursors (a group), there is no single peer.
    let carol = UserId::random();
    store.commit(epoch, &cursors(vec![cursor(c1, carol, None, ReceiptKind::Read, 1)])).await?;
    let bobs = store.summaries(bob, &[c1]).await?;
    assert_eq!(bobs[0].peer_cursor, None);

    store.commit(epoch, &cursors(vec![cursor(c1, alice, None, ReceiptKind::Read, 4)])).await?;
    let s1 = store.summaries(alice, &[c1]).await?.pop().context("summary")?;
    assert_eq!((s1.read_seq, s1.unread), (4, 0));
    Ok(())
}

async fn group_floors_are_the_lowest_cursor_of_the_members_listed(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let (alice, bob, carol, dave) = (UserId::random(), UserId::random(), UserId::random(), UserId::random());
    let (g1, g2) = (new_conversation(), new_conversation());
    fill(&*store, epoch, g1, alice, "m", 6).await?;
    fill(&*store, epoch, g2, alice, "n", 3).await?;
    let floors = |groups: Vec<(ConversationId, Vec<UserId>)>| {
        let store = store.clone();
        async move {
            let mut got: Vec<(ConversationId, Seq, Seq)> = store
                .group_floors(&groups)
                .await?
                .into_iter()
                .map(|f| (f.conversation_id, f.delivered_seq, f.read_seq))
                .collect();
            got.sort();
            anyhow::Ok(got)
        }
    };
    let sorted = |mut v: Vec<(ConversationId, Seq, Seq)>| {
        v.sort();
        v
    };
    assert_eq!(floors(vec![(g1, vec![bob, carol])]).await?, vec![(g1, 0, 0)], "nobody has a cursor yet");

    store
        .commit(
            epoch,
            &cursors(vec![
                cursor(g1, bob, Some("web"), ReceiptKind::Read, 5),
                cursor(g1, carol, None, ReceiptKind::Delivered, 4),
                cursor(g1, carol, None, ReceiptKind::Read, 2),
                cursor(g1, dave, None, ReceiptKind::Read, 1),
                cursor(g2, bob, None, ReceiptKind::Read, 3),
            ]),
        )
        .await?;
    assert_eq!(
        floors(vec![(g1, vec![bob, carol]), (g2, vec![bob])]).await?,
        sorted(vec![(g1, 4, 2), (g2, 3, 3)]),
        "the lowest of each: carol's delivered 4 and read 2 in g1"
    );
    // Only the users listed count: dave's lower cursor (he left) does not.
    assert_eq!(floors(vec![(g1, vec![bob])]).await?, vec![(g1, 5, 5)]);
    // A listed user without a cursor holds the floor at 0; a group listed without users is left out.
    assert_eq!(floors(vec![(g2, vec![bob, carol]), (g1, vec![])]).await?, vec![(g2, 0, 0)]);
    assert_eq!(floors(vec![]).await?, vec![]);
    Ok(())
}

async fn cursors_never_move_backwards(f: &Fixture) -> Result<()> {
    let (store, epoch) = leased(&f.stores, 1, "node-a").await?;
    let (alice, bob) = (UserId::random(), UserId::random());
    let c1 = new_conversation();
    assert_eq!(store.member_cursor(c1, bob).await?, (0, 0), "no cursor yet");
    fill(&*store, epoch, c1, alice, "m", 6).await?;

    let step = |kind, device_id: Option<&'static str>, seq| cursors(vec![cursor(c1, bob, device_id, kind, seq)]);
    store.commit(epoch, &step(ReceiptKind::Read, None, 3)).await?;
    assert_eq!(store.member_cursor(c1, bob).await?, (3, 3));
    store.commit(epoch, &step(ReceiptKind::Delivered, None, 1)).await?;
    store.commit(epoch, &step(ReceiptKind::Read, None, 2)).await?;
    assert_eq!(store.member_cursor(c1, bob).await?, (3, 3), "lower seqs change nothing");

    store.commit(epoch, &step(ReceiptKind::Delivered, Some("d1"), 5)).await?;
    store.commit(epoch, &step(ReceiptKind::Delivered, Some("d1"), 2)).await?;
    assert_eq!(store.member_cursor(c1, bob).await?, (5, 3));
    let sync = SyncRequest { user: bob, device: device("d1"), conversations: vec![c1], per_conversation_limit: 10 };
    assert_eq!(seqs(&store.sync(&sync).await?.messages), vec![6], "d1's cursor stayed at 5");

    // Several updates in one batch: the highest wins, whatever the order.
    let batch = cursors(vec![
        cursor(c1, bob, Some("d2"), ReceiptKind::Read, 4),
        cursor(c1, bob, Some("d2"), ReceiptKind::Delivered, 1),
        cursor(c1, bob, None, ReceiptKind::Read, 2),
    ]);
    store.commit(epoch, &batch).await?;
    assert_eq!(store.member_cursor(c1, bob).await?, (5, 4));
    assert_eq!(store.member_cursor(c1, alice).await?, (0, 0), "other members untouched");

    // Messages and cursors in one batch: the cursor may point at a message of the same batch.
    let batch = WriteBatch {
        messages: vec![msg(c1, bob, "reply", "ok")],
        cursors: vec![cursor(c1, bob, None, ReceiptKind::Read, 7)],
    };
    let committed = store.commit(epoch, &batch).await?;
    assert_eq!(ack(&committed.messages[0])?.seq, 7);
    assert_eq!(committed.cursors, vec![7], "applied as asked");
    assert_eq!(store.member_cursor(c1, bob).await?, (7, 7));

    // The future is clamped to the last message, and the commit says so (receipts announce it).
    let ahead = store.commit(epoch, &step(ReceiptKind::Read, Some("d3"), 1_000_000)).await?;
    assert_eq!(ahead.cursors, vec![7], "clamped to the last seq");
    assert_eq!(store.member_cursor(c1, bob).await?, (7, 7));
    let nowhere =
        store.commit(epoch, &cursors(vec![cursor(new_conversation(), bob, None, ReceiptKind::Read, 3)])).await?;
    assert_eq!(nowhere.cursors, vec![0], "a conversation without messages has nothing to acknowledge");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Postgres only
// ---------------------------------------------------------------------------------------------

/// Leases have connections of their own: with the read pool's only connection stuck (a history
/// read waiting on a lock the test holds), a shard's lease is still renewed and read, and another
/// shard acquired. On the shared pool each of them waited for the read, so a burst of reads could
/// hold a renewal past the lease's expiry and cost the node its shards.
#[tokio::test]
async fn postgres_leases_do_not_wait_behind_reads() -> Result<()> {
    let pg = TestPostgres::start().await?;
    let config = StoreConfig::Postgres { url: pg.url().to_string(), pool_size: 1, commit_slots: 1 };
    let stores = parley_storage::open(&config).await?;
    let shard = stores.shard(ShardId(7)).await?;
    let grant = shard.acquire_lease("node-a", LONG_TTL_MS).await?.context("fresh shard")?;

    let mut blocker = pg.connect().await?;
    let tx = blocker.transaction().await?;
    tx.batch_execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE").await?;
    let reader = shard.clone();
    let stuck = tokio::spawn(async move { reader.history(new_conversation(), None, 10).await });
    let watcher = pg.connect().await?;
    let waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'messages'::regclass
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while watcher.query_one(waiting, &[]).await?.get::<_, i64>(0) == 0 {
        ensure!(tokio::time::Instant::now() < deadline, "the read never started waiting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let bound = Duration::from_secs(5);
    tokio::time::timeout(bound, shard.renew_lease("node-a", grant.epoch, LONG_TTL_MS))
        .await
        .context("the renewal waited behind the read")??;
    tokio::time::timeout(bound, shard.lease_info()).await.context("reading the lease waited")??;
    let other = stores.shard(ShardId(8)).await?;
    tokio::time::timeout(bound, other.acquire_lease("node-a", LONG_TTL_MS))
        .await
        .context("the acquire waited behind the read")??
        .context("a free shard")?;
    ensure!(!stuck.is_finished(), "the read was waiting all along");
    tx.rollback().await?;
    let (page, _) = stuck.await??;
    ensure!(page.is_empty(), "the read completes once the lock is gone");
    Ok(())
}

/// Nodes that start together migrate the shared database exactly once (the advisory lock), and
/// every one of them can use it afterwards.
#[tokio::test]
async fn postgres_concurrent_opens_migrate_once() -> Result<()> {
    let pg = TestPostgres::start().await?;
    let config = StoreConfig::Postgres { url: pg.url().to_string(), pool_size: 2, commit_slots: 1 };
    let opened = futures_util::future::join_all((0..4).map(|_| parley_storage::open(&config))).await;
    let nodes = opened.into_iter().collect::<Result<Vec<Stores>, _>>()?;
    let client = pg.connect().await?;
    let versions: Vec<i32> = client
        .query("SELECT version FROM parley_migrations ORDER BY version", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let latest = versions.last().copied().unwrap_or(0);
    assert!(latest >= 1, "migrated: {versions:?}");
    assert_eq!(versions, (1..=latest).collect::<Vec<_>>(), "one row per migration");
    for (i, node) in nodes.iter().enumerate() {
        node.directory.create_user(&user(&format!("user{i}"))).await?;
    }
    assert_eq!(nodes[0].directory.list_users(10).await?.len(), 4);
    Ok(())
}

/// Postgres keeps every shard's counters in one table, so it can see a routing bug the embedded
/// store (one database per shard) cannot: a batch reaching a shard for a conversation another shard
/// counts. The whole batch is refused as corruption and nothing of it is stored, not even its
/// messages for conversations that were fine.
#[tokio::test]
async fn postgres_refuses_a_batch_for_a_conversation_another_shard_counts() -> Result<()> {
    let f = Fixture::postgres().await?;
    let (a, b) = (f.stores.shard(ShardId(3)).await?, f.stores.shard(ShardId(4)).await?);
    let ga = a.acquire_lease("node-a", LONG_TTL_MS).await?.context("fresh shard")?;
    let gb = b.acquire_lease("node-a", LONG_TTL_MS).await?.context("fresh shard")?;
    let alice = UserId::random();
    let (counted_by_a, fine) = (new_conversation(), new_conversation());
    store_one(&*a, ga.epoch, msg(counted_by_a, alice, "a1", "on its own shard"), 1).await?;

    let misrouted = messages(vec![msg(fine, alice, "f1", "fine"), msg(counted_by_a, alice, "a2", "wrong shard")]);
    match b.commit(gb.epoch, &misrouted).await {
        Err(StorageError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(seqs(&b.history(fine, None, 100).await?.0), Vec::<Seq>::new(), "nothing of the batch was stored");
    assert_eq!(seqs(&a.history(counted_by_a, None, 100).await?.0), vec![1]);
    let client = f.postgres_db().context("postgres fixture")?.connect().await?;
    let rows: i64 = client.query_one("SELECT count(*) FROM messages WHERE shard = 4", &[]).await?.get(0);
    assert_eq!(rows, 0, "no row under the refusing shard");
    let counters: i64 = client.query_one("SELECT count(*) FROM shard_conversations WHERE shard = 4", &[]).await?.get(0);
    assert_eq!(counters, 0, "no counter bumped for the batch's good conversation either");

    // The shard still works for a well-routed batch.
    store_one(&*b, gb.epoch, msg(fine, alice, "f1", "fine"), 1).await?;
    Ok(())
}

/// The same misrouted batch committed at the same moment as good batches of other shards: the
/// group commit may put them in one statement, which then fails as a whole; the good batches must
/// still commit and only the misrouted one is refused.
#[tokio::test]
async fn postgres_one_bad_batch_does_not_fail_the_batches_committed_with_it() -> Result<()> {
    let f = Fixture::postgres().await?;
    let a = f.stores.shard(ShardId(3)).await?;
    let ga = a.acquire_lease("node-a", LONG_TTL_MS).await?.context("fresh shard")?;
    let alice = UserId::random();
    let counted_by_a = new_conversation();
    store_one(&*a, ga.epoch, msg(counted_by_a, alice, "a1", "on its own shard"), 1).await?;
    let mut good = Vec::new();
    for shard in 10..16 {
        let (store, epoch) = leased(&f.stores, shard, "node-a").await?;
        good.push((store, epoch, new_conversation()));
    }
    let (bad, bad_epoch, fine) = (&good[0].0, good[0].1, good[0].2);
    let misrouted = messages(vec![msg(fine, alice, "f1", "fine"), msg(counted_by_a, alice, "a2", "wrong shard")]);
    let batches: Vec<WriteBatch> = good[1..]
        .iter()
        .map(|(_, _, c)| messages(vec![msg(*c, alice, "g1", "good"), msg(*c, alice, "g2", "good")]))
        .collect();
    let (bad_result, good_results) = tokio::join!(
        bad.commit(bad_epoch, &misrouted),
        futures_util::future::join_all(
            good[1..].iter().zip(&batches).map(|((store, epoch, _), batch)| store.commit(*epoch, batch))
        )
    );
    match bad_result {
        Err(StorageError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    for (result, (store, _, c)) in good_results.into_iter().zip(&good[1..]) {
        let seqs_acked: Vec<Seq> = result?.messages.iter().map(|r| ack(r).map(|a| a.seq)).collect::<Result<_>>()?;
        assert_eq!(seqs_acked, vec![1, 2]);
        assert_eq!(seqs(&store.history(*c, None, 100).await?.0), vec![1, 2]);
    }
    assert_eq!(seqs(&bad.history(fine, None, 100).await?.0), Vec::<Seq>::new(), "nothing of the bad batch");
    Ok(())
}
