-- Parley schema, version 11: who may add a user to a group (PROTOCOL.md §5, "Privacy and
-- contacts"): 0 everyone, 1 the user's contacts, 2 nobody. Read with the other audiences.
ALTER TABLE users ADD COLUMN groups_audience smallint NOT NULL DEFAULT 0;
