//! Every limit a client can hit, as a named constant with the reason for its value. The node's config
//! may tighten some of them; none may be loosened past what is written here without changing
//! `PROTOCOL.md`.

/// Largest WebSocket text frame the server accepts. A chat message body is at most
/// [`MAX_BODY_BYTES`]; the rest is room for the JSON envelope. Larger frames are refused with
/// `frame_too_large` before they are parsed, so a client cannot make the server buffer megabytes.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Largest message body, in bytes of UTF-8. WhatsApp's own limit is about 65k characters; 16 KiB
/// keeps a full history page (100 messages) under 2 MiB.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Longest client message id or device id. Enough for a UUID with a prefix.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Usernames: 3 to 32 characters of `[a-z0-9_.-]`. Short enough to show in a list, restricted so
/// that two names cannot look alike.
pub const MIN_USERNAME_LEN: usize = 3;
pub const MAX_USERNAME_LEN: usize = 32;

/// Passwords: at least 8 bytes (anything shorter is guessable offline) and at most 256 (argon2 cost
/// is per byte; an unbounded password is a CPU amplification attack).
pub const MIN_PASSWORD_LEN: usize = 8;
pub const MAX_PASSWORD_LEN: usize = 256;

/// Largest history page a client can ask for. Default when the client gives none: [`DEFAULT_PAGE`].
pub const MAX_PAGE: u32 = 500;
pub const DEFAULT_PAGE: u32 = 100;

/// How many messages per conversation one reconnect sync pushes before it reports `has_more`;
/// the client then pages the rest with `history`. Bounds the burst a reconnecting device receives.
pub const MAX_SYNC_PER_CONVERSATION: u32 = 1000;

/// Largest HTTP request body (JSON) the REST API accepts.
pub const MAX_HTTP_BODY_BYTES: u64 = 64 * 1024;

/// Most members a group may have, its creator included: WhatsApp's own limit. Every message is
/// fanned out to each member and carries the member list to its shard, so this bounds the work and
/// the bytes one send can cause.
pub const MAX_GROUP_MEMBERS: usize = 1024;

/// Longest group name, in bytes of UTF-8 (WhatsApp's subject limit is 100 characters). A name is
/// trimmed and must not be empty.
pub const MAX_GROUP_NAME_BYTES: usize = 100;

/// A session forwards at most one `typing` per conversation in this interval; the others are
/// dropped (not refused). A client that keeps typing sends one every couple of seconds, and a
/// member sees "typing…" for [`TYPING_SHOWN_MS`] after the last one, so the indicator stays on
/// without a frame per keystroke crossing the cluster.
pub const TYPING_INTERVAL_MS: u64 = 2_000;

/// How long a client shows "typing…" after the last `typing` frame (a hint to clients; there is
/// no "stopped typing" frame: a message from that user, or this much silence, ends it).
pub const TYPING_SHOWN_MS: u64 = 6_000;

/// Most users one connection may watch the presence of (`presence` frame). A contact list
/// screen's worth; each watched user costs an entry in the node's watcher index, and every change
/// of that user a frame to this connection.
pub const MAX_PRESENCE_WATCH: usize = 256;

/// Most users one account's contact list holds (`PUT /v1/me/contacts/:id`); one more is refused
/// with `too_many_contacts`. Bounds the list a client fetches in one answer and the table's growth
/// per account (WhatsApp's address book has no published cap; 5,000 is Facebook's friend limit).
pub const MAX_CONTACTS: usize = 5_000;

/// Largest media upload, in bytes (WhatsApp's long-standing limit for photos, video and audio).
/// A node holds an upload in memory while it checks and stores it, so this times
/// [`MAX_UPLOADS_IN_FLIGHT`] bounds the memory uploads can take on one node (128 MiB).
pub const MAX_MEDIA_BYTES: u64 = 16 * 1024 * 1024;

/// Default of `limits.media_quota_bytes`: how many bytes of uploads one user may have stored at
/// once (64 uploads of the largest size). Without a quota one account could fill the store's disk;
/// a user over it deletes uploads (`DELETE /v1/media/:id`) to make room.
pub const DEFAULT_MEDIA_QUOTA_BYTES: u64 = 1024 * 1024 * 1024;

/// Longest side of an image upload's thumbnail, in pixels (`GET /v1/media/:id/thumbnail`): what a
/// chat shows inline, a few tens of KB instead of up to 16 MiB per photo.
pub const THUMBNAIL_EDGE: u32 = 320;

/// Largest picture, in pixels (width × height, read from its header), that the server decodes to
/// make a thumbnail: 40 megapixels, more than phone cameras take. A larger one is stored without a
/// thumbnail, so a small file declaring a huge picture costs no memory.
pub const MAX_THUMBNAIL_SOURCE_PIXELS: u64 = 40_000_000;

/// Uploads one node stores at once; one more is refused with `unavailable` (503, retryable)
/// before its body is read. Bounds upload memory (see [`MAX_MEDIA_BYTES`]) and the store's load.
pub const MAX_UPLOADS_IN_FLIGHT: usize = 8;

/// Longest media type (`type/subtype`, RFC 6838 caps each part at 127 characters).
pub const MAX_MIME_BYTES: usize = 127;

/// Longest file name given at upload, in bytes of UTF-8 (what common file systems allow).
pub const MAX_MEDIA_NAME_BYTES: usize = 255;

/// Longest push endpoint URL a browser may register. Push services' URLs are 100-300 bytes; the
/// node keeps every subscription in memory while it sends to it, and calls only the push services
/// it is configured to trust (`push.allowed_endpoints`).
pub const MAX_PUSH_ENDPOINT_BYTES: usize = 1024;

/// Push subscriptions kept per user (one per browser or device that turned notifications on).
/// Registering one more forgets the user's oldest: a browser that was wiped never unsubscribes,
/// and a user must not be locked out of notifications by their old devices.
pub const MAX_PUSH_SUBSCRIPTIONS_PER_USER: usize = 16;

/// Longest message preview in a push notification, in bytes of UTF-8. Push services accept
/// 4 KiB of encrypted payload; this leaves room for the rest of the notification and the
/// encryption's overhead, and is more than a notification shows.
pub const MAX_PUSH_PREVIEW_BYTES: usize = 512;
