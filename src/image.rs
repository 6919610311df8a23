//! Image decoding (with limits checked from the header) and preprocessing into the vision tower's input.
//!
//! The transform matches the Hugging Face / LLaVA reference: `pad` is LLaVA's `expand2square`, `crop` is
//! `shortest_edge` resizing (`get_resize_output_image_size`, long side truncated) then `center_crop`, `stretch`
//! ignores the aspect ratio. Resampling uses `image::imageops` (CatmullRom for bicubic, like PIL's a = -0.5 kernel
//! with antialiasing when downsampling), so values differ from PIL by a few 1e-3 after normalisation.
//! Every transform is recorded in a [`ResizeRecord`] so a box in model-input pixels maps back to original pixels.

use std::io::Cursor;

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageReader, Rgb};
use ndarray::Array4;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
pub type RgbImage = image::RgbImage;

/// How an image of any aspect ratio becomes the model's fixed input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizePolicy {
    /// Pad to a square with `pad_color` (centred, LLaVA's `expand2square`), then resize.
    Pad,
    /// Resize so the shorter side covers the target (HF `shortest_edge`), then centre-crop.
    Crop,
    /// Resize to width x height, ignoring the aspect ratio.
    Stretch,
}

/// The resampling filter (named after PIL's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Bicubic (Catmull-Rom, a = -0.5).
    Bicubic,
    /// Bilinear (triangle).
    Bilinear,
    /// Nearest neighbour.
    Nearest,
}

impl Interpolation {
    fn filter(self) -> FilterType {
        match self {
            Interpolation::Bicubic => FilterType::CatmullRom,
            Interpolation::Bilinear => FilterType::Triangle,
            Interpolation::Nearest => FilterType::Nearest,
        }
    }
}

/// The manifest's `image` object: model input size, resize policy and normalisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Model input height in pixels.
    pub height: u32,
    /// Model input width in pixels.
    pub width: u32,
    /// How the aspect ratio is handled.
    pub resize: ResizePolicy,
    /// Resampling filter.
    pub interpolation: Interpolation,
    /// 0-255 RGB fill colour for the `pad` policy.
    pub pad_color: [u8; 3],
    /// Factor applied to 0-255 pixel values before normalisation (usually 1/255).
    pub rescale: f32,
    /// Per-channel mean subtracted after rescaling.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
}

/// The largest model input side [`ImageConfig::validate`] accepts.
const MAX_MODEL_SIDE: u32 = 8192;

impl ImageConfig {
    /// Checks the values are usable; the message names the offending field (the caller adds the file).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.height == 0 || self.width == 0 || self.height > MAX_MODEL_SIDE || self.width > MAX_MODEL_SIDE {
            return Err(format!(
                "image.height/width must be in 1..={MAX_MODEL_SIDE}, found {}x{}",
                self.width, self.height
            ));
        }
        if !self.rescale.is_finite() || self.rescale <= 0.0 {
            return Err(format!("image.rescale must be finite and > 0, found {}", self.rescale));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(format!("image.mean must be finite, found {:?}", self.mean));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(format!("image.std must be finite and > 0, found {:?}", self.std));
        }
        Ok(())
    }
}

/// Size limits applied to every input image, checked before any pixel buffer is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted width x height.
    pub max_pixels: u64,
    /// Largest accepted width or height.
    pub max_side: u32,
    /// Smallest accepted width or height (the runtime passes the vision patch size).
    pub min_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits { max_pixels: 64 * 1024 * 1024, max_side: 16384, min_side: 1 }
    }
}

impl ImageLimits {
    /// Default limits with the given smallest side (e.g. the patch size).
    pub fn with_min_side(min_side: u32) -> Self {
        ImageLimits { min_side, ..ImageLimits::default() }
    }

    /// Checks a width x height against the limits.
    pub fn check(&self, width: u32, height: u32) -> Result<()> {
        if width == 0 || height == 0 {
            return Err(Error::Image(format!("image is {width}x{height} px; it has no pixels")));
        }
        if width > self.max_side || height > self.max_side {
            return Err(Error::Image(format!(
                "image is {width}x{height} px; the largest accepted side is {} px",
                self.max_side
            )));
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(Error::Image(format!(
                "image is {width}x{height} px ({pixels} pixels); at most {} pixels are accepted",
                self.max_pixels
            )));
        }
        if width < self.min_side || height < self.min_side {
            return Err(Error::Image(format!(
                "image is {width}x{height} px; the smallest accepted side is {} px",
                self.min_side
            )));
        }
        Ok(())
    }

    /// Bytes a decoder may allocate: enough for 16-bit RGBA at `max_pixels`.
    fn max_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(1 << 20)
    }
}

/// Decodes a PNG or JPEG from memory into RGB8, rejecting images outside `limits` from the header alone.
///
/// EXIF orientation is applied (as HF's `load_image` does), so the result is the image as displayed.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::Image("image data is empty".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(format!("cannot read image data: {e}")))?;
    let format = reader.format().ok_or_else(|| Error::Image("unrecognised image format (PNG and JPEG are supported)".into()))?;
    // The header alone gives the size: reject bombs before any decoder state or pixel buffer exists.
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| image_error("cannot decode image header", e))?;
    limits.check(width, height)?;
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(Error::Image(format!(
            "JPEG data ({width}x{height} px) is truncated: no end-of-image marker after the last scan"
        )));
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_alloc());
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(_) => Error::Image(format!(
            "image header gives a size over the limits (at most {} px per side and {} pixels)",
            limits.max_side, limits.max_pixels
        )),
        other => image_error("cannot decode image header", other),
    })?;
    let (width, height) = decoder.dimensions();
    limits.check(width, height)?;
    if decoder.total_bytes() > limits.max_alloc() {
        return Err(Error::Image(format!(
            "image is {width}x{height} px and would need {} bytes to decode; at most {} are allowed",
            decoder.total_bytes(),
            limits.max_alloc()
        )));
    }
    let orientation = decoder.orientation().ok();
    let mut decoded = DynamicImage::from_decoder(decoder).map_err(|e| image_error("cannot decode image", e))?;
    if let Some(orientation) = orientation {
        decoded.apply_orientation(orientation);
    }
    Ok(decoded.into_rgb8())
}

/// Whether a JPEG stream has an end-of-image marker after its last start-of-scan marker.
///
/// Decoders fill a truncated scan with grey and report success, which would be a silent wrong answer. Entropy-coded
/// data cannot contain 0xFFD9 (0xFF is byte-stuffed), and an EXIF thumbnail's markers all come before the main scans.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_sos {
        Some(at) => bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

fn image_error(context: &str, e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(l) => Error::Image(format!("{context}: image exceeds the size limits ({l})")),
        image::ImageError::Unsupported(u) => Error::Image(format!("{context}: unsupported image ({u})")),
        other => Error::Image(format!("{context}: {other}")),
    }
}

/// Wraps raw RGB8 bytes (row-major, no padding between rows) as an image after checking length and limits.
pub fn rgb_from_raw(width: u32, height: u32, data: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    limits.check(width, height)?;
    let expected = u64::from(width) * u64::from(height) * 3;
    if data.len() as u64 != expected {
        return Err(Error::Image(format!(
            "raw RGB image of {width}x{height} px needs {expected} bytes, got {}",
            data.len()
        )));
    }
    RgbImage::from_raw(width, height, data.to_vec())
        .ok_or_else(|| Error::Image(format!("raw RGB buffer does not fit {width}x{height} px")))
}

/// The affine map from model-input pixel coordinates back to original image pixels.
///
/// Coordinates are continuous with pixel edges at integers (a box `[0, 0, width, height]` covers the whole image):
/// `x_orig = x_model * scale_x + offset_x`, likewise for y.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResizeRecord {
    /// The policy that produced the model input.
    pub policy: ResizePolicy,
    /// Original image width in pixels.
    pub original_width: u32,
    /// Original image height in pixels.
    pub original_height: u32,
    /// Model input width in pixels.
    pub model_width: u32,
    /// Model input height in pixels.
    pub model_height: u32,
    /// Original pixels per model pixel, horizontally.
    pub scale_x: f64,
    /// Original pixels per model pixel, vertically.
    pub scale_y: f64,
    /// Original x of model x = 0 (negative when padding was added on the left).
    pub offset_x: f64,
    /// Original y of model y = 0 (negative when padding was added on top).
    pub offset_y: f64,
}

impl ResizeRecord {
    /// The record [`preprocess`] produces for an image of `width` x `height` px, without touching pixels.
    pub fn new(config: &ImageConfig, width: u32, height: u32) -> Self {
        Geometry::new(config, width.max(1), height.max(1)).record(config, width.max(1), height.max(1))
    }

    /// Maps a point in model-input pixels to original pixels (not clamped).
    pub fn to_original_point(&self, x: f32, y: f32) -> [f32; 2] {
        [
            (f64::from(x) * self.scale_x + self.offset_x) as f32,
            (f64::from(y) * self.scale_y + self.offset_y) as f32,
        ]
    }

    /// Maps a point in original pixels to model-input pixels (the forward transform, not clamped).
    pub fn to_model_point(&self, x: f32, y: f32) -> [f32; 2] {
        [
            ((f64::from(x) - self.offset_x) / self.scale_x) as f32,
            ((f64::from(y) - self.offset_y) / self.scale_y) as f32,
        ]
    }

    /// Maps an `[x1, y1, x2, y2]` box in model-input pixels to original pixels, ordered and clamped to the image.
    pub fn to_original_box(&self, b: [f32; 4]) -> [f32; 4] {
        let [xa, ya] = self.to_original_point(b[0], b[1]);
        let [xb, yb] = self.to_original_point(b[2], b[3]);
        let w = self.original_width as f32;
        let h = self.original_height as f32;
        let clamp = |v: f32, hi: f32| if v.is_nan() { 0.0 } else { v.clamp(0.0, hi) };
        [
            clamp(xa.min(xb), w),
            clamp(ya.min(yb), h),
            clamp(xa.max(xb), w),
            clamp(ya.max(yb), h),
        ]
    }

    /// Maps an `[x1, y1, x2, y2]` box in original pixels to model-input pixels (not clamped).
    pub fn to_model_box(&self, b: [f32; 4]) -> [f32; 4] {
        let [xa, ya] = self.to_model_point(b[0], b[1]);
        let [xb, yb] = self.to_model_point(b[2], b[3]);
        [xa, ya, xb, yb]
    }
}

/// A preprocessed image: `[1, 3, height, width]` normalised f32 pixels plus the transform that produced them.
#[derive(Clone, Debug)]
pub struct PixelBatch {
    /// Normalised pixels, NCHW, batch 1.
    pub pixels: Array4<f32>,
    /// How model-input coordinates map back to the original image.
    pub resize: ResizeRecord,
}

/// Resizes, pads or crops, rescales and normalises an image as the manifest's `image` object says.
pub fn preprocess(img: &RgbImage, config: &ImageConfig) -> Result<PixelBatch> {
    config.validate().map_err(|m| Error::Image(format!("invalid image config: {m}")))?;
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Image(format!("image is {w}x{h} px; it has no pixels")));
    }
    let (tw, th) = (config.width, config.height);
    let filter = config.interpolation.filter();
    let geometry = Geometry::new(config, w, h);
    let resized = match geometry {
        Geometry::Stretch => imageops::resize(img, tw, th, filter),
        Geometry::Crop { resized_width, resized_height, left, top } => {
            let scaled = imageops::resize(img, resized_width, resized_height, filter);
            imageops::crop_imm(&scaled, left, top, tw, th).to_image()
        }
        Geometry::Pad { side, left, top } => {
            if w == h {
                imageops::resize(img, tw, th, filter)
            } else {
                let mut canvas = RgbImage::from_pixel(side, side, Rgb(config.pad_color));
                imageops::replace(&mut canvas, img, i64::from(left), i64::from(top));
                imageops::resize(&canvas, tw, th, filter)
            }
        }
    };
    let record = geometry.record(config, w, h);
    Ok(PixelBatch { pixels: normalise(&resized, config), resize: record })
}

/// The intermediate sizes and offsets of one resize policy applied to one image size.
#[derive(Clone, Copy, Debug)]
enum Geometry {
    Stretch,
    /// Resized to `resized_*` (short side covers the target), then the target window at (left, top) is kept.
    Crop { resized_width: u32, resized_height: u32, left: u32, top: u32 },
    /// Placed at (left, top) on a `side` x `side` canvas, then resized to the target.
    Pad { side: u32, left: u32, top: u32 },
}

impl Geometry {
    fn new(config: &ImageConfig, w: u32, h: u32) -> Self {
        let (tw, th) = (config.width, config.height);
        match config.resize {
            ResizePolicy::Stretch => Geometry::Stretch,
            ResizePolicy::Crop => {
                // HF shortest_edge with the larger target side, so the crop window always fits
                // (identical to HF for the usual square targets).
                let (rw, rh) = shortest_edge_size(w, h, tw.max(th));
                // HF center_crop: integer offsets, floor division; rw >= tw and rh >= th by construction.
                Geometry::Crop {
                    resized_width: rw,
                    resized_height: rh,
                    left: rw.saturating_sub(tw) / 2,
                    top: rh.saturating_sub(th) / 2,
                }
            }
            ResizePolicy::Pad => {
                let side = w.max(h);
                Geometry::Pad { side, left: (side - w) / 2, top: (side - h) / 2 }
            }
        }
    }

    fn record(self, config: &ImageConfig, w: u32, h: u32) -> ResizeRecord {
        let (tw, th) = (f64::from(config.width), f64::from(config.height));
        let (fw, fh) = (f64::from(w), f64::from(h));
        let (scale_x, scale_y, offset_x, offset_y) = match self {
            Geometry::Stretch => (fw / tw, fh / th, 0.0, 0.0),
            Geometry::Crop { resized_width, resized_height, left, top } => {
                let sx = fw / f64::from(resized_width);
                let sy = fh / f64::from(resized_height);
                (sx, sy, f64::from(left) * sx, f64::from(top) * sy)
            }
            Geometry::Pad { side, left, top } => {
                let side = f64::from(side);
                (side / tw, side / th, -f64::from(left), -f64::from(top))
            }
        };
        ResizeRecord {
            policy: config.resize,
            original_width: w,
            original_height: h,
            model_width: config.width,
            model_height: config.height,
            scale_x,
            scale_y,
            offset_x,
            offset_y,
        }
    }
}

/// HF `get_resize_output_image_size(default_to_square=False)`: the short side becomes `short_target`, the long side
/// `int(short_target * long / short)` (truncated). Returns (width, height).
pub fn shortest_edge_size(width: u32, height: u32, short_target: u32) -> (u32, u32) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    // Python: int(requested * long / short); the product is exact in f64, the division correctly rounded.
    let new_long = ((f64::from(short_target) * f64::from(long)) / f64::from(short.max(1))) as u32;
    let new_long = new_long.max(short_target);
    if width <= height {
        (short_target, new_long)
    } else {
        (new_long, short_target)
    }
}

fn normalise(img: &RgbImage, config: &ImageConfig) -> Array4<f32> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut out = Array4::<f32>::zeros((1, 3, h, w));
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            // HF: rescale in f64, cast to f32, then (x - mean) / std in f32.
            let v = (f64::from(p.0[c]) * f64::from(config.rescale)) as f32;
            out[[0, c, y as usize, x as usize]] = (v - config.mean[c]) / config.std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn truncated_jpeg_is_rejected_not_filled_with_grey() {
        let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
        let mut jpg = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg)
            .expect("encode");
        assert!(decode_image(&jpg, &ImageLimits::default()).is_ok());
        let err = decode_image(&jpg[..jpg.len() * 2 / 3], &ImageLimits::default()).expect_err("truncated");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    use super::*;

    #[allow(clippy::excessive_precision)] // CLIP's published constants, verbatim
    fn config(resize: ResizePolicy, width: u32, height: u32) -> ImageConfig {
        ImageConfig {
            height,
            width,
            resize,
            interpolation: Interpolation::Bicubic,
            pad_color: [122, 116, 104],
            rescale: 1.0 / 255.0,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.26130258, 0.27577711],
        }
    }

    fn png_bytes(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        let enc = image::codecs::png::PngEncoder::new(&mut out);
        let r = img.write_with_encoder(enc);
        assert!(r.is_ok());
        out
    }

    #[test]
    fn deserializes_manifest_image_object() {
        let json = r#"{"height": 336, "width": 336, "resize": "pad", "interpolation": "bicubic",
            "pad_color": [122, 116, 104], "rescale": 0.00392156862745098,
            "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}"#;
        let c: ImageConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.resize, ResizePolicy::Pad);
        assert_eq!(c.interpolation, Interpolation::Bicubic);
        assert_eq!(c.pad_color, [122, 116, 104]);
        assert!(c.validate().is_ok());
        let back: ImageConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        for (s, p) in [("crop", ResizePolicy::Crop), ("stretch", ResizePolicy::Stretch)] {
            let j = json.replace("\"pad\"", &format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<ImageConfig>(&j).unwrap().resize, p);
        }
        assert!(serde_json::from_str::<ImageConfig>(&json.replace("\"pad\"", "\"Pad\"")).is_err());
    }

    #[test]
    fn rejects_bad_config() {
        let mut c = config(ResizePolicy::Pad, 8, 8);
        c.std[1] = 0.0;
        assert!(c.validate().unwrap_err().contains("image.std"));
        let img = RgbImage::new(4, 4);
        assert!(matches!(preprocess(&img, &c), Err(Error::Image(_))));
    }

    #[test]
    fn decodes_png_and_rejects_garbage() {
        let img = RgbImage::from_fn(20, 16, |x, y| Rgb([x as u8 * 10, y as u8 * 10, 7]));
        let bytes = png_bytes(&img);
        let limits = ImageLimits::with_min_side(14);
        let back = decode_image(&bytes, &limits).unwrap();
        assert_eq!(back, img);
        // Truncated.
        let e = decode_image(&bytes[..bytes.len() / 2], &limits).unwrap_err();
        assert!(matches!(e, Error::Image(_)), "{e}");
        let e = decode_image(&bytes[..20], &limits).unwrap_err();
        assert!(matches!(e, Error::Image(_)), "{e}");
        // Unknown format and empty.
        let e = decode_image(b"this is not an image at all", &limits).unwrap_err();
        assert!(e.to_string().contains("unrecognised"), "{e}");
        assert!(decode_image(&[], &limits).is_err());
        // Corrupt JPEG (valid magic, junk after).
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
        jpeg.extend_from_slice(&[0x13; 64]);
        assert!(matches!(decode_image(&jpeg, &limits), Err(Error::Image(_))));
    }

    #[test]
    fn rejects_too_small() {
        let bytes = png_bytes(&RgbImage::new(1, 1));
        let e = decode_image(&bytes, &ImageLimits::with_min_side(14)).unwrap_err();
        assert_eq!(e.to_string(), "image: image is 1x1 px; the smallest accepted side is 14 px");
        let e = rgb_from_raw(30, 13, &[0; 30 * 13 * 3], &ImageLimits::with_min_side(14)).unwrap_err();
        assert!(e.to_string().contains("30x13"), "{e}");
    }

    /// A PNG whose IHDR claims 20000 x 20000 but that carries only a few bytes of data.
    fn bomb_png(width: u32, height: u32) -> Vec<u8> {
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        push_chunk(&mut png, b"IHDR", &ihdr);
        push_chunk(&mut png, b"IDAT", &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        push_chunk(&mut png, b"IEND", &[]);
        png
    }

    fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn rejects_decompression_bomb_from_header() {
        let limits = ImageLimits::default();
        let e = decode_image(&bomb_png(20000, 20000), &limits).unwrap_err();
        assert!(e.to_string().contains("20000x20000"), "{e}");
        // Within max_side but over max_pixels: caught by our own header check.
        let e = decode_image(&bomb_png(16000, 16000), &limits).unwrap_err();
        assert!(e.to_string().contains("pixels"), "{e}");
        // Within all limits: the header passes and decoding fails on the missing data, without allocating 40 GB.
        let e = decode_image(&bomb_png(4000, 4000), &limits).unwrap_err();
        assert!(matches!(e, Error::Image(_)), "{e}");
    }

    #[test]
    fn raw_rgb_length_checked() {
        let limits = ImageLimits::default();
        assert!(rgb_from_raw(4, 2, &[0; 24], &limits).is_ok());
        let e = rgb_from_raw(4, 2, &[0; 23], &limits).unwrap_err();
        assert!(e.to_string().contains("needs 24 bytes, got 23"), "{e}");
        assert!(rgb_from_raw(0, 2, &[], &limits).is_err());
        assert!(rgb_from_raw(u32::MAX, u32::MAX, &[], &limits).is_err());
    }

    #[test]
    fn hf_shortest_edge_truncates() {
        // 336 * 640 / 480 = 448 exactly; 336 * 500 / 333 = 504.5045 -> 504; portrait mirrors.
        assert_eq!(shortest_edge_size(640, 480, 336), (448, 336));
        assert_eq!(shortest_edge_size(500, 333, 336), (504, 336));
        assert_eq!(shortest_edge_size(333, 500, 336), (336, 504));
        assert_eq!(shortest_edge_size(100, 100, 336), (336, 336));
        // 336 * 1001 / 999 = 336.67 -> 336
        assert_eq!(shortest_edge_size(999, 1001, 336), (336, 336));
    }

    #[test]
    fn stretch_output_shape_and_normalisation() {
        let img = RgbImage::from_pixel(50, 30, Rgb([255, 0, 128]));
        let c = config(ResizePolicy::Stretch, 28, 14);
        let b = preprocess(&img, &c).unwrap();
        assert_eq!(b.pixels.shape(), &[1, 3, 14, 28]);
        for (ch, v) in [255.0f32, 0.0, 128.0].into_iter().enumerate() {
            let want = (v / 255.0 - c.mean[ch]) / c.std[ch];
            assert!((b.pixels[[0, ch, 7, 9]] - want).abs() < 1e-5);
        }
    }

    #[test]
    fn pad_fills_with_pad_color() {
        // 40 wide, 20 tall, white: padded rows on top/bottom take pad_color.
        let img = RgbImage::from_pixel(40, 20, Rgb([255, 255, 255]));
        let mut c = config(ResizePolicy::Pad, 40, 40);
        c.interpolation = Interpolation::Nearest;
        let b = preprocess(&img, &c).unwrap();
        let top = b.pixels[[0, 0, 0, 20]];
        let want_pad = (122.0 / 255.0 - c.mean[0]) / c.std[0];
        assert!((top - want_pad).abs() < 1e-5);
        let mid = b.pixels[[0, 0, 20, 20]];
        assert!((mid - (1.0 - c.mean[0]) / c.std[0]).abs() < 1e-5);
        assert_eq!(b.resize.offset_y, -10.0);
        assert_eq!(b.resize.offset_x, 0.0);
    }

    #[test]
    fn crop_takes_the_centre() {
        // 30x10 image, columns coloured by x; crop to 10x10 with nearest keeps columns 10..20.
        let img = RgbImage::from_fn(30, 10, |x, _| Rgb([x as u8, 0, 0]));
        let mut c = config(ResizePolicy::Crop, 10, 10);
        c.interpolation = Interpolation::Nearest;
        c.mean = [0.0; 3];
        c.std = [1.0; 3];
        c.rescale = 1.0;
        let b = preprocess(&img, &c).unwrap();
        assert_eq!(b.pixels[[0, 0, 0, 0]], 10.0);
        assert_eq!(b.pixels[[0, 0, 5, 9]], 19.0);
        assert_eq!(b.resize.offset_x, 10.0);
    }

    fn assert_box_close(a: [f32; 4], b: [f32; 4]) {
        for i in 0..4 {
            assert!((a[i] - b[i]).abs() < 1e-3, "{a:?} vs {b:?}");
        }
    }

    #[derive(serde::Deserialize)]
    struct GoldenCase {
        image: String,
        expected: String,
        config: ImageConfig,
    }

    /// Parity with transformers' PIL backend (tests/data/image/make_golden.py): image-rs resampling is not PIL's,
    /// so values differ by a few 8-bit levels at sharp edges (1 level = 1/255/std ~ 0.015) and very little on average.
    #[test]
    fn matches_pil_reference() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/image");
        let cases: Vec<GoldenCase> =
            serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
        assert_eq!(cases.len(), 11);
        for case in cases {
            let img = decode_image(&std::fs::read(dir.join(&case.image)).unwrap(), &ImageLimits::default()).unwrap();
            let want: Vec<f32> = std::fs::read(dir.join(&case.expected))
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let got = preprocess(&img, &case.config).unwrap().pixels;
            assert_eq!(got.len(), want.len());
            let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
            let max = diffs.iter().cloned().fold(0.0, f32::max);
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            // Measured: nearest is exact; bilinear and bicubic differ by <= 1 level except a few bicubic edge
            // pixels (up to 7 levels, PIL clips between its two passes); the mean stays ~0.003.
            let (max_tol, mean_tol) = match case.config.interpolation {
                Interpolation::Nearest => (1e-6, 1e-7),
                Interpolation::Bilinear => (0.016, 0.004),
                Interpolation::Bicubic => (0.11, 0.004),
            };
            assert!(max <= max_tol && mean <= mean_tol, "{}: max {max} mean {mean}", case.expected);
        }
    }

    #[test]
    fn round_trip_stretch() {
        let img = RgbImage::new(640, 480);
        let r = preprocess(&img, &config(ResizePolicy::Stretch, 336, 336)).unwrap().resize;
        let orig = [64.0, 48.0, 320.0, 240.0];
        // By hand: x * 336/640, y * 336/480.
        let model = [33.6, 33.6, 168.0, 168.0];
        assert_box_close(r.to_model_box(orig), model);
        assert_box_close(r.to_original_box(model), orig);
    }

    #[test]
    fn round_trip_crop() {
        // 640x480 -> 448x336, crop left = (448-336)/2 = 56, top = 0.
        let img = RgbImage::new(640, 480);
        let r = preprocess(&img, &config(ResizePolicy::Crop, 336, 336)).unwrap().resize;
        let orig = [200.0, 48.0, 400.0, 240.0];
        let s = 336.0 / 480.0;
        let model = [200.0 * s - 56.0, 48.0 * s, 400.0 * s - 56.0, 240.0 * s];
        assert_box_close(r.to_model_box(orig), model);
        assert_box_close(r.to_original_box(model), orig);
        // A box reaching into the cropped-away area maps to the image edge at most.
        let full = r.to_original_box([0.0, 0.0, 336.0, 336.0]);
        assert_box_close(full, [80.0, 0.0, 560.0, 480.0]);
        // Portrait, odd sizes: 333x500 -> 336x504, top = (504-336)/2 = 84.
        let r = preprocess(&RgbImage::new(333, 500), &config(ResizePolicy::Crop, 336, 336)).unwrap().resize;
        let orig = [10.0, 100.0, 300.0, 400.0];
        let (sx, sy) = (336.0 / 333.0, 504.0 / 500.0);
        let model = [10.0 * sx, 100.0 * sy - 84.0, 300.0 * sx, 400.0 * sy - 84.0];
        assert_box_close(r.to_model_box(orig), model);
        assert_box_close(r.to_original_box(model), orig);
    }

    #[test]
    fn round_trip_pad() {
        // 640x480 -> 640x640 canvas, image at y offset 80, then 336/640.
        let img = RgbImage::new(640, 480);
        let r = preprocess(&img, &config(ResizePolicy::Pad, 336, 336)).unwrap().resize;
        let orig = [64.0, 48.0, 320.0, 240.0];
        let s = 336.0 / 640.0;
        let model = [64.0 * s, (48.0 + 80.0) * s, 320.0 * s, (240.0 + 80.0) * s];
        assert_box_close(r.to_model_box(orig), model);
        assert_box_close(r.to_original_box(model), orig);
        // The whole model input maps to the whole image (padding clamped away).
        assert_box_close(r.to_original_box([0.0, 0.0, 336.0, 336.0]), [0.0, 0.0, 640.0, 480.0]);
        // Portrait 301x500: x offset (500-301)/2 = 99.
        let r = preprocess(&RgbImage::new(301, 500), &config(ResizePolicy::Pad, 336, 336)).unwrap().resize;
        assert_eq!(r.offset_x, -99.0);
        let orig = [1.0, 2.0, 300.0, 499.0];
        let s = 336.0 / 500.0;
        let model = [100.0 * s, 2.0 * s, 399.0 * s, 499.0 * s];
        assert_box_close(r.to_model_box(orig), model);
        assert_box_close(r.to_original_box(model), orig);
    }

    #[test]
    fn to_original_box_orders_and_clamps() {
        let r = preprocess(&RgbImage::new(100, 50), &config(ResizePolicy::Stretch, 10, 10)).unwrap().resize;
        assert_box_close(r.to_original_box([8.0, 9.0, 2.0, -3.0]), [20.0, 0.0, 80.0, 45.0]);
        let b = r.to_original_box([f32::NAN, f32::NAN, f32::NAN, f32::NAN]);
        assert!(b.iter().all(|v| v.is_finite()), "{b:?}");
    }
}
