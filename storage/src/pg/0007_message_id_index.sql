-- Parley schema, version 7: no unique index on messages.message_id.
--
-- Nothing looks a message up by its id (history and sync read by (conversation_id, seq); dedupe
-- reads by the idempotency key), and the id is the server's UUIDv7 (48 bits of time, 74 random
-- bits), unique without an index. The index was a third of every insert's index work: at 16
-- sends in flight per client, index insertion was a quarter of Postgres's CPU (BENCHMARKS.md,
-- session 18).
ALTER TABLE messages DROP CONSTRAINT messages_message_id_key;
