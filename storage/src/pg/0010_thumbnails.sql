-- Parley schema, version 10: thumbnails of uploaded images (PROTOCOL.md §5, "Media"), made by
-- the node that took the upload and stored in the same transaction. Deleting an upload deletes
-- its thumbnail.
CREATE TABLE media_thumbnails (
    media_id uuid PRIMARY KEY REFERENCES media (media_id) ON DELETE CASCADE,
    mime text NOT NULL,
    bytes bytea NOT NULL
);
