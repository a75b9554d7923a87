//! Recent history of each conversation, cached in Redis in front of a shard's [`ShardStore`].
//!
//! Who talks to it: a shard's store actor. Right after each successful commit, and before the
//! senders are acked, it hands the newly stored messages to [`ShardCache::append`]; its history
//! reads go through [`ShardCache::history`], which answers from Redis when it holds the whole page
//! and from the store otherwise. Operators configure one Redis per group of shards: one
//! [`RecentCache`] per Redis URL, one [`ShardCache`] per shard actor's lifetime.
//!
//! The keys of one conversation, all with a TTL so that Redis memory stays bounded:
//! - `{prefix}:h:{shard}:{epoch}:{generation}:{conversation}`: a list of JSON `MessageView`s, the
//!   conversation's most recent messages (at most `capacity`), ascending and gapless;
//! - `…:t`: the seq of the list's last element, its *tail* (`0` for a conversation known to be
//!   empty). No tail: the conversation is not cached;
//! - `…:hi`: the highest seq any append carried for the conversation, cached or not.
//!
//! Why the cache can never serve a page the store would not:
//! - **Appends extend, or drop.** An append extends a list only when it continues it exactly
//!   (`tail = first − 1`); anything else deletes the entry. A list is therefore always the gapless
//!   suffix of the conversation up to its tail, and since the append runs before the ack, a read
//!   that starts after an ack finds the acked message in any list that exists.
//! - **Fills cannot hide commits.** A fill reads the store first and installs afterwards; a commit
//!   landing in between finds nothing to extend. Its append still raises `hi`, and the install is
//!   refused when `hi` is above the tail of the page the fill read.
//! - **An unknown outcome abandons the generation.** When an append fails or times out nobody
//!   knows what Redis holds, so the shard cache moves to a new random *generation*: every later
//!   read misses and refills from the store, while the old keys expire. The same happens when the
//!   connection comes back to a different Redis process (its `run_id` changed: a restart lost
//!   everything, `hi` included).
//! - **A new shard actor starts clean.** The lease epoch and a random generation are part of every
//!   key, so no actor ever reads what another instance (an older owner, a restart) wrote.
//!
//! Every Redis round is bounded by `op_timeout`; past it the caller goes on without the cache.
//!
//! Operators: Redis must not evict these keys before their TTL (`maxmemory-policy noeviction`, or
//! enough memory). A `hi` evicted while a fill is in flight would let that fill hide a commit; a
//! full Redis with `noeviction` refuses the append instead, which abandons the generation.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use parley_protocol::frames::MessageView;
use parley_protocol::{ConversationId, Epoch, Seq, ShardId};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, InfoDict, RedisError, RedisResult, Script};
use tokio::time::Instant;

use crate::{Result, ShardStore, StorageError};

/// Pages are clamped exactly as the stores clamp them, so that a page read through the cache is
/// the page the store would have returned.
const MAX_ROWS: u32 = crate::sqlite::MAX_ROWS;
const _: () = assert!(crate::sqlite::MAX_ROWS == crate::pg::MAX_ROWS, "both stores clamp pages alike");

/// Most messages kept per conversation. A fill installs one store page, which is at most
/// `MAX_ROWS`; this also keeps every Lua `unpack` far below Lua's 8000-value stack limit.
const MAX_CAPACITY: u32 = MAX_ROWS;

/// Shortest TTL accepted. `hi` must outlive any fill that read the store before the append that
/// raised it, i.e. a store read plus one Redis round: far below a minute.
const MIN_TTL_MS: u64 = 60_000;

/// After a connection attempt starts, other rounds fail at once for this long instead of each
/// trying (against an unreachable host, each would wait `op_timeout`). Short enough that the cache
/// is back within a second of Redis.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// Seqs travel to Lua as numbers, which are doubles: exact up to 2^53. Larger bounds are clamped
/// (a conversation never gets anywhere near that many messages).
const LUA_MAX_SEQ: Seq = (1 << 53) - 1;

/// Append a commit's messages, for any number of conversations, in one atomic round.
/// KEYS: per conversation its list, tail and hi keys. ARGV: capacity, TTL (ms), then per
/// conversation: first seq, last seq, count n, then the n encoded messages (n = 0: the seqs are
/// not contiguous; drop the entry unless it already contains them).
const APPEND_LUA: &str = r#"
local cap = tonumber(ARGV[1])
local ttl = ARGV[2]
local a = 3
for k = 1, #KEYS, 3 do
  local list, tail, high = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local first, last, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if last > tonumber(redis.call('GET', high) or '0') then
    redis.call('SET', high, ARGV[a + 1], 'PX', ttl)
  else
    redis.call('PEXPIRE', high, ttl)
  end
  local t = redis.call('GET', tail)
  if t then
    t = tonumber(t)
    if t >= last then
      -- Already contained (a fill read the store after this commit).
    elseif n > 0 and t == first - 1 then
      redis.call('RPUSH', list, unpack(ARGV, a + 3, a + 2 + n))
      redis.call('LTRIM', list, -cap, -1)
      redis.call('PEXPIRE', list, ttl)
      redis.call('SET', tail, ARGV[a + 1], 'PX', ttl)
    else
      redis.call('DEL', list, tail)
    end
  end
  a = a + 3 + n
end
return 1
"#;

/// Install a page read from the store, unless a commit the page may lack was appended meanwhile
/// (`hi` above its tail) or the entry is already at least as fresh. Returns 1 if installed.
/// KEYS: list, tail, hi. ARGV: the page's tail seq (0: empty conversation), TTL (ms), then the
/// encoded messages, ascending.
const FILL_LUA: &str = r#"
local tail = tonumber(ARGV[1])
local n = #ARGV - 2
local hi = redis.call('GET', KEYS[3])
if hi and tonumber(hi) > tail then return 0 end
local t = redis.call('GET', KEYS[2])
if t then
  t = tonumber(t)
  if t > tail or (t == tail and redis.call('LLEN', KEYS[1]) >= n) then return 0 end
end
redis.call('DEL', KEYS[1])
if n > 0 then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Read one page if the cached range holds all of it. KEYS: list, tail. ARGV: the highest seq
/// wanted (before_seq − 1, or "no bound"), the page size (already clamped like the stores do).
/// Returns {status, detail, messages, bottom}: {0, 0, {}, 0} not cached; {1, n, {}, 0} cached (n
/// messages) but not deep enough; {2, has_more, messages, bottom} the page, from seq `bottom`.
const READ_LUA: &str = r#"
local t = redis.call('GET', KEYS[2])
if not t then return {0, 0, {}, 0} end
t = tonumber(t)
local n = redis.call('LLEN', KEYS[1])
local top = math.min(tonumber(ARGV[1]), t)
if top < 1 then return {2, 0, {}, 1} end
local bottom = math.max(1, top - tonumber(ARGV[2]) + 1)
local low = t - n + 1
if bottom < low then return {1, n, {}, 0} end
local more = 0
if bottom > 1 then more = 1 end
return {2, more, redis.call('LRANGE', KEYS[1], bottom - low, top - low), bottom}
"#;

/// How the cache behaves; one set per Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// Most recent messages kept per conversation: what a chat window shows on open, with room to
    /// scroll a little. Clamped to 1..=1000 (a fill installs one store page).
    pub capacity: u32,
    /// Lifetime of every key, refreshed by appends: keeps Redis memory bounded by the
    /// conversations active within it, and lets abandoned generations disappear. At least 60 s.
    pub ttl_ms: u64,
    /// Longest any Redis round may take: a slow Redis never stalls a commit or a read for longer.
    pub op_timeout: Duration,
    /// First component of every key, so several deployments can share one Redis.
    pub key_prefix: String,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            capacity: 200,
            ttl_ms: 60 * 60 * 1_000,
            op_timeout: Duration::from_millis(250),
            key_prefix: "parley".into(),
        }
    }
}

/// What a shard cache did so far (for tests and logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads answered from Redis.
    pub hits: u64,
    /// Reads answered from the store (not cached, not deep enough, or Redis failing).
    pub misses: u64,
    /// Pages installed after a miss.
    pub fills: u64,
    /// Redis rounds that failed or timed out, and cached entries that did not decode.
    pub errors: u64,
    /// Generations given up (an append with an unknown outcome, or a different Redis process).
    pub abandoned: u64,
}

/// The cache in one Redis. Cheap to clone; connects lazily and reconnects by itself.
#[derive(Clone)]
pub struct RecentCache {
    inner: Arc<Inner>,
}

/// The cache of one shard actor's lifetime under one lease epoch. Clones share everything, so the
/// store actor can hand one to each spawned read.
#[derive(Clone)]
pub struct ShardCache {
    inner: Arc<Inner>,
    shard: ShardId,
    epoch: Epoch,
    state: Arc<ShardState>,
}

/// A store page read for a fill, not yet installed. Exposed (hidden) so that tests can put a
/// commit between the two halves of a fill.
#[doc(hidden)]
pub struct PendingFill {
    generation: u64,
    conversation: ConversationId,
    page: Vec<MessageView>,
    has_more: bool,
}

struct Inner {
    options: CacheOptions,
    link: Link,
    append: Script,
    fill: Script,
    read: Script,
    /// Whether the last round failed: one warning per outage rather than one per operation.
    failing: AtomicBool,
}

struct ShardState {
    generation: Mutex<Generation>,
    counters: Counters,
}

/// The key space a shard cache currently reads and writes.
#[derive(Clone, Copy)]
struct Generation {
    id: u64,
    /// The Redis process (see [`LinkState::incarnation`]) its keys live in; `None` until first used.
    server: Option<u64>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    errors: AtomicU64,
    abandoned: AtomicU64,
}

/// The keys of one conversation in one generation.
struct Keys {
    list: String,
    tail: String,
    high: String,
}

/// One conversation's share of an append.
struct Run {
    conversation: ConversationId,
    first: Seq,
    last: Seq,
    /// The last `capacity` messages, encoded; empty when the seqs are not contiguous.
    entries: Vec<String>,
}

/// What the read script found.
enum Lookup {
    Hit {
        page: Vec<MessageView>,
        has_more: bool,
    },
    /// `fillable`: a fill could make the entry serve more (absent, or shorter than `capacity`).
    Miss {
        fillable: bool,
    },
}

/// The connection to one Redis, made lazily and remade after it breaks.
struct Link {
    client: redis::Client,
    config: AsyncConnectionConfig,
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    current: Option<Connected>,
    /// `run_id` of the Redis process last connected to.
    run_id: Option<String>,
    /// Bumped whenever a new connection reaches a different Redis process than the previous one:
    /// keys written before may be gone.
    incarnation: u64,
    /// Numbers connections, so a failing round drops only the connection it used.
    serial: u64,
    /// No new connection attempt before this instant.
    retry_at: Option<Instant>,
}

#[derive(Clone)]
struct Connected {
    connection: MultiplexedConnection,
    incarnation: u64,
    serial: u64,
}

impl RecentCache {
    /// Err only for an invalid URL: Redis being down at start must not stop a node, so nothing is
    /// connected here; the first round connects, and rounds after a broken connection reconnect.
    pub fn new(url: &str, options: CacheOptions) -> Result<RecentCache> {
        let client = redis::Client::open(url)?;
        let options = CacheOptions {
            capacity: options.capacity.clamp(1, MAX_CAPACITY),
            ttl_ms: options.ttl_ms.max(MIN_TTL_MS),
            ..options
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.op_timeout))
            .set_response_timeout(Some(options.op_timeout));
        let link = Link { client, config, state: Mutex::new(LinkState::default()) };
        Ok(RecentCache {
            inner: Arc::new(Inner {
                options,
                link,
                append: Script::new(APPEND_LUA),
                fill: Script::new(FILL_LUA),
                read: Script::new(READ_LUA),
                failing: AtomicBool::new(false),
            }),
        })
    }

    /// The cache of one shard actor's lifetime under `epoch`. Starts in a fresh random
    /// generation, so it never reads what another instance wrote.
    pub fn shard(&self, shard: ShardId, epoch: Epoch) -> ShardCache {
        ShardCache {
            inner: self.inner.clone(),
            shard,
            epoch,
            state: Arc::new(ShardState { generation: Mutex::new(Generation::fresh()), counters: Counters::default() }),
        }
    }
}

impl ShardCache {
    /// Called by the store actor right after a successful commit and before the senders are acked
    /// (read-your-writes), with the newly stored (non-duplicate) messages of the batch, ascending
    /// seq per conversation (may span several conversations). One round trip per batch. Never
    /// fails to the caller: on any error or timeout the outcome in Redis is unknown, so the current
    /// generation is abandoned and every later read misses until refilled.
    pub async fn append(&self, messages: &[MessageView]) {
        if messages.is_empty() {
            return;
        }
        let outcome = match runs(messages, self.inner.options.capacity) {
            Ok(runs) => {
                self.round(|mut connection, generation| async move {
                    let mut invocation = self.inner.append.prepare_invoke();
                    invocation.arg(self.inner.options.capacity).arg(self.inner.options.ttl_ms);
                    for run in &runs {
                        let keys = self.keys(generation, run.conversation);
                        invocation.key(keys.list).key(keys.tail).key(keys.high);
                        invocation.arg(run.first).arg(run.last).arg(run.entries.len());
                        for entry in &run.entries {
                            invocation.arg(entry);
                        }
                    }
                    invocation.invoke_async::<i64>(&mut connection).await
                })
                .await
            }
            Err(e) => {
                self.state.counters.errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        };
        if let Err(e) = outcome {
            tracing::debug!(shard = %self.shard, error = %e, "history cache append failed; abandoning generation");
            self.abandon();
        }
    }

    /// History through the cache, with exactly the semantics of
    /// `store.history(conversation, before_seq, limit)` (same page, same `has_more`). Falls back
    /// to `store` on a miss, an error or a timeout; a miss on the newest page (`before_seq` =
    /// `None`) also fills the cache from what the store returned.
    pub async fn history(
        &self,
        store: &dyn ShardStore,
        conversation: ConversationId,
        before_seq: Option<Seq>,
        limit: u32,
    ) -> Result<(Vec<MessageView>, bool)> {
        let limit = limit.clamp(1, MAX_ROWS);
        let found = self.lookup(conversation, before_seq, limit).await;
        if let Ok((_, Lookup::Hit { page, has_more })) = found {
            self.state.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((page, has_more));
        }
        self.state.counters.misses.fetch_add(1, Ordering::Relaxed);
        match found {
            Ok((generation, Lookup::Miss { fillable: true })) if before_seq.is_none() => {
                let fill = self.read_for_fill(generation, store, conversation, limit).await?;
                self.install(&fill).await;
                let start = fill.page.len().saturating_sub(limit as usize);
                Ok((fill.page[start..].to_vec(), fill.has_more || start > 0))
            }
            _ => store.history(conversation, before_seq, limit).await,
        }
    }

    /// Counters since this shard cache was made (shared by its clones).
    pub fn stats(&self) -> CacheStats {
        let c = &self.state.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            fills: c.fills.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
        }
    }

    /// First half of a fill, as a read miss runs it: note the generation, then read the newest
    /// page from the store. For tests that put a commit between the halves.
    #[doc(hidden)]
    pub async fn begin_fill(&self, store: &dyn ShardStore, conversation: ConversationId) -> Result<PendingFill> {
        let generation = self.lock_generation().id;
        self.read_for_fill(generation, store, conversation, 1).await
    }

    /// Second half of a fill: install the page unless something newer was appended meanwhile or
    /// the generation changed. True if installed.
    #[doc(hidden)]
    pub async fn finish_fill(&self, fill: &PendingFill) -> bool {
        self.install(fill).await
    }

    /// The read script, under the generation current for the connection it runs on.
    async fn lookup(&self, conversation: ConversationId, before_seq: Option<Seq>, limit: u32) -> Result<(u64, Lookup)> {
        let top = before_seq.map_or(LUA_MAX_SEQ, |before| before.saturating_sub(1).min(LUA_MAX_SEQ));
        let (generation, (status, detail, entries, bottom)) = self
            .round(|mut connection, generation| async move {
                let keys = self.keys(generation, conversation);
                let reply: (i64, i64, Vec<Vec<u8>>, u64) = self
                    .inner
                    .read
                    .key(keys.list)
                    .key(keys.tail)
                    .arg(top)
                    .arg(limit)
                    .invoke_async(&mut connection)
                    .await?;
                Ok((generation, reply))
            })
            .await?;
        let lookup = match status {
            2 => match decode_page(conversation, bottom, &entries) {
                Ok(page) => Lookup::Hit { page, has_more: detail == 1 },
                Err(e) => {
                    self.state.counters.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            },
            1 => Lookup::Miss { fillable: detail < i64::from(self.inner.options.capacity) },
            _ => Lookup::Miss { fillable: true },
        };
        Ok((generation, lookup))
    }

    /// Read the newest page from the store: enough to install `capacity` messages and to serve
    /// `limit` of them.
    async fn read_for_fill(
        &self,
        generation: u64,
        store: &dyn ShardStore,
        conversation: ConversationId,
        limit: u32,
    ) -> Result<PendingFill> {
        let rows = limit.max(self.inner.options.capacity);
        let (page, has_more) = store.history(conversation, None, rows).await?;
        Ok(PendingFill { generation, conversation, page, has_more })
    }

    /// Install the newest `capacity` messages of a fill's page, in the generation the fill
    /// started in and only if that is still the current one. True if installed.
    async fn install(&self, fill: &PendingFill) -> bool {
        let keep = &fill.page[fill.page.len().saturating_sub(self.inner.options.capacity as usize)..];
        // The list must be the gapless suffix ending at the tail; a page that is not (it cannot
        // happen with gapless seqs) is simply not cached.
        let gapless = keep.windows(2).all(|w| w[1].seq == w[0].seq + 1);
        if !gapless || keep.iter().any(|m| m.conversation_id != fill.conversation) {
            return false;
        }
        let tail = keep.last().map_or(0, |m| m.seq);
        let entries = match keep.iter().map(encode).collect::<Result<Vec<_>>>() {
            Ok(entries) => entries,
            Err(_) => {
                self.state.counters.errors.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        let installed = self
            .round(|mut connection, generation| async move {
                if generation != fill.generation {
                    // Abandoned, or Redis restarted, since the store read: the keys this page
                    // would go to are no longer read, and the new generation's `hi` knows nothing
                    // of commits that landed before it began.
                    return Ok(false);
                }
                let keys = self.keys(generation, fill.conversation);
                let mut invocation = self.inner.fill.prepare_invoke();
                invocation.key(keys.list).key(keys.tail).key(keys.high).arg(tail).arg(self.inner.options.ttl_ms);
                for entry in &entries {
                    invocation.arg(entry);
                }
                Ok(invocation.invoke_async::<i64>(&mut connection).await? == 1)
            })
            .await
            .unwrap_or(false);
        if installed {
            self.state.counters.fills.fetch_add(1, Ordering::Relaxed);
        }
        installed
    }

    /// One Redis round, bounded by `op_timeout`. `f` gets the connection and the generation
    /// current for the Redis process behind it. Failures are counted and logged here.
    async fn round<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(MultiplexedConnection, u64) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let timeout = self.inner.options.op_timeout;
        let mut used = None;
        let attempt = async {
            let link = self.inner.link.get().await?;
            used = Some(link.serial);
            let generation = self.generation_for(link.incarnation);
            f(link.connection, generation).await
        };
        let outcome = tokio::time::timeout(timeout, attempt).await;
        let error = match outcome {
            Ok(Ok(value)) => {
                if self.inner.failing.load(Ordering::Relaxed) && self.inner.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis history cache answers again");
                }
                return Ok(value);
            }
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_timeout() {
                    used.inspect(|&serial| self.inner.link.discard(serial));
                }
                StorageError::Redis(e)
            }
            Err(_) => {
                // The connection may be stuck; a fresh one costs little.
                used.inspect(|&serial| self.inner.link.discard(serial));
                StorageError::RedisTimeout(timeout)
            }
        };
        self.state.counters.errors.fetch_add(1, Ordering::Relaxed);
        if !self.inner.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(shard = %self.shard, error = %error, "redis history cache failing; reads go to the store");
        }
        Err(error)
    }

    /// The current generation's id, after checking it lives in the Redis process `incarnation`;
    /// if it lived in another one, its keys may be gone (hi included): start a new generation.
    fn generation_for(&self, incarnation: u64) -> u64 {
        let mut generation = self.lock_generation();
        match generation.server {
            None => generation.server = Some(incarnation),
            Some(server) if server != incarnation => {
                *generation = Generation { id: random_id(), server: Some(incarnation) };
                self.state.counters.abandoned.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(shard = %self.shard, "a different redis process answers; new cache generation");
            }
            Some(_) => {}
        }
        generation.id
    }

    /// Give up the current generation: its keys are never read again and expire by TTL.
    fn abandon(&self) {
        *self.lock_generation() = Generation::fresh();
        self.state.counters.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    fn lock_generation(&self) -> MutexGuard<'_, Generation> {
        // Plain data, consistent at every instant: a panic elsewhere cannot leave it half-written.
        self.state.generation.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn keys(&self, generation: u64, conversation: ConversationId) -> Keys {
        let list =
            format!("{}:h:{}:{}:{generation}:{conversation}", self.inner.options.key_prefix, self.shard, self.epoch);
        Keys { tail: format!("{list}:t"), high: format!("{list}:hi"), list }
    }
}

impl Generation {
    fn fresh() -> Generation {
        Generation { id: random_id(), server: None }
    }
}

impl Link {
    /// The live connection, or a new one (at most one attempt per [`RECONNECT_BACKOFF`]).
    async fn get(&self) -> RedisResult<Connected> {
        {
            let mut state = self.lock();
            if let Some(connected) = &state.current {
                return Ok(connected.clone());
            }
            let now = Instant::now();
            if state.retry_at.is_some_and(|at| now < at) {
                return Err(RedisError::from((
                    ErrorKind::Io,
                    "no redis connection: an attempt is under way or failed moments ago",
                )));
            }
            state.retry_at = Some(now + RECONNECT_BACKOFF);
        }
        let mut connection = self.client.get_multiplexed_async_connection_with_config(&self.config).await?;
        let info: InfoDict = redis::cmd("INFO").arg("server").query_async(&mut connection).await?;
        // A server without a run_id counts as a new process on every connection (safe, if slower).
        let run_id = info.get::<String>("run_id").unwrap_or_default();
        let mut state = self.lock();
        if run_id.is_empty() || state.run_id.as_deref() != Some(run_id.as_str()) {
            state.incarnation += 1;
            state.run_id = Some(run_id);
        }
        state.serial += 1;
        let connected = Connected { connection, incarnation: state.incarnation, serial: state.serial };
        state.current = Some(connected.clone());
        state.retry_at = None;
        Ok(connected)
    }

    /// Forget connection `serial` (if still the current one): the next round reconnects.
    fn discard(&self, serial: u64) {
        let mut state = self.lock();
        if state.current.as_ref().is_some_and(|c| c.serial == serial) {
            state.current = None;
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Plain data, consistent at every instant: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Split a commit's messages by conversation, each run ascending.
fn runs(messages: &[MessageView], capacity: u32) -> Result<Vec<Run>> {
    let mut by_conversation: BTreeMap<ConversationId, Vec<&MessageView>> = BTreeMap::new();
    for message in messages {
        by_conversation.entry(message.conversation_id).or_default().push(message);
    }
    let mut runs = Vec::with_capacity(by_conversation.len());
    for (conversation, mut run) in by_conversation {
        run.sort_by_key(|m| m.seq);
        run.dedup_by_key(|m| m.seq);
        let (first, last) = (run[0].seq, run[run.len() - 1].seq);
        let contiguous = run.windows(2).all(|w| w[1].seq == w[0].seq + 1);
        let entries = if contiguous {
            // Pushing the last `capacity` is enough: the list is trimmed to them anyway.
            run[run.len().saturating_sub(capacity as usize)..].iter().map(|m| encode(m)).collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        runs.push(Run { conversation, first, last, entries });
    }
    Ok(runs)
}

fn encode(message: &MessageView) -> Result<String> {
    serde_json::to_string(message).map_err(|e| StorageError::Corrupt(format!("history cache entry: {e}")))
}

/// Decode a cached page and check it is what the script said: `conversation`'s messages from seq
/// `bottom`, gapless.
fn decode_page(conversation: ConversationId, bottom: u64, entries: &[Vec<u8>]) -> Result<Vec<MessageView>> {
    let mut page = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let message: MessageView =
            serde_json::from_slice(entry).map_err(|e| StorageError::Corrupt(format!("history cache entry: {e}")))?;
        if message.conversation_id != conversation || message.seq != bottom + i as u64 {
            return Err(StorageError::Corrupt(format!(
                "history cache entry {i} of {conversation} from {bottom} holds seq {} of {}",
                message.seq, message.conversation_id
            )));
        }
        page.push(message);
    }
    Ok(page)
}

/// A random 64-bit id. Both halves of a v4 UUID XORed: each fixed version/variant bit lands on a
/// random bit of the other half.
fn random_id() -> u64 {
    let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
    a ^ b
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::{ClientMsgId, MessageId, UserId};

    fn message(conversation: ConversationId, seq: Seq) -> MessageView {
        MessageView {
            message_id: MessageId::new(),
            conversation_id: conversation,
            seq,
            sender: UserId::random(),
            client_msg_id: ClientMsgId::new(format!("m-{seq}")).expect("valid id"),
            body: format!("body {seq}"),
            sent_at_ms: 0,
            media: None,
        }
    }

    /// The store actor spawns reads and awaits appends inside its handlers: both futures must be
    /// `Send`. Never called; compiling it is the check.
    #[allow(dead_code)]
    fn futures_are_send(cache: &ShardCache, store: &dyn ShardStore) {
        fn send<T: Send>(_: &T) {}
        send(&cache.history(store, ConversationId(uuid::Uuid::nil()), None, 1));
        send(&cache.append(&[]));
    }

    #[test]
    fn runs_group_by_conversation_and_detect_gaps() {
        let (a, b) = (ConversationId(uuid::Uuid::new_v4()), ConversationId(uuid::Uuid::new_v4()));
        let batch = [message(a, 5), message(b, 1), message(a, 6), message(b, 3), message(a, 7)];
        let check = |conversation, first, last, entries| {
            let runs = runs(&batch, 2).expect("encodes");
            let run = runs.iter().find(|r| r.conversation == conversation).expect("a run per conversation");
            assert_eq!((run.first, run.last, run.entries.len()), (first, last, entries));
        };
        check(a, 5, 7, 2); // contiguous: only the last `capacity` are pushed
        check(b, 1, 3, 0); // a gap: nothing pushed, the entry is dropped
    }

    #[test]
    fn pages_decode_only_when_gapless_from_bottom() {
        let a = ConversationId(uuid::Uuid::new_v4());
        let encoded =
            |seqs: &[Seq]| seqs.iter().map(|&s| encode(&message(a, s)).unwrap().into_bytes()).collect::<Vec<_>>();
        assert_eq!(decode_page(a, 3, &encoded(&[3, 4, 5])).unwrap().len(), 3);
        assert!(decode_page(a, 3, &encoded(&[3, 5])).is_err());
        assert!(decode_page(a, 2, &encoded(&[3, 4])).is_err());
        assert!(decode_page(ConversationId(uuid::Uuid::new_v4()), 3, &encoded(&[3])).is_err());
        assert!(decode_page(a, 1, &[b"not json".to_vec()]).is_err());
    }
}
