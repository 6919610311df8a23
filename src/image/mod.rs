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
        ImageLimits { max_pixels: MAX_INTERMEDIATE_PIXELS, max_side: 16384, min_side: 1 }
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
    if format == image::ImageFormat::Jpeg {
        jpeg::check_whole(bytes).map_err(|why| Error::Image(format!("JPEG data ({width}x{height} px) is truncated or corrupt: {why}")))?;
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
    /// The record [`preprocess`] produces for an image of `width` x `height` px, without touching pixels; a
    /// config [`preprocess`] would refuse (a zero size, non-finite statistics) is refused here too, since its
    /// scales would be infinite or NaN and every box mapped through them lost.
    pub fn new(config: &ImageConfig, width: u32, height: u32) -> Result<Self> {
        config.validate().map_err(Error::Image)?;
        Ok(Geometry::new(config, width.max(1), height.max(1)).record(config, width.max(1), height.max(1)))
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
            let pixels = u64::from(resized_width) * u64::from(resized_height);
            if pixels > MAX_INTERMEDIATE_PIXELS {
                return Err(Error::Image(format!(
                    "a {w}x{h} px image is too elongated to centre-crop: its short side scaled to the model's would make \
                     it {resized_width}x{resized_height} px ({pixels} pixels, at most {MAX_INTERMEDIATE_PIXELS}); crop it first"
                )));
            }
            let scaled = imageops::resize(img, resized_width, resized_height, filter);
            imageops::crop_imm(&scaled, left, top, tw, th).to_image()
        }
        Geometry::Pad { side, left, top } => {
            if w == h {
                imageops::resize(img, tw, th, filter)
            } else if u64::from(side) * u64::from(side) <= MAX_INTERMEDIATE_PIXELS {
                let mut canvas = RgbImage::from_pixel(side, side, Rgb(config.pad_color));
                imageops::replace(&mut canvas, img, i64::from(left), i64::from(top));
                imageops::resize(&canvas, tw, th, filter)
            } else {
                pad_resize_in_two_passes(img, config, side, left, top)
            }
        }
    };
    let record = geometry.record(config, w, h);
    Ok(PixelBatch { pixels: normalise(&resized, config), resize: record })
}

/// The most pixels an intermediate image of preprocessing may have (the square canvas of `pad`, the scaled image
/// of `crop`), and the default of [`ImageLimits::max_pixels`] for decoded images. An image within the limits can still be elongated enough to exceed
/// it (16384x14 px pads to a 16384x16384 canvas: 805 MB).
pub const MAX_INTERMEDIATE_PIXELS: u64 = 64 * 1024 * 1024;

/// `pad` for an image whose square canvas would be over [`MAX_INTERMEDIATE_PIXELS`]: the image is first resized
/// along its long side alone, then placed on a canvas that is already the model's size along that side, which is
/// resized along the other. The resampling is separable, so this equals resizing the full canvas up to rounding and
/// clamping of the intermediate image to 8 bits (on test images: mean under 0.1 of a level, at most 8 levels at
/// hard edges), in memory proportional to the long side.
fn pad_resize_in_two_passes(img: &RgbImage, config: &ImageConfig, side: u32, left: u32, top: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (tw, th) = (config.width, config.height);
    let filter = config.interpolation.filter();
    let fill = Rgb(config.pad_color);
    if w >= h {
        // Wide: the canvas adds rows above and below. Columns first, then the rows with the padding.
        let narrow = imageops::resize(img, tw, h, filter);
        let mut canvas = RgbImage::from_pixel(tw, side, fill);
        imageops::replace(&mut canvas, &narrow, 0, i64::from(top));
        imageops::resize(&canvas, tw, th, filter)
    } else {
        let short = imageops::resize(img, w, th, filter);
        let mut canvas = RgbImage::from_pixel(side, th, fill);
        imageops::replace(&mut canvas, &short, i64::from(left), 0);
        imageops::resize(&canvas, tw, th, filter)
    }
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
                // HF shortest_edge, with the smallest short side that makes the scaled image cover the target
                // (HF's shortest_edge = the side, for the usual square targets; for a non-square target no more
                // zoom than the window needs).
                let (rw, rh) = shortest_edge_size(w, h, cover_short_side(w, h, tw, th));
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

/// The short-side length at which a `w` x `h` image scaled by [`shortest_edge_size`] covers a `tw` x `th` window.
fn cover_short_side(w: u32, h: u32, tw: u32, th: u32) -> u32 {
    // The target's extent along the image's short and long sides.
    let (t_short, t_long) = if w <= h { (tw, th) } else { (th, tw) };
    let (short, long) = (u64::from(w.min(h).max(1)), u64::from(w.max(h)));
    // At least t_long * short / long, rounded up; then up while truncation leaves the long side short of t_long.
    let mut s = u64::from(t_short).max((u64::from(t_long) * short).div_ceil(long));
    loop {
        let (rw, rh) = shortest_edge_size(w, h, u32::try_from(s).unwrap_or(u32::MAX));
        let covers = rw >= tw && rh >= th;
        if covers || s >= u64::from(u32::MAX) {
            return u32::try_from(s).unwrap_or(u32::MAX);
        }
        s += 1;
    }
}

/// HF `get_resize_output_image_size(default_to_square=False)`: the short side becomes `short_target`, the long side
/// `int(short_target * long / short)` (truncated), saturating at `u32::MAX` ([`preprocess`] refuses such extreme
/// aspect ratios before it gets here). Returns (width, height).
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

mod jpeg;

#[cfg(test)]
mod tests;
