-- Parley schema, version 3: presence. When each user's last connection ended, as the nodes saw
-- it (a node records its own users' ends; the survivors of a node that died record that node's
-- users). NULL: never recorded. Written in batches, read for users that are offline everywhere.

ALTER TABLE users ADD COLUMN last_seen_ms bigint NULL;
