-- Parley schema, version 6: muted conversations. Until when each member wants no notifications
-- of a conversation (NULL: not muted). Kept on the member's index row, so leaving a group ends it.

ALTER TABLE user_conversations ADD COLUMN muted_until_ms bigint NULL;
