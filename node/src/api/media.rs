//! Media over HTTP: `POST /v1/media` stores an upload (with a thumbnail when it is a picture,
//! [`crate::thumbnail`]), `GET /v1/media/:id` serves it back and `GET /v1/media/:id/thumbnail` its
//! thumbnail (PROTOCOL.md §5, "Media"). Messages carry only the upload's description ([`MediaRef`]), so a photo
//! never travels inside a WebSocket frame, a shard's batch or a node-to-node payload.
//!
//! Who may fetch what. The id is random (v4) and is the capability: it reaches other users only
//! inside messages to the conversations it was sent to (or forwarded to), and fetching it also
//! needs a valid bearer token. There is no per-conversation check at download, as in WhatsApp,
//! whose media URLs are likewise unguessable capabilities; it is what lets a member forward a photo
//! by its id without uploading it again.
//!
//! Bounds. An upload must say its length (`Content-Length`) and is refused before its body is read
//! when that is over [`MAX_MEDIA_BYTES`], when the type or name is bad, or when
//! [`MAX_UPLOADS_IN_FLIGHT`] uploads are already being stored on this node — so the memory uploads
//! can hold on one node is bounded by their product. Downloads are bounded the same way: at most
//! [`DOWNLOADS_IN_FLIGHT`] are read from the store or being written to their clients at once (a
//! download keeps its slot until its last byte is handed to the socket, or its client leaves); one
//! more waits up to [`DOWNLOAD_WAIT`] for a slot, then gets `unavailable`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parley_protocol::error::ErrorCode;
use parley_protocol::http::{MediaItem, MediaListQuery, MediaUploadQuery, MediaUsage, UserView};
use parley_protocol::limits::{DEFAULT_PAGE, MAX_MEDIA_BYTES, MAX_PAGE, MAX_UPLOADS_IN_FLIGHT};
use parley_protocol::media::{normalize_mime, validate_media_name, MediaRef};
use parley_protocol::MediaId;
use parley_storage::{now_ms, sha256_hex, MediaDeletion, MediaRecord};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warp::http::{header, HeaderValue, StatusCode};
use warp::{Filter, Rejection, Reply};

use super::{authed, json, reject};
use crate::context::NodeContext;
use crate::error::{quota_message, NodeError};

/// Downloads one node serves at once (each holds its file in memory until it is sent, up to
/// `MAX_MEDIA_BYTES`: 512 MiB at most). A browser opening a chat full of photos asks for ≤ 6 at a
/// time per server, so this is several readers' worth.
pub const DOWNLOADS_IN_FLIGHT: usize = 32;

/// Thumbnails one node makes at once (CPU-bound, one core each; each decode may take up to
/// `thumbnail::MAX_DECODE_ALLOC_BYTES`). Other uploads wait for a slot, holding their upload slot.
pub const THUMBNAILS_IN_FLIGHT: usize = 2;

/// How long a download waits for a free slot before it is answered `unavailable`.
pub const DOWNLOAD_WAIT: Duration = Duration::from_secs(10);

/// Bytes handed to the socket per step of a download.
const DOWNLOAD_CHUNK_BYTES: usize = 64 * 1024;

/// A download's body: the file in chunks, holding the download's slot until it is dropped (sent,
/// or its client gone).
struct Chunks {
    rest: bytes::Bytes,
    _permit: OwnedSemaphorePermit,
}

impl futures_util::Stream for Chunks {
    type Item = Result<bytes::Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(DOWNLOAD_CHUNK_BYTES);
        Poll::Ready(Some(Ok(self.rest.split_to(n))))
    }
}

/// An upload that passed every check made before its body is read.
struct Admitted {
    ctx: Arc<NodeContext>,
    owner: UserView,
    mime: String,
    name: Option<String>,
    /// Held until the upload is stored (see the module doc).
    _permit: OwnedSemaphorePermit,
}

/// The two media routes of a node.
pub fn routes(ctx: Arc<NodeContext>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let uploads = Arc::new(Semaphore::new(MAX_UPLOADS_IN_FLIGHT));
    let thumbnails = Arc::new(Semaphore::new(THUMBNAILS_IN_FLIGHT));
    let upload = warp::path!("v1" / "media")
        .and(warp::post())
        .and(authed(ctx.clone()))
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::query::<MediaUploadQuery>())
        .and_then(
            move |ctx: Arc<NodeContext>,
                  owner: UserView,
                  content_type: Option<String>,
                  length: Option<u64>,
                  query: MediaUploadQuery| {
                let uploads = uploads.clone();
                async move {
                    let length =
                        length.ok_or_else(|| reject(ErrorCode::InvalidField, "a content-length header is required"))?;
                    if length > MAX_MEDIA_BYTES {
                        return Err(reject(
                            ErrorCode::MediaTooLarge,
                            format!("upload of {length} bytes exceeds {MAX_MEDIA_BYTES} bytes"),
                        ));
                    }
                    if length == 0 {
                        return Err(reject(ErrorCode::InvalidField, "an upload must not be empty"));
                    }
                    let mime = normalize_mime(content_type.as_deref().unwrap_or("")).map_err(NodeError::from)?;
                    let name = query.name.as_deref().map(validate_media_name).transpose().map_err(NodeError::from)?;
                    // Fail fast when the declared length cannot fit; the store checks again, in one
                    // step with the insert, so concurrent uploads cannot pass the quota together.
                    let quota = ctx.config.limits.media_quota_bytes;
                    let used = ctx.stores.directory.media_totals(owner.id).await.map_err(NodeError::from)?.bytes;
                    if used.saturating_add(length) > quota {
                        return Err(reject(ErrorCode::MediaQuotaExceeded, quota_message(used, Some(length), quota)));
                    }
                    let permit = uploads.try_acquire_owned().map_err(|_| {
                        reject(
                            ErrorCode::Unavailable,
                            format!("{MAX_UPLOADS_IN_FLIGHT} uploads are being stored on this node; retry"),
                        )
                    })?;
                    Ok::<_, Rejection>(Admitted { ctx, owner, mime, name, _permit: permit })
                }
            },
        )
        .and(warp::body::content_length_limit(MAX_MEDIA_BYTES))
        .and(warp::body::bytes())
        .and(warp::any().map(move || thumbnails.clone()))
        .and_then(|admitted: Admitted, bytes: bytes::Bytes, thumbnails: Arc<Semaphore>| async move {
            let thumbnail = thumbnail_of(&thumbnails, &admitted.mime, &bytes).await;
            let record = MediaRecord {
                media: MediaRef {
                    media_id: MediaId(uuid::Uuid::new_v4()),
                    mime: admitted.mime,
                    size: bytes.len() as u64,
                    name: admitted.name,
                    sha256: sha256_hex(&bytes),
                },
                owner: admitted.owner.id,
                created_at_ms: now_ms(),
            };
            let quota = admitted.ctx.config.limits.media_quota_bytes;
            let directory = &admitted.ctx.stores.directory;
            directory.put_media(&record, &bytes, thumbnail.as_ref(), quota).await.map_err(NodeError::from)?;
            tracing::debug!(
                media = %record.media.media_id,
                size = record.media.size,
                thumbnail = thumbnail.is_some(),
                "stored an upload"
            );
            Ok::<_, Rejection>(json(&record.media, StatusCode::CREATED))
        });

    let usage = warp::path!("v1" / "media")
        .and(warp::get())
        .and(authed(ctx.clone()))
        .and(warp::query::<MediaListQuery>())
        .and_then(|ctx: Arc<NodeContext>, me: UserView, query: MediaListQuery| async move {
            let limit = query.limit.unwrap_or(DEFAULT_PAGE);
            if !(1..=MAX_PAGE).contains(&limit) {
                return Err(reject(ErrorCode::InvalidField, format!("limit must be 1 to {MAX_PAGE}")));
            }
            let before = query.before.as_deref().map(parse_cursor).transpose()?;
            let directory = &ctx.stores.directory;
            let totals = directory.media_totals(me.id).await.map_err(NodeError::from)?;
            let page = directory.media_list(me.id, before, limit).await.map_err(NodeError::from)?;
            let next = (page.len() == limit as usize)
                .then(|| page.last().map(|r| format!("{}.{}", r.created_at_ms, r.media.media_id)))
                .flatten();
            let usage = MediaUsage {
                uploads: totals.uploads,
                used_bytes: totals.bytes,
                quota_bytes: ctx.config.limits.media_quota_bytes,
                items: page.into_iter().map(|r| MediaItem { media: r.media, created_at_ms: r.created_at_ms }).collect(),
                next,
            };
            Ok::<_, Rejection>(json(&usage, StatusCode::OK))
        });

    let delete = warp::path!("v1" / "media" / String).and(warp::delete()).and(authed(ctx.clone())).and_then(
        |id: String, ctx: Arc<NodeContext>, me: UserView| async move {
            let id: MediaId = id.parse().map_err(|_| reject(ErrorCode::UnknownMedia, "no media with that id"))?;
            match ctx.stores.directory.delete_media(id, me.id).await.map_err(NodeError::from)? {
                MediaDeletion::Deleted => {
                    tracing::debug!(media = %id, "deleted an upload");
                    Ok(warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response())
                }
                MediaDeletion::NotOwner => Err(reject(ErrorCode::Forbidden, "only its uploader may delete an upload")),
                MediaDeletion::Unknown => Err(reject(ErrorCode::UnknownMedia, format!("no media with id {id}"))),
            }
        },
    );

    // Thumbnails are small (tens of KB): no download slot. Unlike the upload, a browser must ask
    // again before showing a cached copy (`no-cache`, answered 304 while it exists): a chat that
    // shows a deleted upload as gone must not keep showing its thumbnail.
    let thumbnail = warp::path!("v1" / "media" / String / "thumbnail")
        .and(warp::get())
        .and(authed(ctx.clone()))
        .and(warp::header::optional::<String>("if-none-match"))
        .and_then(|id: String, ctx: Arc<NodeContext>, _me: UserView, if_none_match: Option<String>| async move {
            let id: MediaId = id.parse().map_err(|_| reject(ErrorCode::UnknownMedia, "no media with that id"))?;
            let (record, thumbnail) = ctx
                .stores
                .directory
                .media_thumbnail(id)
                .await
                .map_err(NodeError::from)?
                .ok_or_else(|| reject(ErrorCode::UnknownMedia, format!("no media with id {id}")))?;
            let thumbnail = thumbnail
                .ok_or_else(|| reject(ErrorCode::NotFound, "this upload has no thumbnail; fetch the upload"))?;
            let tag = format!("\"{}.thumbnail\"", record.media.sha256);
            let fresh = if_none_match.is_some_and(|t| t.trim() == tag);
            let (status, body) =
                if fresh { (StatusCode::NOT_MODIFIED, Vec::new()) } else { (StatusCode::OK, thumbnail.bytes) };
            let length = body.len();
            let mut res =
                served(warp::reply::Response::new(body.into()), status, &thumbnail.mime, &tag, "private, no-cache");
            if !fresh {
                res.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            }
            Ok::<_, Rejection>(res)
        });

    let downloads = Arc::new(Semaphore::new(DOWNLOADS_IN_FLIGHT));
    let download = warp::path!("v1" / "media" / String)
        .and(warp::get())
        .and(authed(ctx))
        .and(warp::header::optional::<String>("if-none-match"))
        .and(warp::any().map(move || downloads.clone()))
        .and_then(
            |id: String,
             ctx: Arc<NodeContext>,
             _me: UserView,
             if_none_match: Option<String>,
             downloads: Arc<Semaphore>| async move {
                let id: MediaId = id.parse().map_err(|_| reject(ErrorCode::UnknownMedia, "no media with that id"))?;
                let unknown = || reject(ErrorCode::UnknownMedia, format!("no media with id {id}"));
                // Uploads never change, so a client that has the bytes is told so without reading them.
                if let Some(tag) = if_none_match {
                    let record = ctx.stores.directory.media(id).await.map_err(NodeError::from)?.ok_or_else(unknown)?;
                    if tag.trim() == etag(&record.media) {
                        return Ok(with_headers(
                            warp::reply::Response::default(),
                            &record.media,
                            StatusCode::NOT_MODIFIED,
                        ));
                    }
                }
                let busy = || {
                    reject(
                        ErrorCode::Unavailable,
                        format!("{DOWNLOADS_IN_FLIGHT} downloads are being served by this node; retry"),
                    )
                };
                let permit = tokio::time::timeout(DOWNLOAD_WAIT, downloads.acquire_owned())
                    .await
                    .map_err(|_| busy())?
                    .map_err(|_| busy())?;
                let (record, bytes) =
                    ctx.stores.directory.media_bytes(id).await.map_err(NodeError::from)?.ok_or_else(unknown)?;
                let length = bytes.len();
                let body = warp::reply::stream(Chunks { rest: bytes.into(), _permit: permit }).into_response();
                let mut res = with_headers(body, &record.media, StatusCode::OK);
                res.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                Ok::<_, Rejection>(res)
            },
        );

    upload.or(usage).unify().or(delete).unify().or(thumbnail).unify().or(download).unify().boxed()
}

/// The thumbnail of an upload that should have one, made on the blocking pool with one of the
/// node's thumbnail slots; `None` (the upload is stored without one) when it is not a picture or
/// cannot be made into a thumbnail.
async fn thumbnail_of(slots: &Semaphore, mime: &str, bytes: &bytes::Bytes) -> Option<parley_storage::Thumbnail> {
    if !crate::thumbnail::wanted(mime) {
        return None;
    }
    let _slot = slots.acquire().await.ok()?;
    let (mime, bytes) = (mime.to_string(), bytes.clone());
    match tokio::task::spawn_blocking(move || crate::thumbnail::make(&mime, &bytes)).await {
        Ok(Ok(thumbnail)) => Some(thumbnail),
        Ok(Err(skipped)) => {
            tracing::debug!(reason = %skipped, "an image upload gets no thumbnail");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "making a thumbnail failed");
            None
        }
    }
}

/// A `before` cursor (`<created_at_ms>.<media_id>`, as `next` gave it).
fn parse_cursor(cursor: &str) -> Result<(i64, MediaId), Rejection> {
    let bad = || reject(ErrorCode::InvalidField, "before must be a `next` from an earlier answer");
    let (ms, id) = cursor.split_once('.').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, id.parse().map_err(|_| bad())?))
}

fn etag(media: &MediaRef) -> String {
    format!("\"{}\"", media.sha256)
}

/// A header value from text the server made or checked (a stored media type, a tag, a file name
/// already percent-encoded); the fallback is never expected.
fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// The headers of anything served from an upload (the upload, its thumbnail): its type, its tag,
/// how it may be cached, and — the bytes come from a user — that the browser must not sniff
/// another type from them nor run them as a page of this origin (`sandbox`).
fn served(
    mut res: warp::reply::Response,
    status: StatusCode,
    mime: &str,
    tag: &str,
    cache_control: &'static str,
) -> warp::reply::Response {
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(mime));
    h.insert(header::ETAG, header_value(tag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache_control));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    res
}

/// The headers of a download: [`served`], immutable (an upload never changes), and to be saved
/// rather than shown when opened directly (`attachment`).
fn with_headers(res: warp::reply::Response, media: &MediaRef, status: StatusCode) -> warp::reply::Response {
    let mut res = served(res, status, &media.mime, &etag(media), "private, max-age=31536000, immutable");
    let disposition = match &media.name {
        Some(name) => format!("attachment; filename*=UTF-8''{}", percent_encode(name)),
        None => "attachment".to_string(),
    };
    res.headers_mut().insert(header::CONTENT_DISPOSITION, header_value(&disposition));
    res
}

/// RFC 8187 `attr-char` encoding of a file name for `filename*`.
fn percent_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_encoded_for_content_disposition() {
        assert_eq!(percent_encode("photo.jpg"), "photo.jpg");
        assert_eq!(percent_encode("my photo é.jpg"), "my%20photo%20%C3%A9.jpg");
        assert_eq!(percent_encode("a\"b;c"), "a%22b%3Bc");
    }
}
