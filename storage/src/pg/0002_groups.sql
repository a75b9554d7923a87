-- Parley schema, version 2: groups. A group is a `conversations` row of kind 1 with a name, an
-- owner and a version that every change bumps (changes are compare-and-set on it, so two nodes
-- changing one group at once cannot lose either change).

ALTER TABLE conversations
    ADD COLUMN name    text NULL,
    ADD COLUMN owner   uuid NULL,
    ADD COLUMN version bigint NOT NULL DEFAULT 0;
