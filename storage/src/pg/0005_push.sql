-- Parley schema, version 5: push notifications. Cluster-wide settings (the VAPID key every node
-- signs pushes with), and each browser's Web Push subscription, tied to the token it was
-- registered with: signing out ends it.

CREATE TABLE settings (
    key text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE push_subscriptions (
    endpoint text PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id),
    token_hash text NOT NULL,
    p256dh text NOT NULL,
    auth text NOT NULL,
    created_at_ms bigint NOT NULL
);
CREATE INDEX push_subscriptions_user ON push_subscriptions (user_id, created_at_ms DESC);
CREATE INDEX push_subscriptions_token ON push_subscriptions (token_hash);
