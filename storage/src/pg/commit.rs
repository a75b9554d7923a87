//! Group commit: the batches of every shard one [`super::PgBackend`] serves, combined into shared
//! statements.
//!
//! Why. A commit's fixed cost in Postgres (statement start-up, the transaction, WAL, the backend's
//! wake-ups) is several hundred µs of CPU, and with 64 shards each committing on its own a commit
//! carried ≈3 messages at the benchmark's closed loop: Postgres spent 120-140 µs of CPU per
//! message, where 16 shards (≈4x larger batches) needed ≈55 (BENCHMARKS.md, sessions 5 and 7).
//! Fewer shards would buy that at the cost of how far a cluster can spread; combining the batches
//! that wait *at the same moment* buys it without.
//!
//! What stays per shard. Each shard's store actor still decides what its shard writes and under
//! which lease epoch, and hands over one batch at a time (so a group never holds two batches of
//! one shard, and a shard's batches commit in order). Fencing stays per shard: the statement
//! locks the lease row of every shard in the group and writes a shard's rows (messages and
//! cursors) only if that shard's epoch is its batch's; a stale shard of a group writes nothing and
//! gets `StaleEpoch`, the others commit. A group whose statement fails as a whole (one batch's bad
//! row, a serialisation failure) is re-run batch by batch, so one shard's error stays its own.
//!
//! How. [`Committer`] feeds one queue to a dispatcher that keeps at most `commit_slots` groups in
//! flight (`parley_storage::DEFAULT_COMMIT_SLOTS`). When a slot is free it takes the first waiting
//! batch and every other one waiting at that moment (up to [`MAX_GROUP_MESSAGES`]), and commits
//! them as one statement in a task of their own. Under light load a batch finds a free slot and
//! goes alone, with no added wait; under load batches pile up while every slot is busy and the
//! groups grow — group commit, one level above the store actors' own batching. Receipts (cursor
//! updates) ride in the same statement, so every group is one round trip in autocommit.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use parley_protocol::cluster::StoredAck;
use parley_protocol::frames::ReceiptKind;
use parley_protocol::{ConversationId, Epoch, MessageId, Seq, ShardId, UserId};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{distinct, from_db, shard_db, to_db};
use crate::model::*;
use crate::{Result, StorageError};

/// A commit that hits a unique violation, serialisation failure or deadlock is retried this many
/// times in total: a racing writer's rows are visible to the retry, whose dedupe then answers them.
const MAX_COMMIT_ATTEMPTS: u32 = 3;

/// A group stops taking batches once it holds this many messages: one statement's
/// arrays stay a few hundred KB, and one slow group delays a bounded number of sends.
const MAX_GROUP_MESSAGES: usize = 2_000;

/// One shard's batch, waiting for a group.
struct Job {
    shard: ShardId,
    epoch: Epoch,
    batch: WriteBatch,
    reply: oneshot::Sender<Result<Committed>>,
}

/// The queue to a backend's commit dispatcher. Cheap to clone; the dispatcher ends when the last
/// clone is dropped (groups in flight finish). The queue is unbounded in type only: every shard hands over one batch at a time,
/// so it never holds more batches than the node serves shards.
#[derive(Clone)]
pub(super) struct Committer {
    queue: mpsc::UnboundedSender<Job>,
}

impl Committer {
    /// Start the dispatcher of `slots` concurrent groups on `pool` (inside a Tokio runtime).
    pub(super) fn start(pool: Pool, slots: usize) -> Committer {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(pool, rx, slots.max(1)));
        Committer { queue }
    }

    /// Commit `batch` of `shard` under `epoch` (see [`crate::ShardStore::commit`]). Dropping the
    /// future does not withdraw the batch: it may still commit (the outcome is then unknown to the
    /// caller, as with any commit cut short).
    pub(super) async fn commit(&self, shard: ShardId, epoch: Epoch, batch: &WriteBatch) -> Result<Committed> {
        let (reply, answer) = oneshot::channel();
        let job = Job { shard, epoch, batch: batch.clone(), reply };
        self.queue.send(job).map_err(|_| StorageError::Pool("the commit dispatcher has stopped".into()))?;
        answer.await.map_err(|_| StorageError::Pool("a commit group ended without answering".into()))?
    }
}

/// The dispatcher: wait for a free worker slot, then for a batch; take it and every batch waiting
/// at that moment as one group, and commit the group in a task of its own. While every slot is
/// busy, batches wait in the queue — which is what makes the next group large. Ends when the
/// queue closes (every [`Committer`] dropped).
async fn dispatch(pool: Pool, mut queue: mpsc::UnboundedReceiver<Job>, slots: usize) {
    let slots = Arc::new(Semaphore::new(slots));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(first) = queue.recv().await else { return };
        let mut messages = first.batch.messages.len();
        let mut group = vec![first];
        while messages < MAX_GROUP_MESSAGES {
            let Ok(job) = queue.try_recv() else { break };
            messages += job.batch.messages.len();
            group.push(job);
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit_group(&pool, group).await;
            drop(slot);
        });
    }
}

/// Commit a group and answer every batch of it: as one attempt if it has several batches, else
/// (or if that attempt failed as a whole) batch by batch.
async fn commit_group(pool: &Pool, group: Vec<Job>) {
    if group.len() > 1 {
        match attempt(pool, &group).await {
            Ok(results) => {
                for (job, result) in group.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
                return;
            }
            Err(e) => {
                tracing::debug!(batches = group.len(), error = %e, "group commit failed; committing its batches one by one");
            }
        }
    }
    for job in group {
        commit_alone(pool, job).await;
    }
}

/// Commit one batch by itself, retrying what a retry can fix.
async fn commit_alone(pool: &Pool, job: Job) {
    let mut attempt_no = 1;
    let result = loop {
        match attempt(pool, std::slice::from_ref(&job)).await {
            Err(e) if attempt_no < MAX_COMMIT_ATTEMPTS && retryable(&e) => {
                tracing::warn!(shard = %job.shard, attempt = attempt_no, error = %e, "retrying commit");
                attempt_no += 1;
            }
            Err(e) => break Err(e),
            Ok(mut results) => break results.pop().unwrap_or_else(|| Err(StorageError::Corrupt("no result".into()))),
        }
    };
    let _ = job.reply.send(result);
}

/// Whether a failed commit may succeed when run again from the start.
fn retryable(e: &StorageError) -> bool {
    let StorageError::Postgres(e) = e else {
        return false;
    };
    matches!(
        e.code(),
        Some(&SqlState::UNIQUE_VIOLATION)
            | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            | Some(&SqlState::T_R_DEADLOCK_DETECTED)
    )
}

/// One attempt at `jobs`: per batch, its outcome (`StaleEpoch` when its shard's epoch moved);
/// `Err` when the attempt failed as a whole (nothing of it was committed).
///
/// The whole group — messages and cursor updates of every batch — is the one [`COMMIT_SQL`]
/// statement, in autocommit: one statement is its own transaction in Postgres, so the fence's row
/// locks are held to its commit exactly as inside `BEGIN`…`COMMIT`, and there is one round trip
/// per group. (Until session 10 a group with receipts ran as a transaction: `BEGIN`, the
/// statement, then two statements per batch with receipts, one round trip each, then `COMMIT`.)
async fn attempt(pool: &Pool, jobs: &[Job]) -> Result<Vec<Result<Committed>>> {
    // Repeats of an idempotency key inside a batch answer with their first occurrence (the
    // candidate); only candidates go to the server, which tells them stored-before from new.
    // `ord` numbers the group's messages: batch after batch, each in its own order.
    let mut cols = CandidateColumns::default();
    let mut repeats: Vec<Vec<Option<usize>>> = Vec::with_capacity(jobs.len());
    let mut offsets: Vec<usize> = Vec::with_capacity(jobs.len());
    let mut total = 0;
    for job in jobs {
        let messages = &job.batch.messages;
        let mut first_of: HashMap<(ConversationId, UserId, &str), usize> = HashMap::with_capacity(messages.len());
        let mut repeat_of = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            match first_of.entry((m.conversation_id, m.sender, m.client_msg_id.as_str())) {
                std::collections::hash_map::Entry::Occupied(first) => repeat_of.push(Some(*first.get())),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(i);
                    repeat_of.push(None);
                    cols.push(m, shard_db(job.shard), to_db(job.epoch.0), total + i);
                }
            }
        }
        repeats.push(repeat_of);
        offsets.push(total);
        total += messages.len();
    }
    let receipts = CursorColumns::of(jobs);
    let shards: Vec<i32> = distinct(&jobs.iter().map(|j| shard_db(j.shard)).collect::<Vec<_>>());

    let client = pool.get().await?;
    let stmt = client.prepare_cached(COMMIT_SQL).await?;
    let params: [&(dyn ToSql + Sync); 18] = [
        &cols.shards,
        &cols.epochs,
        &cols.conversations,
        &cols.message_ids,
        &cols.senders,
        &cols.client_ids,
        &cols.bodies,
        &cols.sent_at,
        &cols.ords,
        &shards,
        &receipts.shards,
        &receipts.epochs,
        &receipts.conversations,
        &receipts.users,
        &receipts.devices,
        &receipts.delivered,
        &receipts.read,
        &cols.media,
    ];
    let rows = client.query(&stmt, &params).await.map_err(commit_error)?;

    // Three kinds of rows: a fence (no group index, a shard), a receipt conversation's last seq
    // (neither), and a candidate's ack (a group index).
    let mut fences: HashMap<i32, i64> = HashMap::with_capacity(shards.len());
    let mut last_seqs: HashMap<Uuid, i64> = HashMap::new();
    let mut acks: Vec<Option<StoredAck>> = vec![None; total];
    // What a candidate stored before holds (`None` for one stored now: its own body is the original).
    let mut originals: Vec<Option<Original>> = vec![None; total];
    let conversation_at = |index: usize| -> Option<ConversationId> {
        let job = offsets.partition_point(|&o| o <= index).checked_sub(1)?;
        jobs[job].batch.messages.get(index - offsets[job]).map(|m| m.conversation_id)
    };
    for row in &rows {
        let Some(ord) = row.try_get::<_, Option<i64>>(0)? else {
            match row.try_get::<_, Option<i32>>(1)? {
                Some(shard) => fences.insert(shard, row.try_get(2)?),
                None => last_seqs.insert(row.try_get(4)?, row.try_get(3)?),
            };
            continue;
        };
        let bad_index = || StorageError::Corrupt(format!("group index {ord}"));
        let index = usize::try_from(ord).map_err(|_| bad_index())?;
        let conversation_id = conversation_at(index).ok_or_else(bad_index)?;
        let seq: Option<i64> = row.try_get(3)?;
        let seq = seq.ok_or_else(|| StorageError::Corrupt("a stored message without a seq".into()))?;
        let duplicate: bool = row.try_get(6)?;
        acks[index] = Some(StoredAck {
            message_id: MessageId(row.try_get(4)?),
            conversation_id,
            seq: from_db(seq, "seq")?,
            sent_at_ms: row.try_get(5)?,
            duplicate,
        });
        if duplicate {
            let body: String = row.try_get(7)?;
            originals[index] = Some(Original { body, media: crate::media_from_json(row.try_get(8)?)? });
        }
    }

    let mut out = Vec::with_capacity(jobs.len());
    for ((job, repeat_of), offset) in jobs.iter().zip(&repeats).zip(&offsets) {
        let fence = fences.get(&shard_db(job.shard)).copied();
        if fence != Some(to_db(job.epoch.0)) {
            // Nothing of this batch was written (its writes are conditioned on its fence).
            let current = fence.map(|c| from_db(c, "epoch")).transpose()?.unwrap_or(0);
            out.push(Err(StorageError::StaleEpoch { shard: job.shard.0, held: job.epoch.0, current }));
            continue;
        }
        let mut results = Vec::with_capacity(repeat_of.len());
        for (i, repeat) in repeat_of.iter().enumerate() {
            let first = repeat.unwrap_or(i);
            let mut ack =
                acks[offset + first].clone().ok_or_else(|| StorageError::Corrupt("unresolved batch slot".into()))?;
            ack.duplicate |= repeat.is_some();
            if !ack.duplicate {
                results.push(MessageResult::Stored(ack));
                continue;
            }
            // Stored before this commit (the row read back), or by it as this batch's first
            // occurrence of the key (that occurrence's own body).
            let original = originals[offset + first].clone().unwrap_or_else(|| {
                let m = &job.batch.messages[first];
                Original { body: m.body.clone(), media: m.media.clone() }
            });
            results.push(MessageResult::Duplicate { ack, original });
        }
        // Each update as applied: clamped to its conversation's last seq after this commit.
        let cursors = job
            .batch
            .cursors
            .iter()
            .map(|u| from_db(to_db(u.seq).min(last_seqs.get(&u.conversation_id.0).copied().unwrap_or(0)), "seq"))
            .collect::<Result<Vec<Seq>>>()?;
        out.push(Ok(Committed { messages: results, cursors }));
    }
    Ok(out)
}

/// The commit statement of a group of batches: fence, dedupe lookup, seq reservation, insert, and
/// cursor updates.
///
/// - `cand` are the group's distinct idempotency keys (per batch), each with its shard `s`, its
///   batch's epoch `e` and its index in the group (`ord`).
/// - `fence` reads the lease rows of the group's shards (`$10`) `FOR KEY SHARE` (see the `pg`
///   module doc); a candidate or cursor update is written only if its shard's row carries its
///   batch's epoch, so a stale batch writes nothing and the others are unaffected. `KEY SHARE`,
///   the weakest row lock, still conflicts with the `FOR UPDATE` of a lease acquire (which bumps
///   the epoch), but not with a renewal's `UPDATE` of the expiry: commits and renewals of a shard
///   no longer wait for each other.
/// - `old` finds the keys stored before (one index probe each, see "Query shapes" in `pg`).
/// - `fresh` are the rest, each with `back`: how many new messages of its conversation follow it
///   in the group (a conversation belongs to one shard, so to one batch). `bump` raises each
///   counter by its conversation's new messages, in conversation order (two groups touching the
///   same counters cannot deadlock — and never do: a shard has one batch in flight), and returns
///   the new last seq; a new message's seq is that minus its `back`.
/// - A counter row owned by another shard (a routing bug upstream) is not bumped, so its messages
///   get a NULL seq and the statement fails on `messages.seq NOT NULL`; the group is then re-run
///   batch by batch and only the faulty batch is refused ([`commit_error`] reports it as
///   corruption).
/// - `rcpt` are the cursor rows of the fenced batches (merged per row by [`CursorColumns`]);
///   `last` is each of their conversations' last seq *after* this statement (`bump`'s new value,
///   else the stored one; 0 without a counter), to which `cur` clamps them: a client cannot
///   acknowledge messages that do not exist yet. Cursors only move forward (`GREATEST`).
///
/// Output: per fenced shard one row (`ord` NULL, shard, epoch); per candidate its group index,
/// seq, message id, sent-at and whether it was stored before (then also the stored body and
/// media, which the shard pushes again instead of the retry's); per receipt conversation one row
/// (`ord` and shard NULL, last seq, conversation id in the message-id column).
const COMMIT_SQL: &str = "
WITH cand AS (
    SELECT * FROM UNNEST($1::int[], $2::bigint[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[], $7::text[],
                         $8::bigint[], $9::bigint[], $18::text[])
        AS t(s, e, c, m, u, k, b, at, ord, md)
), fence AS (
    SELECT shard, epoch FROM shard_leases WHERE shard = ANY($10::int[]) FOR KEY SHARE
), old AS (
    SELECT cand.ord, x.seq, x.message_id, x.sent_at_ms, x.body, x.media
    FROM cand CROSS JOIN LATERAL (
        SELECT seq, message_id, sent_at_ms, body, media FROM messages
        WHERE conversation_id = cand.c AND sender = cand.u AND client_msg_id = cand.k AND shard = cand.s
        LIMIT 1
    ) x
), fresh AS (
    SELECT cand.*, count(*) OVER (PARTITION BY cand.c ORDER BY cand.ord DESC) - 1 AS back
    FROM cand
    WHERE EXISTS (SELECT 1 FROM fence WHERE fence.shard = cand.s AND fence.epoch = cand.e)
      AND NOT EXISTS (SELECT 1 FROM old WHERE old.ord = cand.ord)
), bump AS (
    INSERT INTO shard_conversations (conversation_id, shard, last_seq)
    SELECT c, s, count(*) FROM fresh GROUP BY c, s ORDER BY c
    ON CONFLICT (conversation_id) DO UPDATE
        SET last_seq = shard_conversations.last_seq + EXCLUDED.last_seq
        WHERE shard_conversations.shard = EXCLUDED.shard
    RETURNING conversation_id, last_seq
), stored AS (
    INSERT INTO messages (shard, conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms, epoch, media)
    SELECT f.s, f.c, b.last_seq - f.back, f.m, f.u, f.k, f.b, f.at, f.e, f.md
    FROM fresh f LEFT JOIN bump b ON b.conversation_id = f.c
    RETURNING 1
), rcpt AS (
    SELECT r.* FROM UNNEST($11::int[], $12::bigint[], $13::uuid[], $14::uuid[], $15::text[], $16::bigint[],
                           $17::bigint[]) WITH ORDINALITY AS r(s, e, c, u, d, dl, rd, n)
    WHERE EXISTS (SELECT 1 FROM fence WHERE fence.shard = r.s AND fence.epoch = r.e)
), last AS (
    SELECT k.c, COALESCE(b.last_seq, sc.last_seq, 0) AS last_seq
    FROM (SELECT DISTINCT c, s FROM rcpt) k
    LEFT JOIN bump b ON b.conversation_id = k.c
    LEFT JOIN LATERAL (
        SELECT last_seq FROM shard_conversations WHERE conversation_id = k.c AND shard = k.s LIMIT 1
    ) sc ON true
), cur AS (
    INSERT INTO cursors (conversation_id, user_id, device_id, delivered_seq, read_seq)
    SELECT r.c, r.u, r.d, LEAST(r.dl, l.last_seq), LEAST(r.rd, l.last_seq)
    FROM rcpt r JOIN last l ON l.c = r.c
    ORDER BY r.n
    ON CONFLICT (conversation_id, user_id, device_id) DO UPDATE SET
        delivered_seq = GREATEST(cursors.delivered_seq, EXCLUDED.delivered_seq),
        read_seq = GREATEST(cursors.read_seq, EXCLUDED.read_seq)
)
SELECT NULL::bigint, shard, epoch, NULL::bigint, NULL::uuid, NULL::bigint, NULL::boolean, NULL::text, NULL::text
FROM fence
UNION ALL
SELECT ord, NULL::int, NULL::bigint, seq, message_id, sent_at_ms, true, body, media FROM old
UNION ALL
SELECT f.ord, NULL::int, NULL::bigint, b.last_seq - f.back, f.m, f.at, false, NULL::text, NULL::text
FROM fresh f JOIN bump b ON b.conversation_id = f.c
UNION ALL
SELECT NULL::bigint, NULL::int, NULL::bigint, last_seq, c, NULL::bigint, NULL::boolean, NULL::text, NULL::text
FROM last";

/// A commit statement's error: a NULL seq means a counter row owned by another shard (see
/// [`COMMIT_SQL`]); anything else is Postgres's own.
fn commit_error(e: tokio_postgres::Error) -> StorageError {
    let foreign_counter = e.as_db_error().is_some_and(|db| {
        db.code() == &SqlState::NOT_NULL_VIOLATION && db.table() == Some("messages") && db.column() == Some("seq")
    });
    if foreign_counter {
        StorageError::Corrupt("a conversation of the batch is counted by another shard".into())
    } else {
        e.into()
    }
}

/// A group's candidates (first occurrences of each batch's idempotency keys) as column arrays.
#[derive(Default)]
struct CandidateColumns<'a> {
    shards: Vec<i32>,
    /// The epoch of the candidate's batch.
    epochs: Vec<i64>,
    conversations: Vec<Uuid>,
    message_ids: Vec<Uuid>,
    senders: Vec<Uuid>,
    client_ids: Vec<&'a str>,
    bodies: Vec<&'a str>,
    sent_at: Vec<i64>,
    /// Index in the group.
    ords: Vec<i64>,
    /// The attachment as JSON (`messages.media`), NULL without one.
    media: Vec<Option<String>>,
}

impl<'a> CandidateColumns<'a> {
    fn push(&mut self, m: &'a NewMessage, shard: i32, epoch: i64, index: usize) {
        self.shards.push(shard);
        self.epochs.push(epoch);
        self.conversations.push(m.conversation_id.0);
        self.message_ids.push(m.message_id.0);
        self.senders.push(m.sender.0);
        self.client_ids.push(m.client_msg_id.as_str());
        self.bodies.push(&m.body);
        self.sent_at.push(m.sent_at_ms);
        self.ords.push(index as i64);
        self.media.push(crate::media_to_json(&m.media));
    }
}

/// A group's cursor updates as the rows they move, in column arrays: a device's update also moves
/// its member-level row (`device_id = ''`), and a read also counts as delivered. Updates of the
/// same row are merged first (one upsert may not touch a row twice); rows are sorted, so that
/// concurrent upserts of overlapping rows would lock them in the same order.
#[derive(Default)]
struct CursorColumns {
    shards: Vec<i32>,
    epochs: Vec<i64>,
    conversations: Vec<Uuid>,
    users: Vec<Uuid>,
    devices: Vec<String>,
    delivered: Vec<i64>,
    read: Vec<i64>,
}

/// A cursor row's key: conversation, user, device (`''` for the member-level row).
type CursorKey = (Uuid, Uuid, String);
/// What a group moves a cursor row to: its shard and batch epoch (for the fence), delivered, read.
type CursorRow = (i32, i64, i64, i64);

impl CursorColumns {
    fn of(jobs: &[Job]) -> CursorColumns {
        // (conversation, user, device) → (shard, epoch, delivered, read). A conversation belongs
        // to one shard, so a row's shard and epoch are those of every update that moves it.
        let mut rows: HashMap<CursorKey, CursorRow> = HashMap::new();
        for job in jobs {
            let (shard, epoch) = (shard_db(job.shard), to_db(job.epoch.0));
            for u in &job.batch.cursors {
                let seq = to_db(u.seq);
                let (delivered, read) = match u.kind {
                    ReceiptKind::Delivered => (seq, 0),
                    ReceiptKind::Read => (seq, seq),
                };
                let mut raise = |device: String| {
                    let e = rows.entry((u.conversation_id.0, u.user.0, device)).or_insert((shard, epoch, 0, 0));
                    e.2 = e.2.max(delivered);
                    e.3 = e.3.max(read);
                };
                raise(String::new());
                if let Some(device) = &u.device {
                    raise(device.as_str().to_string());
                }
            }
        }
        let mut rows: Vec<_> = rows.into_iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut cols = CursorColumns::default();
        for ((conversation, user, device), (shard, epoch, delivered, read)) in rows {
            cols.shards.push(shard);
            cols.epochs.push(epoch);
            cols.conversations.push(conversation);
            cols.users.push(user);
            cols.devices.push(device);
            cols.delivered.push(delivered);
            cols.read.push(read);
        }
        cols
    }
}
