//! The conversation → shard map and shard → node placement. Both are pure functions so that every
//! node, client tool and test computes the same answer without asking anyone.

use crate::ids::{ConversationId, ShardId};

/// FNV-1a, 64 bit. Chosen because it is tiny, stable across Rust versions and platforms (unlike
/// `std::hash`), and mixes UUID bytes well enough for an even spread over a few hundred shards.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The shard that owns `conversation` when there are `shard_count` shards. The shard count is fixed
/// for the life of a deployment (changing it would move every conversation).
pub fn shard_for(conversation: ConversationId, shard_count: u16) -> ShardId {
    assert!(shard_count > 0, "shard_count must be positive");
    ShardId((fnv1a(conversation.0.as_bytes()) % u64::from(shard_count)) as u16)
}

/// Rendezvous (highest-random-weight) placement: the node among `nodes` that should own `shard`.
/// When a node joins or leaves, only the shards it wins or held move — no global reshuffle.
pub fn rendezvous_owner<'a>(shard: ShardId, nodes: &[&'a str]) -> Option<&'a str> {
    nodes.iter().copied().max_by_key(|node| {
        let mut key = Vec::with_capacity(node.len() + 2);
        key.extend_from_slice(node.as_bytes());
        key.extend_from_slice(&shard.0.to_be_bytes());
        // Finalise with a multiply-xorshift so nearby shard numbers do not correlate.
        let mut h = fnv1a(&key);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        (h, *node)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;

    #[test]
    fn shard_map_is_stable_and_spread() {
        let mut counts = vec![0u32; 64];
        for _ in 0..6400 {
            let c = ConversationId::direct(UserId::random(), UserId::random());
            let s = shard_for(c, 64);
            assert_eq!(s, shard_for(c, 64));
            counts[s.0 as usize] += 1;
        }
        // 100 expected per shard; a shard with under 40 or over 200 means the hash is broken.
        assert!(counts.iter().all(|&n| (40..200).contains(&n)), "{counts:?}");
    }

    #[test]
    fn rendezvous_moves_only_the_leavers_shards() {
        let three = ["a", "b", "c"];
        let two = ["a", "b"];
        for s in 0..256 {
            let before = rendezvous_owner(ShardId(s), &three).unwrap();
            let after = rendezvous_owner(ShardId(s), &two).unwrap();
            if before != "c" {
                assert_eq!(before, after, "shard {s} moved although its owner stayed");
            }
        }
        assert_eq!(rendezvous_owner(ShardId(1), &[]), None);
    }
}
