-- Parley schema, version 9: presence privacy and contacts (PROTOCOL.md §5, "Privacy and contacts").
-- Audiences are small codes (last seen: 0 everyone, 1 contacts, 2 nobody; online: 0 everyone,
-- 1 same as last seen). `rules_version` grows by one with each change of a user's settings or
-- contacts, so nodes that learn of changes out of order keep the newest.
ALTER TABLE users
    ADD COLUMN last_seen_audience smallint NOT NULL DEFAULT 0,
    ADD COLUMN online_audience smallint NOT NULL DEFAULT 0,
    ADD COLUMN rules_version bigint NOT NULL DEFAULT 0;

-- Whom each user added to their contact list. The key answers "is W one of X's contacts" (every
-- presence watch) and lists X's contacts.
CREATE TABLE contacts (
    owner       uuid NOT NULL REFERENCES users (id),
    contact     uuid NOT NULL REFERENCES users (id),
    added_at_ms bigint NOT NULL,
    PRIMARY KEY (owner, contact)
);
