//! The `media` scenario: what a photo upload costs, with the thumbnail the server makes of it
//! ([`crate::thumbnail`]) and without. The same phone-sized JPEG is uploaded `--media-uploads`
//! times as `image/jpeg` (a thumbnail is made) and as many times as `application/octet-stream`
//! (stored as it is), `--media-concurrency` at a time, round robin over the nodes; the difference
//! of the two is the thumbnail's price on this machine. Uploads go over HTTP from this process
//! (an upload is one request, not a stream of frames).

use std::sync::Arc;

use hdrhistogram::Histogram;
use image::{ImageFormat, Rgb, RgbImage};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{round, Percentiles};
use crate::client::Client;

/// The photo: a 12-megapixel picture, what phone cameras take.
const PHOTO_WIDTH: u32 = 4_000;
const PHOTO_HEIGHT: u32 = 3_000;

/// Uploads of one kind.
#[derive(Debug, Default, Serialize)]
pub struct UploadStats {
    pub uploads_per_s: f64,
    pub latency: Percentiles,
    pub errors: u32,
}

#[derive(Debug, Default, Serialize)]
pub struct MediaReport {
    pub photo_bytes: u64,
    pub photo_pixels: String,
    pub uploads: u32,
    pub concurrency: u32,
    /// As `image/jpeg`: stored with a thumbnail.
    pub picture: UploadStats,
    /// As `application/octet-stream`: stored as it is.
    pub opaque: UploadStats,
    /// Size of the thumbnail the server made of the photo.
    pub thumbnail_bytes: Option<u64>,
}

/// A JPEG of [`PHOTO_WIDTH`]×[`PHOTO_HEIGHT`] with gradients and fine texture, so it compresses
/// like a photo (a flat picture would be a few KB and decode in no time).
pub fn photo() -> anyhow::Result<Vec<u8>> {
    let picture = RgbImage::from_fn(PHOTO_WIDTH, PHOTO_HEIGHT, |x, y| {
        let grain = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) >> 27;
        Rgb([(x / 16 + grain) as u8, (y / 12 + grain) as u8, ((x + y) / 28) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(picture).write_to(&mut out, ImageFormat::Jpeg)?;
    Ok(out.into_inner())
}

/// Upload `photo` `uploads` times as `mime`, `concurrency` at a time.
async fn uploads(
    clients: &[Client],
    token: &str,
    photo: &Arc<Vec<u8>>,
    mime: &'static str,
    uploads: u32,
    concurrency: u32,
) -> anyhow::Result<(UploadStats, Vec<parley_protocol::media::MediaRef>)> {
    let slots = Arc::new(Semaphore::new(concurrency.max(1) as usize));
    let mut running = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..uploads {
        let permit = slots.clone().acquire_owned().await?;
        let (client, token, photo) = (clients[i as usize % clients.len()].clone(), token.to_string(), photo.clone());
        running.spawn(async move {
            let t = Instant::now();
            let result = client.upload_media(&token, photo.to_vec(), mime, Some("photo.jpg")).await;
            drop(permit);
            (t.elapsed(), result)
        });
    }
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut errors, mut stored) = (0, Vec::new());
    while let Some(joined) = running.join_next().await {
        let (took, result) = joined?;
        match result {
            Ok(media) => {
                latency.record(took.as_micros() as u64)?;
                stored.push(media);
            }
            Err(e) => {
                errors += 1;
                super::say(format!("media: an upload failed: {e}"));
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let stats =
        UploadStats { uploads_per_s: round(stored.len() as f64 / secs, 1), latency: Percentiles::of(&latency), errors };
    Ok((stats, stored))
}

/// The scenario: the photo as a picture, then as opaque bytes; each upload deleted afterwards
/// (the user's quota stays free for the next run's phases).
pub async fn phase(clients: &[Client], token: &str, count: u32, concurrency: u32) -> anyhow::Result<MediaReport> {
    let photo = Arc::new(photo()?);
    super::say(format!(
        "media: {count} uploads of a {PHOTO_WIDTH}×{PHOTO_HEIGHT} JPEG ({} bytes) each way, {concurrency} at a time",
        photo.len()
    ));
    let (picture, pictures) = uploads(clients, token, &photo, "image/jpeg", count, concurrency).await?;
    let (opaque, files) = uploads(clients, token, &photo, "application/octet-stream", count, concurrency).await?;
    let thumbnail_bytes = match pictures.first() {
        Some(m) => clients[0].download_thumbnail(token, m.media_id).await.ok().map(|(_, b)| b.len() as u64),
        None => None,
    };
    for m in pictures.iter().chain(&files) {
        let _ = clients[0].delete_media(token, m.media_id).await;
    }
    let report = MediaReport {
        photo_bytes: photo.len() as u64,
        photo_pixels: format!("{PHOTO_WIDTH}x{PHOTO_HEIGHT}"),
        uploads: count,
        concurrency,
        picture,
        opaque,
        thumbnail_bytes,
    };
    super::say(format!(
        "media: picture p50/p99 {}/{} ms ({}/s), opaque p50/p99 {}/{} ms ({}/s), thumbnail {:?} bytes",
        report.picture.latency.p50_ms,
        report.picture.latency.p99_ms,
        report.picture.uploads_per_s,
        report.opaque.latency.p50_ms,
        report.opaque.latency.p99_ms,
        report.opaque.uploads_per_s,
        report.thumbnail_bytes
    ));
    Ok(report)
}
