-- Parley schema, version 4: media. An upload's bytes and description, and the description a
-- message carries (JSON of `MediaRef`; the bytes are never copied into messages, so a forwarded
-- photo is stored once).

CREATE TABLE media (
    media_id uuid PRIMARY KEY,
    owner uuid NOT NULL REFERENCES users (id),
    mime text NOT NULL,
    name text NULL,
    size bigint NOT NULL,
    sha256 text NOT NULL,
    bytes bytea NOT NULL,
    created_at_ms bigint NOT NULL
);
-- Photos, video and audio arrive compressed: store them out of line without trying to compress
-- them again (TOAST's default would spend CPU on every upload for nothing).
ALTER TABLE media ALTER COLUMN bytes SET STORAGE EXTERNAL;

ALTER TABLE messages ADD COLUMN media text NULL;
