//! The Redis history cache (`parley_storage::cache`) against a real Redis and real stores.
//!
//! Every check is written once and run on both backends by the `both!` macro:
//! `embedded::<check>` (SQLite in a temp dir) and `postgres::<check>` (a fresh database from
//! [`TestPostgres`]), each with its own private [`TestRedis`]. Writes go the way the store actor
//! sends them: `commit`, then `append` of the newly stored messages. The assertions are about
//! behaviour: every page read through the cache equals the page the store returns for the same
//! arguments, and the cache's counters show which path served it (a hit proves Redis answered).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use parley_protocol::frames::MessageView;
use parley_protocol::{ClientMsgId, ConversationId, Epoch, MessageId, Seq, ShardId, UserId};
use parley_storage::{
    now_ms, CacheOptions, CacheStats, MessageResult, NewMessage, RecentCache, ShardCache, ShardStore, StoreConfig,
    Stores, WriteBatch,
};
use parley_tests::postgres::TestPostgres;
use parley_tests::redis::TestRedis;
use parley_tests::{wait_until, TempDir};
use uuid::Uuid;

/// Lease TTL long enough that no lease expires while a check runs.
const LONG_TTL_MS: u64 = 60_000;

/// A small capacity, so that a few hundred messages overflow it many times over.
const CAPACITY: u32 = 32;

/// How long a check waits for the cache to answer again after Redis comes back. Reconnection is
/// attempted at most every 0.5 s; the margin is for a loaded CI box.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// The shard every check writes to (any one will do).
const SHARD: ShardId = ShardId(3);

/// Storage and Redis for one check, and what it takes to tear them down.
struct Fixture {
    stores: Stores,
    redis: TestRedis,
    /// Held only to be dropped with the fixture: the SQLite directory or the Postgres database.
    _backing: Backing,
}

enum Backing {
    Embedded(#[allow(dead_code)] TempDir),
    Postgres(#[allow(dead_code)] TestPostgres),
}

impl Fixture {
    async fn embedded() -> Result<Fixture> {
        let dir = TempDir::new("parley-cache");
        let stores = parley_storage::open(&StoreConfig::Embedded { dir: dir.path().to_path_buf() })
            .await
            .context("open embedded store")?;
        let redis = TestRedis::start().await?;
        Ok(Fixture { stores, redis, _backing: Backing::Embedded(dir) })
    }

    async fn postgres() -> Result<Fixture> {
        let pg = TestPostgres::start().await.context("start test postgres")?;
        let config = StoreConfig::Postgres { url: pg.url().to_string(), pool_size: 4, commit_slots: 1 };
        let stores = parley_storage::open(&config).await.context("open postgres store")?;
        let redis = TestRedis::start().await?;
        Ok(Fixture { stores, redis, _backing: Backing::Postgres(pg) })
    }

    /// A cache on this fixture's Redis, with `capacity`.
    fn cache(&self, capacity: u32) -> Result<RecentCache> {
        Ok(RecentCache::new(&self.redis.url(), CacheOptions { capacity, ..CacheOptions::default() })?)
    }

    /// The shard's store under a freshly acquired lease.
    async fn writer(&self) -> Result<Writer> {
        let store = self.stores.shard(SHARD).await?;
        let epoch = store.acquire_lease("cache-test", LONG_TTL_MS).await?.context("fresh shard lease")?.epoch;
        Ok(Writer { store, epoch, sender: UserId::random(), sent: 0 })
    }
}

/// Runs each named check against both backends.
macro_rules! both {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $check() -> anyhow::Result<()> {
                    let fixture = super::Fixture::embedded().await?;
                    super::$check(fixture).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $check() -> anyhow::Result<()> {
                    let fixture = super::Fixture::postgres().await?;
                    super::$check(fixture).await
                }
            )*
        }
    };
}

both!(
    pages_through_the_cache_equal_the_store,
    a_commit_during_a_fill_is_never_hidden,
    redis_down_falls_back_to_the_store_and_recovers,
    a_new_epoch_does_not_see_the_old_entries,
);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Commits to the shard as its store actor does: commit, then append what was newly stored.
struct Writer {
    store: Arc<dyn ShardStore>,
    epoch: Epoch,
    sender: UserId,
    sent: u64,
}

impl Writer {
    /// A new message to `conversation` with a fresh client id.
    fn message(&mut self, conversation: ConversationId) -> NewMessage {
        self.sent += 1;
        self.retry(conversation, self.sent)
    }

    /// The message with client id number `n` (again): a retry when `n` was sent before.
    fn retry(&self, conversation: ConversationId, n: u64) -> NewMessage {
        NewMessage {
            message_id: MessageId::new(),
            conversation_id: conversation,
            sender: self.sender,
            client_msg_id: ClientMsgId::new(format!("m-{n}")).expect("valid client id"),
            body: format!("message {n}"),
            sent_at_ms: now_ms(),
            media: None,
        }
    }

    /// One new message per entry of `conversations`, in one batch, appended through `cache`.
    async fn send(&mut self, cache: &ShardCache, conversations: &[ConversationId]) -> Result<Vec<MessageView>> {
        let batch = conversations.iter().map(|&c| self.message(c)).collect();
        self.commit(cache, batch).await
    }

    /// Commit `batch` and append its newly stored messages (duplicates are not).
    async fn commit(&self, cache: &ShardCache, batch: Vec<NewMessage>) -> Result<Vec<MessageView>> {
        let committed = self.store.commit(self.epoch, &WriteBatch { messages: batch.clone(), cursors: vec![] }).await?;
        ensure!(committed.messages.len() == batch.len(), "one result per message");
        let mut stored = Vec::new();
        for (message, result) in batch.into_iter().zip(&committed.messages) {
            #[allow(unreachable_patterns)]
            let ack = match result {
                MessageResult::Stored(ack) | MessageResult::Duplicate { ack, .. } => ack,
                other => anyhow::bail!("expected a stored message, got {other:?}"),
            };
            if !ack.duplicate {
                stored.push(MessageView {
                    message_id: ack.message_id,
                    conversation_id: ack.conversation_id,
                    seq: ack.seq,
                    sender: message.sender,
                    client_msg_id: message.client_msg_id,
                    body: message.body,
                    sent_at_ms: ack.sent_at_ms,
                    media: None,
                });
            }
        }
        cache.append(&stored).await;
        Ok(stored)
    }
}

fn new_conversation() -> ConversationId {
    ConversationId(Uuid::new_v4())
}

fn seqs(page: &[MessageView]) -> Vec<Seq> {
    page.iter().map(|m| m.seq).collect()
}

/// The page through the cache must be the store's page, has_more included.
async fn check_page(
    cache: &ShardCache,
    store: &dyn ShardStore,
    conversation: ConversationId,
    before_seq: Option<Seq>,
    limit: u32,
) -> Result<()> {
    let want = store.history(conversation, before_seq, limit).await?;
    let got = cache.history(store, conversation, before_seq, limit).await?;
    ensure!(
        got == want,
        "before {before_seq:?}, limit {limit}: cache gave {:?} (more: {}), store {:?} (more: {})",
        seqs(&got.0),
        got.1,
        seqs(&want.0),
        want.1
    );
    Ok(())
}

/// Check every (before_seq, limit) combination that matters around a conversation of `count`
/// messages: the newest page, pages inside and below the cached range, past the tail, before the
/// first message, limits 0 (clamped to 1) to beyond the stores' clamp.
async fn check_all_pages(
    cache: &ShardCache,
    store: &dyn ShardStore,
    conversation: ConversationId,
    count: u64,
) -> Result<()> {
    let cap = u64::from(CAPACITY);
    let mut befores = vec![None, Some(0), Some(1), Some(2), Some(u64::MAX)];
    for before in [count / 2, count.saturating_sub(cap) + 1, count.saturating_sub(cap), count, count + 1, count + 50] {
        befores.push(Some(before));
    }
    for before in [count.saturating_sub(1), count.saturating_sub(cap - 1)] {
        befores.push(Some(before));
    }
    let limits = [0, 1, 2, 7, CAPACITY - 1, CAPACITY, CAPACITY + 1, 100, 1_000, 5_000];
    for before in befores {
        for limit in limits {
            check_page(cache, store, conversation, before, limit).await?;
        }
    }
    Ok(())
}

/// Send `n` messages in batches of 1 to 12, spread unevenly over `conversations`; count them.
async fn write_random(
    w: &mut Writer,
    cache: &ShardCache,
    rng: &mut Lcg,
    conversations: [ConversationId; 3],
    n: usize,
    counts: &mut HashMap<ConversationId, u64>,
) -> Result<()> {
    let mut left = n;
    while left > 0 {
        let size = (1 + rng.below(12) as usize).min(left);
        let batch: Vec<_> = (0..size)
            .map(|_| match rng.below(20) {
                0..=11 => conversations[0],
                12..=16 => conversations[1],
                _ => conversations[2],
            })
            .collect();
        for stored in w.send(cache, &batch).await? {
            *counts.entry(stored.conversation_id).or_insert(0) += 1;
        }
        left -= size;
    }
    Ok(())
}

/// A tiny deterministic generator: the same "random" batches on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Read the newest page through the cache (it must equal the store's): was it a hit?
async fn served_from_redis(cache: &ShardCache, store: &dyn ShardStore, conversation: ConversationId) -> bool {
    let hits = cache.stats().hits;
    if let Err(e) = check_page(cache, store, conversation, None, 10).await {
        panic!("{e:#}");
    }
    cache.stats().hits > hits
}

fn delta(after: CacheStats, before: CacheStats) -> CacheStats {
    CacheStats {
        hits: after.hits - before.hits,
        misses: after.misses - before.misses,
        fills: after.fills - before.fills,
        errors: after.errors - before.errors,
        abandoned: after.abandoned - before.abandoned,
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// A few hundred messages over several conversations, some cached before they were written and
/// some after: every page through the cache is the store's page, and the newest pages are hits.
async fn pages_through_the_cache_equal_the_store(f: Fixture) -> Result<()> {
    let mut w = f.writer().await?;
    let cache = f.cache(CAPACITY)?.shard(SHARD, w.epoch);
    let store = w.store.clone();
    let store = store.as_ref();
    let [a, b, c, d, empty] = [(); 5].map(|_| new_conversation());
    let mut counts = HashMap::new();
    let mut rng = Lcg(7);
    // Written before anything is cached: the appends only raise `hi`.
    write_random(&mut w, &cache, &mut rng, [a, b, c], 60, &mut counts).await?;
    w.send(&cache, &[d, d, d]).await?;
    for conversation in [a, b, c, d, empty] {
        check_page(&cache, store, conversation, None, 10).await?;
    }
    assert_eq!(cache.stats().fills, 5, "the newest page of each conversation was installed: {:?}", cache.stats());

    // Written while cached: the appends extend the lists (and trim them to the capacity).
    for round in 0..6 {
        write_random(&mut w, &cache, &mut rng, [a, b, c], 40, &mut counts).await?;
        check_page(&cache, store, a, None, 5 + round).await?;
    }
    // A retry of an earlier message and a repeat within a batch: stored once, appended once.
    w.send(&cache, &[b]).await?;
    let retried = w.retry(b, w.sent);
    let fresh = w.message(b);
    let repeat = w.retry(b, w.sent);
    let stored = w.commit(&cache, vec![retried, fresh, repeat]).await?;
    assert_eq!(stored.len(), 1, "only the fresh message is new");
    *counts.entry(b).or_insert(0) += 2;
    counts.insert(d, 3);
    counts.insert(empty, 0);
    assert!(counts[&a] > 2 * u64::from(CAPACITY), "conversation a overflows the capacity: {counts:?}");

    let before = cache.stats();
    check_page(&cache, store, a, None, 10).await?;
    assert_eq!(delta(cache.stats(), before).hits, 1, "the newest page comes from Redis");
    let before = cache.stats();
    check_page(&cache, store, a, Some(10), 5).await?;
    assert_eq!(delta(cache.stats(), before).misses, 1, "a page below the cached range comes from the store");

    for conversation in [a, b, c, d, empty] {
        let before = cache.stats();
        check_all_pages(&cache, store, conversation, counts[&conversation]).await?;
        let swept = delta(cache.stats(), before);
        if counts[&conversation] <= u64::from(CAPACITY) {
            assert_eq!(swept.misses, 0, "the whole conversation is cached: every page is a hit: {swept:?}");
        } else {
            assert!(swept.hits > 0 && swept.misses > 0, "recent pages from Redis, older from the store: {swept:?}");
        }
    }
    let stats = cache.stats();
    assert_eq!((stats.errors, stats.abandoned), (0, 0), "Redis never failed: {stats:?}");
    Ok(())
}

/// A commit (and its append) landing between a fill's store read and its install must never be
/// hidden by the install; installs in the harmless orders go through.
async fn a_commit_during_a_fill_is_never_hidden(f: Fixture) -> Result<()> {
    let mut w = f.writer().await?;
    let cache = f.cache(CAPACITY)?.shard(SHARD, w.epoch);
    let store = w.store.clone();
    let store = store.as_ref();

    // Read, commit, install: the install is refused and the next read shows the commit.
    let a = new_conversation();
    w.send(&cache, &[a; 10]).await?;
    let stale = cache.begin_fill(store, a).await?;
    let late = w.send(&cache, &[a]).await?;
    assert_eq!(seqs(&late), [11]);
    assert!(!cache.finish_fill(&stale).await, "a fill that read before seq 11 was appended is refused");
    assert_eq!(cache.stats().fills, 0);
    check_page(&cache, store, a, None, 50).await?;
    let before = cache.stats();
    let (page, _) = cache.history(store, a, None, 50).await?;
    assert_eq!(delta(cache.stats(), before).hits, 1, "refilled by the read after the refusal");
    assert_eq!(seqs(&page), (1..=11).collect::<Vec<_>>(), "the late commit is served");

    // Read, install, commit: the append extends what the fill installed.
    let b = new_conversation();
    w.send(&cache, &[b; 5]).await?;
    let fill = cache.begin_fill(store, b).await?;
    assert!(cache.finish_fill(&fill).await, "nothing newer was appended: installed");
    w.send(&cache, &[b]).await?;
    let before = cache.stats();
    let (page, _) = cache.history(store, b, None, 50).await?;
    assert_eq!(delta(cache.stats(), before).hits, 1);
    assert_eq!(seqs(&page), (1..=6).collect::<Vec<_>>());

    // Two fills overtaking each other: the older page never replaces the newer one.
    let c = new_conversation();
    w.send(&cache, &[c; 3]).await?;
    let older = cache.begin_fill(store, c).await?;
    w.send(&cache, &[c]).await?;
    let newer = cache.begin_fill(store, c).await?;
    assert!(cache.finish_fill(&newer).await);
    assert!(!cache.finish_fill(&older).await, "the older page is refused");
    let before = cache.stats();
    let (page, _) = cache.history(store, c, None, 50).await?;
    assert_eq!(delta(cache.stats(), before).hits, 1);
    assert_eq!(seqs(&page), (1..=4).collect::<Vec<_>>());

    // An empty conversation is cached as empty, and its first message extends that.
    let d = new_conversation();
    assert!(cache.finish_fill(&cache.begin_fill(store, d).await?).await);
    w.send(&cache, &[d]).await?;
    let before = cache.stats();
    check_page(&cache, store, d, None, 50).await?;
    assert_eq!(delta(cache.stats(), before).hits, 1);
    Ok(())
}

/// Redis killed under a running cache: commits, appends and reads go on with store-correct pages;
/// after a restart the cache refills, including what was committed while Redis was down. A
/// restart while the cache is idle (no append to notice it) is detected too.
async fn redis_down_falls_back_to_the_store_and_recovers(mut f: Fixture) -> Result<()> {
    let mut w = f.writer().await?;
    let cache = f.cache(CAPACITY)?.shard(SHARD, w.epoch);
    let store = w.store.clone();
    let store = store.as_ref();
    let (a, b) = (new_conversation(), new_conversation());
    w.send(&cache, &[a; 40]).await?;
    w.send(&cache, &[b; 5]).await?;
    check_page(&cache, store, a, None, 10).await?;
    check_page(&cache, store, b, None, 10).await?;
    check_page(&cache, store, a, None, 10).await?;
    let before = cache.stats();
    assert!(before.hits >= 1 && before.fills == 2 && before.errors == 0, "{before:?}");

    f.redis.stop();
    for _ in 0..3 {
        w.send(&cache, &[a, a, b]).await?;
        for conversation in [a, b] {
            check_page(&cache, store, conversation, None, 10).await?;
            check_page(&cache, store, conversation, None, 100).await?;
            check_page(&cache, store, conversation, Some(20), 7).await?;
        }
    }
    let down = delta(cache.stats(), before);
    assert_eq!(down.hits, 0, "nothing was served from a dead Redis: {down:?}");
    assert!(down.errors >= 3, "the failed rounds were counted: {down:?}");
    assert!(down.abandoned >= 3, "every failed append abandoned the generation: {down:?}");

    f.redis.restart().await?;
    let before = cache.stats();
    let recovered = wait_until(RECOVERY_TIMEOUT, || served_from_redis(&cache, store, a)).await;
    assert!(recovered, "the cache answers again after the restart: {:?}", delta(cache.stats(), before));
    w.send(&cache, &[a, b, b]).await?;
    let before = cache.stats();
    check_all_pages(&cache, store, a, 40 + 6 + 1).await?;
    check_all_pages(&cache, store, b, 5 + 3 + 2).await?;
    let after = delta(cache.stats(), before);
    assert!(after.hits > 100 && after.errors == 0, "served from Redis again: {after:?}");

    // Restart while idle: the first round fails on the dead connection, the next one reaches a
    // different Redis process (an empty one) and must not trust the old generation's keys.
    f.redis.restart().await?;
    let before = cache.stats();
    let recovered = wait_until(RECOVERY_TIMEOUT, || served_from_redis(&cache, store, b)).await;
    let idle = delta(cache.stats(), before);
    assert!(recovered, "the cache answers again after an idle restart: {idle:?}");
    assert_eq!(idle.abandoned, 1, "the new Redis process was noticed: {idle:?}");
    check_all_pages(&cache, store, b, 10).await?;
    Ok(())
}

/// A new shard actor (new epoch, or the same epoch restarted) starts with an empty cache: it never
/// reads what the previous one wrote, and never writes into it.
async fn a_new_epoch_does_not_see_the_old_entries(f: Fixture) -> Result<()> {
    let mut w = f.writer().await?;
    let redis = f.cache(CAPACITY)?;
    let old = redis.shard(SHARD, w.epoch);
    let store = w.store.clone();
    let store = store.as_ref();
    let a = new_conversation();
    w.send(&old, &[a; 5]).await?;
    check_page(&old, store, a, None, 10).await?;
    check_page(&old, store, a, None, 10).await?;
    assert_eq!((old.stats().fills, old.stats().hits), (1, 1), "{:?}", old.stats());

    let grant = store.acquire_lease("cache-test", LONG_TTL_MS).await?.context("lease taken again")?;
    assert!(grant.epoch > w.epoch, "the epoch moved on");
    w.epoch = grant.epoch;
    let new = redis.shard(SHARD, grant.epoch);
    check_page(&new, store, a, None, 10).await?;
    assert_eq!((new.stats().hits, new.stats().misses), (0, 1), "the old entries are not seen: {:?}", new.stats());

    // The new actor's writes go to its own keys only: the old instance's entry is untouched.
    w.send(&new, &[a; 3]).await?;
    check_page(&new, store, a, None, 10).await?;
    assert_eq!(new.stats().hits, 1, "{:?}", new.stats());
    let (page, _) = old.history(store, a, None, 10).await?;
    assert_eq!(seqs(&page), [1, 2, 3, 4, 5], "the old epoch's keys were not written by the new one");

    // The same epoch again (a restarted shard actor): a fresh generation, so a miss as well.
    let restarted = redis.shard(SHARD, grant.epoch);
    check_page(&restarted, store, a, None, 10).await?;
    assert_eq!((restarted.stats().hits, restarted.stats().misses), (0, 1), "{:?}", restarted.stats());
    Ok(())
}
