//! History seeding for `parley bench`: one long 1:1 conversation written straight through the
//! storage crate before the nodes start.
//!
//! Millions of messages through the API would take longer than the benchmark itself, and what the
//! history scenario measures is reading, not writing. So the bench does what a shard does, as a
//! shard would: it creates two users (an argon2 hash like registration makes, and a token stored by
//! its hash), indexes the conversation in the directory, takes the shard's lease, commits batches
//! under that epoch, and releases the lease so that the node that should own the shard takes it
//! at once. The rows are the same rows a node would have written.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use parley_protocol::frames::ConversationKind;
use parley_protocol::shard::shard_for;
use parley_protocol::{ClientMsgId, ConversationId, MessageId, UserId};
use parley_storage::{token_hash, NewMessage, StoreConfig, UserRecord, WriteBatch};

/// Messages per seeding transaction: large enough that commit overhead vanishes, small enough
/// that one transaction stays well under a second and a few MB.
const SEED_BATCH: usize = 5_000;
/// Lease the seeder holds while writing, renewed after every batch.
const SEED_LEASE_TTL_MS: u64 = 60_000;
/// Owner name of the seeder's lease (never a node's boot id).
const SEED_OWNER: &str = "parley-bench-seed";
/// Lifetime of the reader's token: the length of any bench run, with room.
const SEED_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Password of the two seeded users (nobody logs in with it; it only has to be valid).
const SEED_PASSWORD: &str = "bench-history";

/// The seeded conversation.
pub(crate) struct Seeded {
    /// Token of one member, for reading.
    pub token: String,
    pub conversation: ConversationId,
    /// Messages stored (the conversation's last seq).
    pub messages: u64,
    pub secs: f64,
}

/// Write `messages` messages of `body_bytes` each into a fresh conversation.
pub(crate) async fn history(
    store: &StoreConfig,
    shard_count: u16,
    messages: u64,
    body_bytes: usize,
    progress: impl Fn(String),
) -> anyhow::Result<Seeded> {
    let started = Instant::now();
    let stores = parley_storage::open(store).await.context("opening the store to seed history")?;
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let hash = crate::auth::hash_password(SEED_PASSWORD.to_string()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = parley_storage::now_ms();
    let mut users = Vec::new();
    for side in ["a", "b"] {
        let user = UserRecord {
            id: UserId::random(),
            username: format!("hist{run}{side}"),
            password_hash: hash.clone(),
            created_at_ms: now,
        };
        stores.directory.create_user(&user).await?;
        users.push(user.id);
    }
    let token = crate::auth::new_token();
    stores.directory.insert_token(&token_hash(&token), users[0], now + SEED_TOKEN_TTL.as_millis() as i64).await?;
    let conversation = ConversationId::direct(users[0], users[1]);
    let mut members = users.clone();
    members.sort();
    stores.directory.add_conversation(conversation, ConversationKind::Direct, &members, now).await?;

    let shard = stores.shard(shard_for(conversation, shard_count)).await?;
    let grant = shard
        .acquire_lease(SEED_OWNER, SEED_LEASE_TTL_MS)
        .await?
        .context("the history shard's lease is held by someone else: seed before the nodes start")?;
    let body: String = "h".repeat(body_bytes.max(1));
    let mut written: u64 = 0;
    let mut last_report = Instant::now();
    while written < messages {
        let n = (messages - written).min(SEED_BATCH as u64);
        let batch = WriteBatch {
            messages: (written..written + n)
                .map(|i| {
                    Ok(NewMessage {
                        message_id: MessageId::new(),
                        conversation_id: conversation,
                        sender: users[(i % 2) as usize],
                        client_msg_id: ClientMsgId::new(format!("seed-{i}"))?,
                        body: body.clone(),
                        sent_at_ms: now,
                        media: None,
                    })
                })
                .collect::<anyhow::Result<_>>()?,
            cursors: Vec::new(),
        };
        shard.commit(grant.epoch, &batch).await.context("seeding a history batch")?;
        shard.renew_lease(SEED_OWNER, grant.epoch, SEED_LEASE_TTL_MS).await?;
        written += n;
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            progress(format!(
                "seeded {written}/{messages} history messages ({:.0}/s)",
                written as f64 / started.elapsed().as_secs_f64()
            ));
        }
    }
    shard.release_lease(SEED_OWNER, grant.epoch).await?;
    Ok(Seeded { token, conversation, messages: written, secs: started.elapsed().as_secs_f64() })
}
