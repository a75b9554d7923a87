//! A node's cache of conversation records, read on every send to find the members.
//!
//! Direct conversations never change, so they stay until the cache is cleared. Groups change, so
//! a group's entry is dropped when a change is announced (`forget`) and expires after
//! `group_ttl` in case that announcement was lost.
//!
//! The race this type exists to close: a reader misses, reads the directory (slow, awaited) and
//! then stores what it read. If a group change's `forget` lands while that read is in flight,
//! storing the record afterwards would put the *old* member list back, and it would be used until
//! the TTL ran out. So a reader takes a [`Ticket`] before it reads and stores with it; any
//! `forget` in between makes the store a no-op (the record is still returned to that one reader,
//! whose request raced with the change anyway).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use parley_protocol::frames::ConversationKind;
use parley_protocol::ConversationId;
use parley_storage::ConversationRecord;

pub struct ConversationCache {
    inner: Mutex<Inner>,
    max_entries: usize,
    group_ttl: Duration,
}

struct Inner {
    records: HashMap<ConversationId, (Arc<ConversationRecord>, Instant)>,
    /// Bumped by every `forget`. One counter for all ids: forgets are rare (group changes), and
    /// a reader that loses its store to an unrelated forget only reads again next time.
    forgets: u64,
}

/// Taken before a directory read, handed back to [`ConversationCache::remember`].
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

impl ConversationCache {
    pub fn new(max_entries: usize, group_ttl: Duration) -> Self {
        ConversationCache { inner: Mutex::new(Inner { records: HashMap::new(), forgets: 0 }), max_entries, group_ttl }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached record, unless it is a group read longer than `group_ttl` ago.
    pub fn get(&self, id: ConversationId) -> Option<Arc<ConversationRecord>> {
        let inner = self.lock();
        let (record, at) = inner.records.get(&id)?;
        (record.kind == ConversationKind::Direct || at.elapsed() < self.group_ttl).then(|| record.clone())
    }

    /// Take before reading a record from the directory.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.lock().forgets)
    }

    /// Store `record` read under `ticket`, unless something was forgotten since the ticket was
    /// taken (the record may be older than that change). Returns the record either way.
    pub fn remember(&self, ticket: Ticket, record: ConversationRecord) -> Arc<ConversationRecord> {
        let record = Arc::new(record);
        let mut inner = self.lock();
        if inner.forgets == ticket.0 {
            if inner.records.len() >= self.max_entries {
                inner.records.clear();
            }
            inner.records.insert(record.id, (record.clone(), Instant::now()));
        }
        record
    }

    /// Drop the cached copy of a conversation (a group that changed), and void every ticket
    /// taken before now.
    pub fn forget(&self, id: ConversationId) {
        let mut inner = self.lock();
        inner.forgets += 1;
        inner.records.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::UserId;

    fn group(version: u64, members: Vec<UserId>) -> ConversationRecord {
        ConversationRecord {
            id: ConversationId(uuid::Uuid::from_u128(7)),
            kind: ConversationKind::Group,
            members,
            name: Some("g".into()),
            owner: Some(UserId(uuid::Uuid::from_u128(1))),
            version,
        }
    }

    #[test]
    fn a_forget_during_a_read_keeps_the_stale_record_out() {
        let cache = ConversationCache::new(10, Duration::from_secs(10));
        let (a, b) = (UserId(uuid::Uuid::from_u128(1)), UserId(uuid::Uuid::from_u128(2)));
        let id = group(0, vec![]).id;

        // A reader misses and starts reading version 0 (members a, b) ...
        let ticket = cache.ticket();
        // ... the owner removes b meanwhile, and the change is announced here ...
        cache.forget(id);
        // ... then the read returns the old record: used by that reader, not cached.
        let read = cache.remember(ticket, group(0, vec![a, b]));
        assert_eq!(read.members, vec![a, b]);
        assert!(cache.get(id).is_none(), "a record read before a forget must not be cached");

        // The next reader reads the new version and caches it.
        let ticket = cache.ticket();
        cache.remember(ticket, group(1, vec![a]));
        assert_eq!(cache.get(id).map(|r| r.version), Some(1));
    }

    #[test]
    fn groups_expire_and_direct_chats_do_not() {
        let cache = ConversationCache::new(10, Duration::ZERO);
        let a = UserId(uuid::Uuid::from_u128(1));
        let g = group(0, vec![a]);
        let direct = ConversationRecord::direct(ConversationId::direct(a, a), vec![a]);
        cache.remember(cache.ticket(), g.clone());
        cache.remember(cache.ticket(), direct.clone());
        assert!(cache.get(g.id).is_none());
        assert!(cache.get(direct.id).is_some());
    }

    #[test]
    fn a_full_cache_is_cleared_before_it_grows() {
        let cache = ConversationCache::new(2, Duration::from_secs(10));
        let ids: Vec<UserId> = (1..=3).map(|n| UserId(uuid::Uuid::from_u128(n))).collect();
        for u in &ids {
            cache.remember(cache.ticket(), ConversationRecord::direct(ConversationId::direct(*u, *u), vec![*u]));
        }
        let cached = ids.iter().filter(|u| cache.get(ConversationId::direct(**u, **u)).is_some()).count();
        assert_eq!(cached, 1, "the third insert found the cache full and cleared it");
    }
}
