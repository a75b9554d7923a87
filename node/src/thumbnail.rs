//! Thumbnails of uploaded images (PROTOCOL.md §5, "Media"): a picture of at most
//! [`THUMBNAIL_EDGE`] pixels a side that a chat shows inline, so that opening a chat full of
//! photos does not download every photo (each up to 16 MiB). Made once, by the node that takes the
//! upload, and stored with it.
//!
//! The bytes are a stranger's, so decoding is bounded before it starts: only the types clients
//! show inline are decoded, a picture of more than [`MAX_THUMBNAIL_SOURCE_PIXELS`] (read from its
//! header) is not, and the decoder's allocations are capped ([`MAX_DECODE_ALLOC_BYTES`]) — a
//! tiny file that declares a huge picture costs nothing. A picture that cannot be made into a
//! thumbnail is still stored: it is a file like any other, and clients show the full upload.
//!
//! A JPEG (most photos) is decoded at the smallest of 1/8, 1/4, 1/2 or full size that still
//! covers the thumbnail (DCT scaling, [`jpeg_decoder::Decoder::scale`]): the inverse transform
//! then runs on a fraction of the pixels, and the full picture is never held.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use parley_protocol::limits::{MAX_THUMBNAIL_SOURCE_PIXELS, THUMBNAIL_EDGE};
use parley_storage::Thumbnail;

/// Memory one decode may take (a picture of [`MAX_THUMBNAIL_SOURCE_PIXELS`] in 8-bit RGBA is
/// 160 MB). With `THUMBNAILS_IN_FLIGHT` decodes at a time, this bounds what thumbnails can take.
pub const MAX_DECODE_ALLOC_BYTES: u64 = 192 * 1024 * 1024;

/// Quality of JPEG thumbnails (of 100): small files, no visible blocks at thumbnail size.
const JPEG_QUALITY: u8 = 80;

/// The decoder for an upload's (normalized) media type, if it is one that gets a thumbnail.
fn format_of(mime: &str) -> Option<ImageFormat> {
    match mime {
        "image/png" => Some(ImageFormat::Png),
        "image/jpeg" => Some(ImageFormat::Jpeg),
        "image/gif" => Some(ImageFormat::Gif),
        "image/webp" => Some(ImageFormat::WebP),
        _ => None,
    }
}

/// Whether uploads of this type get a thumbnail (if their bytes decode).
pub fn wanted(mime: &str) -> bool {
    format_of(mime).is_some()
}

/// Why an upload got no thumbnail (logged; the upload is stored either way).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Skipped {
    #[error("not a type that gets a thumbnail")]
    NotAnImage,
    #[error("a picture of {0}×{1} pixels is too large to decode")]
    TooLarge(u32, u32),
    #[error("undecodable: {0}")]
    Undecodable(String),
}

/// The thumbnail of an upload of type `mime`: PNG when the picture has transparency, JPEG
/// otherwise; a picture already small enough keeps its size (never enlarged). The first frame of
/// an animation. CPU-bound (tens of milliseconds for a phone photo): run it off the async threads.
pub fn make(mime: &str, bytes: &[u8]) -> Result<Thumbnail, Skipped> {
    let format = format_of(mime).ok_or(Skipped::NotAnImage)?;
    let scaled = if format == ImageFormat::Jpeg { jpeg_scaled(bytes)? } else { None };
    let (mut picture, orientation) = match scaled {
        Some(decoded) => decoded,
        None => decode(format, bytes)?,
    };
    // Phone cameras store a photo as the sensor saw it and say how to turn it (EXIF).
    picture.apply_orientation(orientation);
    let small = if picture.width() <= THUMBNAIL_EDGE && picture.height() <= THUMBNAIL_EDGE {
        picture
    } else {
        picture.thumbnail(THUMBNAIL_EDGE, THUMBNAIL_EDGE)
    };
    let mut out = Cursor::new(Vec::new());
    let undecodable = |e: image::ImageError| Skipped::Undecodable(e.to_string());
    let mime = if small.color().has_alpha() {
        small.to_rgba8().write_to(&mut out, ImageFormat::Png).map_err(undecodable)?;
        "image/png"
    } else {
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY);
        small.to_rgb8().write_with_encoder(encoder).map_err(undecodable)?;
        "image/jpeg"
    };
    Ok(Thumbnail { mime: mime.to_string(), bytes: out.into_inner() })
}

/// The whole picture, by the image crate's decoder for `format`.
fn decode(format: ImageFormat, bytes: &[u8]) -> Result<(DynamicImage, Orientation), Skipped> {
    let undecodable = |e: image::ImageError| Skipped::Undecodable(e.to_string());
    let mut decoder = ImageReader::with_format(Cursor::new(bytes), format).into_decoder().map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    check_size(width, height)?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_ALLOC_BYTES);
    decoder.set_limits(limits).map_err(undecodable)?;
    let orientation = decoder.orientation().map_err(undecodable)?;
    Ok((DynamicImage::from_decoder(decoder).map_err(undecodable)?, orientation))
}

/// A JPEG decoded at the smallest DCT scale that still covers the thumbnail; `None` for the
/// pixel formats this path does not take (CMYK, 16-bit grey: rare, and decoded whole instead).
fn jpeg_scaled(bytes: &[u8]) -> Result<Option<(DynamicImage, Orientation)>, Skipped> {
    let undecodable = |e: jpeg_decoder::Error| Skipped::Undecodable(e.to_string());
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.read_info().map_err(undecodable)?;
    let info = decoder.info().ok_or_else(|| Skipped::Undecodable("no JPEG header".into()))?;
    check_size(u32::from(info.width), u32::from(info.height))?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => true,
        jpeg_decoder::PixelFormat::L8 => false,
        _ => return Ok(None),
    };
    decoder.set_max_decoding_buffer_size(MAX_DECODE_ALLOC_BYTES as usize);
    let edge = THUMBNAIL_EDGE as u16;
    let (width, height) = decoder.scale(edge, edge).map_err(undecodable)?;
    let pixels = decoder.decode().map_err(undecodable)?;
    let (width, height) = (u32::from(width), u32::from(height));
    let short = || Skipped::Undecodable("fewer pixels than the header says".into());
    let picture = if rgb {
        DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, pixels).ok_or_else(short)?)
    } else {
        DynamicImage::ImageLuma8(GrayImage::from_raw(width, height, pixels).ok_or_else(short)?)
    };
    let orientation = decoder.exif_data().and_then(Orientation::from_exif_chunk).unwrap_or(Orientation::NoTransforms);
    Ok(Some((picture, orientation)))
}

/// A picture of `width`×`height` (from its header) may be decoded.
fn check_size(width: u32, height: u32) -> Result<(), Skipped> {
    if u64::from(width) * u64::from(height) > MAX_THUMBNAIL_SOURCE_PIXELS {
        return Err(Skipped::TooLarge(width, height));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    use super::*;

    fn encode(picture: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        picture.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn decode(t: &Thumbnail) -> DynamicImage {
        image::load_from_memory(&t.bytes).unwrap()
    }

    #[test]
    fn a_large_photo_shrinks_to_fit_keeping_its_shape() {
        let photo = DynamicImage::ImageRgb8(RgbImage::from_pixel(1200, 900, Rgb([200, 30, 30])));
        let t = make("image/jpeg", &encode(photo, ImageFormat::Jpeg)).unwrap();
        assert_eq!(t.mime, "image/jpeg");
        let small = decode(&t);
        assert_eq!((small.width(), small.height()), (THUMBNAIL_EDGE, 240));
    }

    /// A JPEG with an EXIF APP1 segment saying "rotate 90° clockwise to show" (orientation 6).
    fn with_orientation_6(jpeg: &[u8]) -> Vec<u8> {
        // TIFF header (big-endian), one IFD entry: tag 0x0112, SHORT, count 1, value 6.
        let tiff: &[u8] =
            &[b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(tiff);
        let length = (app1.len() + 2) as u16;
        let mut out = jpeg[..2].to_vec(); // SOI
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn a_photo_is_turned_upright_by_its_exif_orientation() {
        let photo = DynamicImage::ImageRgb8(RgbImage::from_pixel(1200, 900, Rgb([90, 90, 90])));
        let jpeg = with_orientation_6(&encode(photo, ImageFormat::Jpeg));
        let small = decode(&make("image/jpeg", &jpeg).unwrap());
        assert_eq!((small.width(), small.height()), (240, THUMBNAIL_EDGE), "portrait, as the camera was held");
    }

    #[test]
    fn the_scaled_jpeg_path_matches_the_full_decode() {
        // Left half dark, right half light: both paths must keep which side is which.
        let photo = DynamicImage::ImageRgb8(RgbImage::from_fn(1600, 1200, |x, _| {
            if x < 800 {
                Rgb([20, 20, 20])
            } else {
                Rgb([230, 230, 230])
            }
        }));
        let jpeg = encode(photo, ImageFormat::Jpeg);
        let (scaled, _) = jpeg_scaled(&jpeg).unwrap().expect("an RGB JPEG takes the scaled path");
        assert_eq!((scaled.width(), scaled.height()), (400, 300), "1/4 is the smallest scale covering 320");
        let small = decode(&make("image/jpeg", &jpeg).unwrap()).to_rgb8();
        assert_eq!(small.dimensions(), (THUMBNAIL_EDGE, 240));
        assert!(small.get_pixel(40, 120)[0] < 60 && small.get_pixel(280, 120)[0] > 200);
        let grey = DynamicImage::ImageLuma8(GrayImage::from_pixel(700, 700, image::Luma([128])));
        let t = make("image/jpeg", &encode(grey, ImageFormat::Jpeg)).unwrap();
        let grey_small = decode(&t);
        assert_eq!((grey_small.width(), grey_small.height()), (THUMBNAIL_EDGE, THUMBNAIL_EDGE), "a grey JPEG too");
    }

    #[test]
    fn transparency_is_kept_as_png_and_small_pictures_are_not_enlarged() {
        let icon = DynamicImage::ImageRgba8(RgbaImage::from_pixel(40, 20, Rgba([0, 0, 0, 0])));
        let t = make("image/png", &encode(icon, ImageFormat::Png)).unwrap();
        assert_eq!(t.mime, "image/png");
        let small = decode(&t);
        assert_eq!((small.width(), small.height()), (40, 20));
        assert!(small.color().has_alpha());
    }

    #[test]
    fn what_is_not_a_picture_or_too_large_is_skipped_without_decoding() {
        assert_eq!(make("application/pdf", b"%PDF-1.7"), Err(Skipped::NotAnImage));
        assert!(matches!(make("image/png", b"not a png at all"), Err(Skipped::Undecodable(_))));
        // A valid PNG header declaring 30000×30000 pixels, and nothing else: refused from the
        // header, before a byte of pixels is allocated.
        let mut bomb = encode(DynamicImage::ImageRgb8(RgbImage::new(1, 1)), ImageFormat::Png);
        bomb[16..20].copy_from_slice(&30_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&30_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(make("image/png", &bomb), Err(Skipped::TooLarge(30_000, 30_000)));
    }

    /// CRC-32 (IEEE) of a PNG chunk's type and data, so the doctored header is a valid chunk.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
