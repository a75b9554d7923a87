//! The binary codec for node-to-node payloads: a 2-byte version header followed by bincode 2.
//!
//! This is the only module that names `bincode`, so a codec change touches one file. Decoding is
//! fallible and size-limited: a peer that sends garbage gets its frame dropped and logged, never a
//! panic and never an unbounded allocation.

use serde::{de::DeserializeOwned, Serialize};

use crate::error::ProtocolError;

/// Version of the envelope layout. Bump only with a migration story: peers refuse other versions.
/// 2: messages and sends carry `media` (a cluster is upgraded by restarting every node; a node of
/// another version is refused as a peer's garbage would be, never misread).
pub const NODE_PAYLOAD_VERSION: u16 = 2;

/// Largest payload a peer may send (and the largest allocation decoding may make). A sync reply of
/// 64 conversations × 1000 messages × 16 KiB would exceed it; sync pages are bounded well below.
pub const MAX_NODE_PAYLOAD_BYTES: usize = 32 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_NODE_PAYLOAD_BYTES>()
}

/// Encode `value` with the version header.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = NODE_PAYLOAD_VERSION.to_be_bytes().to_vec();
    // Serialization of our own plain-data types cannot fail except by exceeding the limit, which
    // callers prevent by bounding page sizes; treat it as a bug.
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("node payloads are plain data within the size limit");
    out
}

/// Decode bytes produced by [`encode`], checking the version and consuming every byte.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    if bytes.len() < 2 {
        return Err(ProtocolError::Codec("payload shorter than its header".into()));
    }
    let version = u16::from_be_bytes([bytes[0], bytes[1]]);
    if version != NODE_PAYLOAD_VERSION {
        return Err(ProtocolError::UnsupportedVersion(version));
    }
    let (value, used) =
        bincode::serde::decode_from_slice(&bytes[2..], config()).map_err(|e| ProtocolError::Codec(e.to_string()))?;
    if used != bytes.len() - 2 {
        return Err(ProtocolError::Codec(format!("{} trailing bytes", bytes.len() - 2 - used)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodePayload;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let inputs: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 1],
            vec![0, 1, 255, 255, 255, 255, 255, 255, 255, 255, 255],
            vec![9, 9, 1, 2, 3],
            (0..=255u8).collect(),
        ];
        for bytes in inputs {
            assert!(decode::<NodePayload>(&bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn round_trip() {
        let p = NodePayload::Ping { nonce: 42 };
        assert_eq!(decode::<NodePayload>(&encode(&p)).unwrap(), p);
    }

    #[test]
    fn delivery_batches_round_trip_in_order() {
        use crate::cluster::{Delivery, UserEvent};
        use crate::frames::ReceiptKind;
        use crate::{ConversationId, UserId};
        let (a, b) = (UserId::random(), UserId::random());
        let conversation = ConversationId::direct(a, b);
        let deliveries: Vec<Delivery> = (1..=3)
            .map(|seq| Delivery {
                users: vec![a, b],
                event: UserEvent::Receipt { conversation_id: conversation, user_id: b, kind: ReceiptKind::Read, seq },
                skip_session: seq,
            })
            .collect();
        let p = NodePayload::DeliverBatch { deliveries };
        assert_eq!(decode::<NodePayload>(&encode(&p)).unwrap(), p);
    }
}
