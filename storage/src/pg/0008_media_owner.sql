-- Parley schema, version 8: uploads by owner, for the upload quota (`limits.media_quota_bytes`).
-- A user's total is an index-only sum over their own entries, read on every upload.
-- Keyed by upload time too: `GET /v1/media` lists a user's uploads newest first, a page at a time.
CREATE INDEX media_owner ON media (owner, created_at_ms, media_id) INCLUDE (size);
