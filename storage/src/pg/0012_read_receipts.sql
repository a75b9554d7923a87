-- Parley schema, version 12: whether a user shares read receipts in direct chats (PROTOCOL.md
-- §5, "Privacy and contacts"). Read with the other privacy settings.
ALTER TABLE users ADD COLUMN read_receipts boolean NOT NULL DEFAULT true;
