//! The checks of `parley drill`, run once the clients have stopped: what was acked against what
//! is stored, what was stored against what was delivered, the order of both, the epochs the
//! store recorded, and who serves each shard.
//!
//! The judging is done by pure functions over plain data (tested below); the async functions only
//! gather that data: history pages over HTTP (as a member, like any client), `/v1/cluster` from
//! every node, and, read-only, the lease rows and per-message epochs from the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt as _};
use parley_protocol::frames::MessageView;
use parley_protocol::limits::MAX_PAGE;
use parley_protocol::shard::shard_for;
use parley_protocol::{ConversationId, Epoch, MessageId, Seq, ShardId, UserId};
use parley_storage::{ShardStore, Stores};
use tokio::time::Instant;

use super::sim::{SentRecord, SimOutcome};
use super::{cluster_view, say, ClusterView, CHECK_CONCURRENCY};
use crate::client::Client;

/// How long the cluster may take, after the last fault, to agree on one live owner per shard.
/// A restarted node takes its shards back by rendezvous over a few renew intervals.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
const SETTLE_POLL: Duration = Duration::from_millis(200);
/// Attempts per history page, each on the next node.
const HISTORY_ATTEMPTS: usize = 10;
const HISTORY_BACKOFF: Duration = Duration::from_millis(500);
/// One history request; the client's own timeout (30 s) is longer than a check should wait.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pages per conversation: bounds the paging loop against a server that keeps saying `has_more`.
const MAX_HISTORY_PAGES: usize = 10_000;

/// One conversation of the run and its two members.
pub struct Conversation<'a> {
    pub id: ConversationId,
    pub members: [&'a SimOutcome; 2],
}

/// Message-level findings (summed over conversations).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MessageChecks {
    pub acked_lost: u64,
    pub duplicates: u64,
    pub order_violations: u64,
    pub undelivered: u64,
    /// Conversations whose history could not be read.
    pub unverified: u64,
}

/// Shard-level findings.
#[derive(Debug, Default)]
pub struct Ownership {
    pub max_owners_per_shard: u32,
    pub unowned_shards: u32,
    pub lease_mismatches: u32,
}

/// Compare a conversation's stored history (ascending) with what each sender was acked.
/// - order: the stored seqs run 1, 2, 3… (each break counts once); each sender's acked seqs rise
///   in send order.
/// - duplicates: an idempotency key (sender, client_msg_id) stored more than once, and an ack
///   whose seq or message id is not the stored one.
/// - lost: an acked key that is not stored.
pub fn check_history(history: &[MessageView], senders: &[(UserId, &[SentRecord])]) -> MessageChecks {
    let mut c = MessageChecks::default();
    let mut expected = 1;
    for m in history {
        if m.seq != expected {
            c.order_violations += 1;
        }
        expected = m.seq + 1;
    }
    let mut stored: HashMap<(UserId, &str), Vec<&MessageView>> = HashMap::new();
    for m in history {
        stored.entry((m.sender, m.client_msg_id.as_str())).or_default().push(m);
    }
    c.duplicates += stored.values().map(|v| v.len() as u64 - 1).sum::<u64>();
    for (sender, sent) in senders {
        for r in sent.iter() {
            match stored.get(&(*sender, r.client_msg_id.as_str())) {
                None => c.acked_lost += 1,
                Some(copies) => {
                    if !copies.iter().any(|m| m.seq == r.seq && m.message_id == r.message_id) {
                        c.duplicates += 1;
                    }
                }
            }
        }
        c.order_violations += sent.windows(2).filter(|w| w[1].seq <= w[0].seq).count() as u64;
    }
    c
}

/// Acked messages of the partner that this device never received.
pub fn undelivered(partner_sent: &[SentRecord], seen: &HashMap<MessageId, Seq>) -> u64 {
    partner_sent.iter().filter(|r| !seen.contains_key(&r.message_id)).count() as u64
}

/// Rows whose epoch is lower than that of a row with a smaller seq: written by an owner that had
/// already lost the lease to a later one.
pub fn stale_epoch_writes(rows: &[(Seq, Epoch)]) -> u64 {
    let mut highest = Epoch(0);
    let mut stale = 0;
    for (_, epoch) in rows {
        if *epoch < highest {
            stale += 1;
        }
        highest = highest.max(*epoch);
    }
    stale
}

/// Per shard, how many nodes serve it locally by their own account.
pub fn owners_per_shard(views: &[ClusterView], shard_count: u16) -> Vec<u32> {
    let mut owners = vec![0u32; shard_count as usize];
    for view in views {
        for s in &view.shards {
            if s.owner.as_deref() == Some(view.node.as_str()) {
                if let Some(n) = owners.get_mut(s.shard_id as usize) {
                    *n += 1;
                }
            }
        }
    }
    owners
}

/// Every node sees every shard served, each by exactly one node, and they agree on which.
pub fn settled(views: &[ClusterView], shard_count: u16) -> bool {
    if owners_per_shard(views, shard_count).iter().any(|&n| n != 1) {
        return false;
    }
    let mut owner_of: HashMap<u16, &str> = HashMap::new();
    for view in views {
        for s in view.shards.iter().filter(|s| s.owner.as_deref() == Some(view.node.as_str())) {
            owner_of.insert(s.shard_id, &view.node);
        }
    }
    views.iter().all(|v| {
        v.shards.len() == shard_count as usize
            && v.shards
                .iter()
                .all(|s| s.status == "healthy" && s.owner.as_deref() == owner_of.get(&s.shard_id).copied())
    })
}

/// Poll every node's `/v1/cluster` until [`settled`] holds or [`SETTLE_TIMEOUT`] passes; the last
/// views (of the nodes that answered) and whether they settled.
pub async fn settle(nodes: &[Client], shard_count: u16) -> (Vec<ClusterView>, bool) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let answers = futures_util::future::join_all(nodes.iter().map(cluster_view)).await;
        let all_answered = answers.iter().all(Result::is_ok);
        let views: Vec<ClusterView> = answers.into_iter().filter_map(Result::ok).collect();
        if all_answered && settled(&views, shard_count) {
            return (views, true);
        }
        if Instant::now() >= deadline {
            return (views, false);
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// [`settle`], then [`ownership`], again until the leases agree with the views or
/// [`SETTLE_TIMEOUT`] passes; the last views, whether they settled, and the last audit. The views
/// and the lease rows are read one after the other, and a hand-off may start in between: a thawed
/// node rejoining takes shards back, and their leases are released before the other nodes' next
/// announcement. That mismatch is gone at the next audit; one that persists is reported.
pub async fn audit_ownership(
    nodes: &[Client],
    shards: &[Arc<dyn ShardStore>],
    shard_count: u16,
) -> anyhow::Result<(Vec<ClusterView>, bool, Ownership)> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let (views, settled) = settle(nodes, shard_count).await;
        let audit = ownership(&views, shards).await?;
        if (settled && audit.lease_mismatches == 0) || Instant::now() >= deadline {
            return Ok((views, settled, audit));
        }
        say(format!("{} lease rows disagree with the views; auditing again", audit.lease_mismatches));
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Every shard's store, indexed by shard number; opened once for both audits (for SQLite each
/// open is a pair of connections to the shard's file).
pub async fn open_shards(stores: &Stores, shard_count: u16) -> anyhow::Result<Vec<Arc<dyn ShardStore>>> {
    let mut shards = Vec::with_capacity(shard_count as usize);
    for shard in 0..shard_count {
        shards.push(stores.shard(ShardId(shard)).await?);
    }
    Ok(shards)
}

/// One owner per shard, and a lease row that names a live node's current boot (the serving one).
pub async fn ownership(views: &[ClusterView], shards: &[Arc<dyn ShardStore>]) -> anyhow::Result<Ownership> {
    let owners = owners_per_shard(views, shards.len() as u16);
    let mut o = Ownership {
        max_owners_per_shard: owners.iter().copied().max().unwrap_or(0),
        unowned_shards: owners.iter().filter(|&&n| n == 0).count() as u32,
        lease_mismatches: 0,
    };
    for (shard, store) in shards.iter().enumerate() {
        let shard = shard as u16;
        let lease = store.lease_info().await?;
        let serving: Vec<&ClusterView> = views
            .iter()
            .filter(|v| v.shards.iter().any(|s| s.shard_id == shard && s.owner.as_deref() == Some(v.node.as_str())))
            .collect();
        let live_owner = views.iter().find(|v| lease.owner.as_deref() == Some(v.boot_id.as_str()));
        let fine = match (live_owner, serving.as_slice()) {
            (Some(holder), [server]) => holder.node == server.node && lease.expires_at_ms >= lease.now_ms,
            // Unserved shards are reported as unowned; the lease must still be a live node's.
            (Some(_), []) => lease.expires_at_ms >= lease.now_ms,
            _ => false,
        };
        if !fine {
            say(format!(
                "shard {shard}: lease {:?} (epoch {}), served by {:?}",
                lease.owner,
                lease.epoch,
                serving.iter().map(|v| &v.node).collect::<Vec<_>>()
            ));
            o.lease_mismatches += 1;
        }
    }
    Ok(o)
}

/// Fetch every conversation's history and judge it against the acks and the recipients' inboxes.
pub async fn messages(nodes: &[Client], conversations: &[Conversation<'_>]) -> MessageChecks {
    let results: Vec<MessageChecks> = stream::iter(conversations)
        .map(|c| async move {
            let [a, b] = c.members;
            let mut checks = match history(nodes, &a.token, c.id, a.first_node).await {
                Ok(h) => check_history(&h, &[(a.user, a.sent.as_slice()), (b.user, b.sent.as_slice())]),
                Err(e) => {
                    say(format!("conversation {}: history not readable: {e:#}", c.id));
                    MessageChecks { unverified: 1, ..MessageChecks::default() }
                }
            };
            checks.undelivered = undelivered(&b.sent, &a.inbox.seen) + undelivered(&a.sent, &b.inbox.seen);
            if checks != MessageChecks::default() {
                say(format!("conversation {}: {checks:?}", c.id));
            }
            checks
        })
        .buffer_unordered(CHECK_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().fold(MessageChecks::default(), |mut t, c| {
        t.acked_lost += c.acked_lost;
        t.duplicates += c.duplicates;
        t.order_violations += c.order_violations;
        t.undelivered += c.undelivered;
        t.unverified += c.unverified;
        t
    })
}

/// A conversation's whole history in ascending seq, paging backwards from the newest message.
async fn history(
    nodes: &[Client],
    token: &str,
    conversation: ConversationId,
    first_node: usize,
) -> anyhow::Result<Vec<MessageView>> {
    let mut pages = Vec::new();
    let mut before = None;
    for _ in 0..MAX_HISTORY_PAGES {
        let page = page(nodes, token, conversation, before, first_node).await?;
        let oldest = page.messages.first().map(|m| m.seq);
        pages.push(page.messages);
        match (page.has_more, oldest) {
            (true, Some(seq)) => before = Some(seq),
            _ => break,
        }
    }
    pages.reverse();
    Ok(pages.into_iter().flatten().collect())
}

async fn page(
    nodes: &[Client],
    token: &str,
    conversation: ConversationId,
    before: Option<Seq>,
    first_node: usize,
) -> anyhow::Result<parley_protocol::http::HistoryResponse> {
    let mut last = None;
    for attempt in 0..HISTORY_ATTEMPTS {
        let node = &nodes[(first_node + attempt) % nodes.len()];
        match tokio::time::timeout(HISTORY_TIMEOUT, node.history(token, conversation, before, Some(MAX_PAGE))).await {
            Ok(Ok(page)) => return Ok(page),
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some("timed out".to_string()),
        }
        tokio::time::sleep(HISTORY_BACKOFF).await;
    }
    anyhow::bail!("{HISTORY_ATTEMPTS} attempts failed; last: {}", last.unwrap_or_default())
}

/// Audit every conversation's (seq, epoch) rows in the store.
pub async fn stale_epochs(shards: &[Arc<dyn ShardStore>], conversations: &[Conversation<'_>]) -> anyhow::Result<u64> {
    let mut stale = 0;
    for c in conversations {
        let shard = shard_for(c.id, shards.len() as u16);
        let store = shards.get(shard.0 as usize).ok_or_else(|| anyhow::anyhow!("no store for shard {shard}"))?;
        let rows = store.epochs(c.id).await?;
        let n = stale_epoch_writes(&rows);
        if n > 0 {
            say(format!("conversation {}: {n} rows written under a stale epoch: {rows:?}", c.id));
        }
        stale += n;
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::http::ShardView;
    use parley_protocol::ClientMsgId;

    fn stored(sender: UserId, seq: Seq, id: &str) -> MessageView {
        MessageView {
            message_id: MessageId(uuid::Uuid::from_u128(u128::from(seq) << 8 | u128::from(id.len() as u8))),
            conversation_id: ConversationId(uuid::Uuid::nil()),
            seq,
            sender,
            client_msg_id: ClientMsgId::new(id).unwrap(),
            body: String::new(),
            sent_at_ms: 0,
            media: None,
        }
    }

    fn acked(m: &MessageView) -> SentRecord {
        SentRecord { client_msg_id: m.client_msg_id.as_str().to_string(), seq: m.seq, message_id: m.message_id }
    }

    #[test]
    fn history_checks() {
        let a = UserId(uuid::Uuid::from_u128(1));
        let b = UserId(uuid::Uuid::from_u128(2));
        let h = [stored(a, 1, "a1"), stored(b, 2, "b1"), stored(a, 3, "a22")];
        let ok = |c: MessageChecks| c == MessageChecks::default();

        // All acked, all stored once, in order.
        let (sa, sb) = (vec![acked(&h[0]), acked(&h[2])], vec![acked(&h[1])]);
        assert!(ok(check_history(&h, &[(a, &sa), (b, &sb)])));
        // Stored but never acked is fine.
        assert!(ok(check_history(&h, &[(a, &sa[..1]), (b, &[])])));

        let cases: Vec<(Vec<MessageView>, Vec<SentRecord>, MessageChecks)> = vec![
            // An acked message missing.
            (
                vec![h[0].clone()],
                vec![acked(&h[0]), acked(&h[2])],
                MessageChecks { acked_lost: 1, ..Default::default() },
            ),
            // Stored twice under the same key (second copy at seq 2).
            (
                vec![h[0].clone(), stored(a, 2, "a1")],
                vec![acked(&h[0])],
                MessageChecks { duplicates: 1, ..Default::default() },
            ),
            // Acked with another seq than stored.
            (
                vec![h[0].clone()],
                vec![SentRecord { seq: 7, ..acked(&h[0]) }],
                MessageChecks { duplicates: 1, ..Default::default() },
            ),
            // A gap in the stored seqs (1, 3): one break.
            (
                vec![h[0].clone(), h[2].clone()],
                vec![acked(&h[0]), acked(&h[2])],
                MessageChecks { order_violations: 1, ..Default::default() },
            ),
            // Acks out of send order.
            (
                vec![h[0].clone(), h[1].clone(), h[2].clone()],
                vec![acked(&h[2]), acked(&h[0])],
                MessageChecks { order_violations: 1, ..Default::default() },
            ),
        ];
        for (i, (history, sent, want)) in cases.into_iter().enumerate() {
            assert_eq!(check_history(&history, &[(a, &sent)]), want, "case {i}");
        }
    }

    #[test]
    fn undelivered_counts_acked_but_unseen() {
        let a = UserId(uuid::Uuid::from_u128(1));
        let m = [stored(a, 1, "x"), stored(a, 2, "y")];
        let sent: Vec<SentRecord> = m.iter().map(acked).collect();
        let mut seen = HashMap::new();
        assert_eq!(undelivered(&sent, &seen), 2);
        seen.insert(m[1].message_id, 2);
        assert_eq!(undelivered(&sent, &seen), 1);
    }

    #[test]
    fn stale_epochs_are_lower_than_an_earlier_row() {
        let check = |epochs: &[u64], want: u64| {
            let rows: Vec<(Seq, Epoch)> = epochs.iter().enumerate().map(|(i, e)| (i as u64 + 1, Epoch(*e))).collect();
            assert_eq!(stale_epoch_writes(&rows), want, "{epochs:?}");
        };
        check(&[], 0);
        check(&[1, 1, 2, 2, 5], 0);
        check(&[1, 2, 1], 1);
        check(&[3, 1, 2, 3], 2);
    }

    fn view(node: &str, owners: &[&str]) -> ClusterView {
        ClusterView {
            node: node.into(),
            boot_id: format!("{node}#1"),
            shards: owners
                .iter()
                .enumerate()
                .map(|(i, o)| ShardView {
                    shard_id: i as u16,
                    owner: (!o.is_empty()).then(|| o.to_string()),
                    epoch: 1,
                    group: "home".into(),
                    status: if o.is_empty() { "unowned" } else { "healthy" }.into(),
                })
                .collect(),
            redirects: 0,
        }
    }

    #[test]
    fn ownership_from_views() {
        let agreed = [view("n1", &["n1", "n2"]), view("n2", &["n1", "n2"])];
        assert_eq!(owners_per_shard(&agreed, 2), vec![1, 1]);
        assert!(settled(&agreed, 2));

        // A thawed node still believes it serves shard 0.
        let split = [view("n1", &["n1", "n2"]), view("n2", &["n2", "n2"])];
        assert_eq!(owners_per_shard(&split, 2), vec![2, 1]);
        assert!(!settled(&split, 2));

        // Nobody serves shard 1; or the views disagree without a double claim.
        assert!(!settled(&[view("n1", &["n1", ""]), view("n2", &["n1", ""])], 2));
        assert!(!settled(&[view("n1", &["n1", "n2"]), view("n2", &["n1", "n2"]), view("n3", &["n2", "n2"])], 2));
    }
}
