//! Thumbnails of images sent as files: a small JPEG, at most
//! [`MAX_THUMBNAIL_LEN`](chitchat_proto::chat::MAX_THUMBNAIL_LEN) bytes, carried in the file's
//! message so that members see the picture before they fetch it.
//!
//! The image comes from a sender's own file, but it is decoded with bounds all the same (a
//! crafted file can claim any size): at most [`MAX_SOURCE_LEN`] bytes of source, each side at
//! most [`MAX_SIDE`] pixels, and at most [`MAX_DECODE_ALLOC`] bytes allocated by the decoder.
//! An image outside them, or that does not decode, gets no thumbnail; the file is sent anyway.

use std::io::Cursor;

use image::ImageReader;
use image::codecs::jpeg::JpegEncoder;

/// The largest image (its encoded bytes) a thumbnail is made of.
pub const MAX_SOURCE_LEN: usize = 16 << 20;
/// The longest side of an image a thumbnail is made of, in pixels.
pub const MAX_SIDE: u32 = 8192;
/// The most the decoder may allocate.
pub const MAX_DECODE_ALLOC: u64 = 48 << 20;
/// The thumbnail's longest side, in pixels, at first (smaller ones are tried if it is too long).
const SIDE: u32 = 160;

/// Whether a file of this MIME type may get a thumbnail.
pub fn is_image(mime: &str) -> bool {
    matches!(mime, "image/png" | "image/jpeg" | "image/gif" | "image/webp")
}

/// A JPEG thumbnail of the encoded image `source` that fits in `max_len` bytes, if it decodes
/// within the bounds.
pub fn make(source: &[u8], max_len: usize) -> Option<Vec<u8>> {
    if source.len() > MAX_SOURCE_LEN {
        return None;
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    let mut reader = ImageReader::new(Cursor::new(source)).with_guessed_format().ok()?;
    reader.limits(limits);
    let image = reader.decode().ok()?;
    // Smaller and coarser until it fits.
    for (side, quality) in [(SIDE, 70), (SIDE, 50), (120, 50), (96, 40), (64, 40), (48, 30)] {
        let small = image.thumbnail(side, side).to_rgb8();
        let mut out = Vec::new();
        if JpegEncoder::new_with_quality(&mut out, quality).encode_image(&small).is_err() {
            return None;
        }
        if out.len() <= max_len {
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        // Noise compresses badly: the hardest case for the size bound.
        let mut state = 7u32;
        let image = image::RgbImage::from_fn(width, height, |_, _| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let [a, b, c, _] = state.to_le_bytes();
            image::Rgb([a, b, c])
        });
        let mut out = Vec::new();
        image.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).expect("png");
        out
    }

    #[test]
    fn an_image_gets_a_small_jpeg_that_fits() {
        let max = chitchat_proto::chat::MAX_THUMBNAIL_LEN;
        for (w, h) in [(1200, 800), (30, 2000), (1, 1)] {
            let thumb = make(&png(w, h), max).expect("a thumbnail");
            assert!(thumb.len() <= max, "{} bytes", thumb.len());
            let decoded = image::load_from_memory(&thumb).expect("a JPEG");
            assert!(decoded.width() <= SIDE && decoded.height() <= SIDE);
            assert!(decoded.width() >= 1 && decoded.height() >= 1);
        }
    }

    #[test]
    fn what_is_not_an_image_or_too_large_gets_none() {
        assert_eq!(make(b"not an image at all", 8192), None);
        let mut cut = png(200, 200);
        cut.truncate(cut.len() / 2);
        assert_eq!(make(&cut, 8192), None, "a truncated image");
        // Wider than the limit: refused from its header, before its pixels are allocated.
        assert_eq!(make(&png(MAX_SIDE + 1, 1), 8192), None, "over the side limit");
        // No size fits one byte.
        assert_eq!(make(&png(100, 100), 1), None);
    }
}
