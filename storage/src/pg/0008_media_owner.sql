-- Parley schema, version 8: uploads by owner, for the upload quota (`limits.media_quota_bytes`).
-- A user's total is an index-only sum over their own entries, read on every upload.
CREATE INDEX media_owner ON media (owner) INCLUDE (size);
