-- Parley schema, version 1. Applied once by `PgBackend::open` inside a transaction that holds the
-- migration advisory lock, so several nodes starting together never race on DDL.
-- All shards share these tables; shard-local rows carry a `shard` column.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL,
    password_hash text NOT NULL,
    created_at_ms bigint NOT NULL,
    -- Named so that `create_user` can tell a taken username from any other violation.
    CONSTRAINT users_username_key UNIQUE (username)
);

CREATE TABLE tokens (
    token_hash    text PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at_ms bigint NOT NULL
);
CREATE INDEX tokens_user_id ON tokens (user_id);

CREATE TABLE conversations (
    id            uuid PRIMARY KEY,
    kind          smallint NOT NULL, -- 0 direct, 1 group
    members       uuid[] NOT NULL,   -- sorted, deduplicated
    created_at_ms bigint NOT NULL
);

CREATE TABLE user_conversations (
    user_id         uuid NOT NULL,
    conversation_id uuid NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);

-- One row per shard, created lazily by the first acquire. `epoch` is the fencing token: bumped on
-- every grant, checked by every commit in the commit's own transaction.
CREATE TABLE shard_leases (
    shard      integer PRIMARY KEY,
    owner      text NULL,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL
);

-- The per-conversation sequence counter: the highest seq assigned so far.
CREATE TABLE shard_conversations (
    conversation_id uuid PRIMARY KEY,
    shard           integer NOT NULL,
    last_seq        bigint NOT NULL
);

CREATE TABLE messages (
    shard           integer NOT NULL,
    conversation_id uuid NOT NULL,
    seq             bigint NOT NULL,
    message_id      uuid NOT NULL,
    sender          uuid NOT NULL,
    client_msg_id   text NOT NULL,
    body            text NOT NULL,
    sent_at_ms      bigint NOT NULL,
    -- The lease epoch the row was written under (audits check that epochs never go backwards).
    epoch           bigint NOT NULL,
    PRIMARY KEY (conversation_id, seq),
    CONSTRAINT messages_message_id_key UNIQUE (message_id),
    -- The idempotency key: a retried send is answered with the original row.
    CONSTRAINT messages_idempotency_key UNIQUE (conversation_id, sender, client_msg_id)
);

-- device_id '' is the member-level cursor (the maximum over the member's devices).
CREATE TABLE cursors (
    conversation_id uuid NOT NULL,
    user_id         uuid NOT NULL,
    device_id       text NOT NULL,
    delivered_seq   bigint NOT NULL DEFAULT 0,
    read_seq        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, user_id, device_id)
);
