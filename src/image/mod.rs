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
        check_jpeg_whole(bytes).map_err(|why| Error::Image(format!("JPEG data ({width}x{height} px) is truncated or corrupt: {why}")))?;
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

/// Whether a JPEG stream is whole: walks the marker segments from the start (skipping each segment by its length,
/// so an EXIF thumbnail inside APP1 is never mistaken for the main image) and each scan's entropy-coded data to the
/// next marker, and stops at the first end-of-image. Whatever follows it (the video of a motion photo, vendor
/// trailers) is not looked at. The scans of a Huffman-coded image, sequential (baseline or extended) or
/// progressive, are decoded far enough to count their blocks: a scan that ends before its last MCU was cut short,
/// even where an end-of-image marker follows (a download cut off and "repaired"). At the end, every component must
/// have been coded, and in a progressive image every coefficient down to its last bit (what every encoder's scan
/// script does; a file cut between two scans would decode as a blurred preview). Arithmetic-coded, lossless and
/// hierarchical scans are only walked.
///
/// Decoders fill a missing or broken scan with grey and report success, which would be a silent wrong answer.
fn check_jpeg_whole(bytes: &[u8]) -> std::result::Result<(), String> {
    const NO_END: &str = "no end-of-image marker after the last scan";
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("no start-of-image marker".into());
    }
    let mut frame: Option<jpeg_scan::Frame> = None;
    let mut tables = jpeg_scan::Tables::default();
    let mut progress = jpeg_scan::Progress::default();
    let mut scans = 0usize;
    // The ids of the components the scans so far have coded.
    let mut coded: Vec<u8> = Vec::new();
    let mut at = 2;
    loop {
        // Stray bytes between segments are skipped to the next marker, as libjpeg (with a warning) and the decoder
        // do; fill bytes (0xFF runs) may precede a marker.
        let Some(rel) = bytes.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) else { return Err(NO_END.into()) };
        at += rel;
        while bytes.get(at) == Some(&0xFF) && bytes.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) else { return Err(NO_END.into()) };
        at += 2;
        match marker {
            0xD9 => {
                // A sequential image codes each component in one scan: a file cut between two scans (its end marker
                // appended) would draw the missing components grey.
                if let Some(f) = frame.as_ref().filter(|f| f.sequential_huffman && f.height > 0) {
                    if let Some(c) = f.components.iter().find(|c| !coded.contains(&c.0)) {
                        return Err(format!("the image ends before its component {} is coded in a scan", c.0));
                    }
                }
                if let Some(why) = frame.as_ref().filter(|f| f.progressive && f.height > 0).and_then(|f| progress.incomplete(f)) {
                    return Err(why);
                }
                return Ok(());
            }
            // Markers without a length: TEM, RSTn (outside a scan they carry nothing).
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else { return Err(NO_END.into()) };
        if len < 2 {
            return Err(format!("a segment (marker 0xFF{marker:02X}) has length {len}"));
        }
        let Some(body) = bytes.get(at + 2..at + len) else { return Err(NO_END.into()) };
        at += len;
        match marker {
            0xC0..=0xCF if marker != 0xC4 && marker != 0xC8 && marker != 0xCC => {
                // One frame per image (a thumbnail's sits inside its APP segment, skipped above): a second one could
                // claim other dimensions than those the size limits were checked against.
                if frame.is_some() {
                    return Err(format!("a second frame header (marker 0xFF{marker:02X})"));
                }
                frame = Some(jpeg_scan::Frame::parse(marker, body)?);
            }
            0xC4 => tables.define_huffman(body)?,
            0xDD => tables.define_restart_interval(body)?,
            _ => {}
        }
        if marker == 0xDA {
            scans += 1;
            let n = usize::from(body.first().copied().unwrap_or(0));
            coded.extend(body.get(1..1 + 2 * n).unwrap_or_default().chunks_exact(2).map(|s| s[0]));
            if let Some(f) = frame.as_ref().filter(|f| (f.sequential_huffman || f.progressive) && f.height > 0) {
                at = jpeg_scan::check_scan(f, &tables, &mut progress, body, bytes, at).map_err(|e| format!("scan {scans}: {e}"))?;
            }
            // Entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte) or RSTn inside it; any other marker ends it.
            loop {
                let Some(rel) = bytes.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) else { return Err(NO_END.into()) };
                at += rel;
                match bytes.get(at + 1) {
                    None => return Err(NO_END.into()),
                    Some(0x00 | 0xD0..=0xD7) => at += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Counting the MCUs of a Huffman-coded scan without reconstructing pixels (ITU T.81, F.2.2 sequential, G.1.2
/// progressive).
mod jpeg_scan {
    /// What the frame header says about the block layout.
    pub(super) struct Frame {
        /// Baseline or extended sequential, Huffman-coded (SOF0, SOF1): the scans can be counted.
        pub sequential_huffman: bool,
        /// Progressive, Huffman-coded (SOF2): the scans can be counted too.
        pub progressive: bool,
        pub width: usize,
        pub height: usize,
        /// (component id, horizontal sampling, vertical sampling)
        pub components: Vec<(u8, usize, usize)>,
    }

    impl Frame {
        pub fn parse(marker: u8, body: &[u8]) -> Result<Frame, String> {
            let bad = || format!("the frame header (marker 0xFF{marker:02X}) is malformed");
            let (&[_precision, h1, h0, w1, w0, n], rest) = body.split_first_chunk::<6>().ok_or_else(bad)?;
            let n = usize::from(n);
            if n == 0 || rest.len() < 3 * n {
                return Err(bad());
            }
            let components = rest[..3 * n]
                .chunks_exact(3)
                .map(|c| (c[0], usize::from(c[1] >> 4), usize::from(c[1] & 15)))
                .collect::<Vec<_>>();
            if components.iter().any(|&(_, h, v)| !(1..=4).contains(&h) || !(1..=4).contains(&v)) {
                return Err(format!("the frame header (marker 0xFF{marker:02X}) has a sampling factor outside 1-4"));
            }
            Ok(Frame {
                sequential_huffman: matches!(marker, 0xC0 | 0xC1),
                progressive: marker == 0xC2,
                width: usize::from(u16::from_be_bytes([w1, w0])),
                height: usize::from(u16::from_be_bytes([h1, h0])),
                components,
            })
        }
    }

    /// Bits looked up at once; longer codes are decoded length by length (F.2.2.3).
    const FAST_BITS: u32 = 9;

    /// A canonical Huffman table.
    #[derive(Clone)]
    struct Huffman {
        /// Per code length 1..=16: the first code, its count, and the index of its first symbol.
        first: [i32; 17],
        count: [i32; 17],
        offset: [usize; 17],
        symbols: Vec<u8>,
        /// For each FAST_BITS-bit prefix: (code length, symbol) of the code it starts with, length 0 if longer.
        fast: Vec<(u8, u8)>,
    }

    #[derive(Default)]
    pub(super) struct Tables {
        dc: [Option<Huffman>; 4],
        ac: [Option<Huffman>; 4],
        restart_interval: usize,
    }

    impl Tables {
        pub fn define_huffman(&mut self, mut body: &[u8]) -> Result<(), String> {
            while !body.is_empty() {
                let bad = || "a Huffman table segment is malformed".to_string();
                let (&class_id, rest) = body.split_first().ok_or_else(bad)?;
                let counts = rest.get(..16).ok_or_else(bad)?;
                let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
                let symbols = rest.get(16..16 + total).ok_or_else(bad)?.to_vec();
                let (mut first, mut count, mut offset) = ([0i32; 17], [0i32; 17], [0usize; 17]);
                let (mut code, mut index) = (0i32, 0usize);
                for len in 1..=16 {
                    let c = i32::from(counts[len - 1]);
                    (first[len], count[len], offset[len]) = (code, c, index);
                    code = (code + c) << 1;
                    index += usize::from(counts[len - 1]);
                }
                let mut fast = vec![(0u8, 0u8); 1 << FAST_BITS];
                for len in 1..=FAST_BITS as usize {
                    for k in 0..count[len] {
                        let Some(&symbol) = symbols.get(offset[len] + k as usize) else { break };
                        // Every FAST_BITS-bit prefix that starts with this code.
                        let shift = FAST_BITS as usize - len;
                        let base = ((first[len] + k) as usize) << shift;
                        for e in fast.iter_mut().skip(base).take(1 << shift) {
                            *e = (len as u8, symbol);
                        }
                    }
                }
                let table = Huffman { first, count, offset, symbols, fast };
                let slot = usize::from(class_id & 15);
                match (class_id >> 4, slot) {
                    (0, 0..=3) => self.dc[slot] = Some(table),
                    (1, 0..=3) => self.ac[slot] = Some(table),
                    _ => return Err(format!("a Huffman table has class/id 0x{class_id:02X}")),
                }
                body = &rest[16 + total..];
            }
            Ok(())
        }

        pub fn define_restart_interval(&mut self, body: &[u8]) -> Result<(), String> {
            let b = body.get(..2).ok_or("the restart interval segment is malformed")?;
            self.restart_interval = usize::from(u16::from_be_bytes([b[0], b[1]]));
            Ok(())
        }
    }

    /// Entropy-coded bits, with stuffed zero bytes removed; stops at any marker.
    struct Bits<'a> {
        data: &'a [u8],
        /// The next byte not yet in `acc`.
        pos: usize,
        /// The low `n` bits are the next bits of the scan.
        acc: u64,
        n: u32,
        /// `pos` is at a marker: no more bits until a restart.
        marker: bool,
    }

    impl Bits<'_> {
        fn refill(&mut self) {
            while self.n <= 56 && !self.marker {
                let Some(&b) = self.data.get(self.pos) else {
                    self.marker = true;
                    break;
                };
                if b == 0xFF {
                    if self.data.get(self.pos + 1) != Some(&0x00) {
                        self.marker = true; // the scan's data ends here (or at a restart)
                        break;
                    }
                    self.pos += 1;
                }
                self.pos += 1;
                self.acc = (self.acc << 8) | u64::from(b);
                self.n += 8;
            }
        }

        /// The next `k` bits (zeros past the end of the data).
        fn peek(&self, k: u32) -> usize {
            let v = if self.n >= k { self.acc >> (self.n - k) } else { self.acc << (k - self.n) };
            (v & ((1u64 << k) - 1)) as usize
        }

        fn consume(&mut self, k: u32) -> Result<(), Stop> {
            if k > self.n {
                return Err(Stop::End);
            }
            self.n -= k;
            Ok(())
        }

        /// The next `k` bits as a number (k <= 16).
        fn take(&mut self, k: u32) -> Result<u32, Stop> {
            if self.n < k {
                self.refill();
            }
            let v = self.peek(k) as u32;
            self.consume(k)?;
            Ok(v)
        }

        /// The next symbol of table `t`, with the `extra(symbol)` value bits after its code skipped.
        fn symbol(&mut self, t: &Huffman, extra: impl Fn(u8) -> u8) -> Result<u8, Stop> {
            // A code and its value bits are at most 32 bits.
            if self.n < 32 {
                self.refill();
            }
            let (len, symbol) = t.fast[self.peek(FAST_BITS)];
            if len > 0 {
                self.consume(u32::from(len) + u32::from(extra(symbol)))?;
                return Ok(symbol);
            }
            for len in FAST_BITS as usize + 1..=16 {
                let k = self.peek(len as u32) as i32 - t.first[len];
                if k < t.count[len] {
                    let symbol = t.symbols.get(t.offset[len] + k as usize).copied().ok_or(Stop::Corrupt("a Huffman table is short"))?;
                    self.consume(len as u32 + u32::from(extra(symbol)))?;
                    return Ok(symbol);
                }
            }
            // Past the end of the data, the zeros may form no code: the data ended, it is not corrupt.
            if self.n < 16 {
                return Err(Stop::End);
            }
            Err(Stop::Corrupt("a code matches no Huffman table entry"))
        }

        /// Past a restart marker (byte-aligned, fill bytes allowed), or None where there is none.
        fn restart(&mut self) -> Option<()> {
            (self.acc, self.n, self.marker) = (0, 0, false);
            let mut p = self.pos;
            while self.data.get(p) == Some(&0xFF) && self.data.get(p + 1) == Some(&0xFF) {
                p += 1;
            }
            match (self.data.get(p), self.data.get(p + 1)) {
                (Some(0xFF), Some(0xD0..=0xD7)) => {
                    self.pos = p + 2;
                    Some(())
                }
                _ => None,
            }
        }
    }

    enum Stop {
        End,
        Corrupt(&'static str),
    }

    /// One block of a sequential scan: its DC difference and AC coefficients (F.2.2).
    fn block(bits: &mut Bits, dc: &Huffman, ac: &Huffman) -> Result<(), Stop> {
        dc_first(bits, dc)?;
        let mut k = 1;
        while k < 64 {
            // An AC symbol is a zero run (high nibble) and the size of the coefficient that follows (low nibble).
            let rs = bits.symbol(ac, |s| s & 15)?;
            let (run, size) = (rs >> 4, rs & 15);
            if size == 0 {
                if run != 15 {
                    return Ok(()); // end of block
                }
                k += 16;
                continue;
            }
            k += usize::from(run) + 1;
        }
        if k > 64 {
            return Err(Stop::Corrupt("a block has more than 64 coefficients"));
        }
        Ok(())
    }

    /// A DC difference: a symbol giving its size, then that many bits (at most 16: more is corrupt).
    fn dc_first(bits: &mut Bits, dc: &Huffman) -> Result<(), Stop> {
        if bits.symbol(dc, |s| s.min(16))? > 16 {
            return Err(Stop::Corrupt("a DC difference is over 16 bits"));
        }
        Ok(())
    }

    /// The first pass over a band of AC coefficients of one block (G.1.2.2): `eobrun` blocks left in a run of
    /// empty ones, `nonzero` the block's coefficients known to be nonzero.
    fn ac_first(bits: &mut Bits, ac: &Huffman, (ss, se): (usize, usize), eobrun: &mut u32, nonzero: &mut u64) -> Result<(), Stop> {
        if *eobrun > 0 {
            *eobrun -= 1;
            return Ok(());
        }
        let mut k = ss;
        while k <= se {
            let rs = bits.symbol(ac, |s| s & 15)?;
            let (run, size) = (rs >> 4, rs & 15);
            if size == 0 {
                if run < 15 {
                    // This block and (2^run - 1 + the next run bits) more end here.
                    *eobrun = (1 << run) - 1 + if run > 0 { bits.take(u32::from(run))? } else { 0 };
                    return Ok(());
                }
                k += 16;
                continue;
            }
            k += usize::from(run);
            if k < 64 {
                *nonzero |= 1 << k;
            }
            k += 1;
        }
        Ok(())
    }

    /// A refinement pass over a band of AC coefficients of one block (G.1.2.3): a correction bit for every
    /// coefficient already nonzero, and new coefficients of magnitude one placed among the zero ones. Follows
    /// libjpeg's decoder (jdphuff.c) step for step, so a stream it reads is read the same way.
    fn ac_refine(bits: &mut Bits, ac: &Huffman, (ss, se): (usize, usize), eobrun: &mut u32, nonzero: &mut u64) -> Result<(), Stop> {
        let mut k = ss;
        if *eobrun == 0 {
            while k <= se {
                let rs = bits.symbol(ac, |_| 0)?;
                let (mut run, size) = (i32::from(rs >> 4), rs & 15);
                if size != 0 {
                    bits.take(1)?; // the new coefficient's sign
                } else if run != 15 {
                    *eobrun = (1 << run) + if run > 0 { bits.take(run as u32)? } else { 0 };
                    break;
                }
                // Past the nonzero coefficients (a correction bit each) and `run` zero ones.
                while k <= se {
                    if *nonzero & (1 << k) != 0 {
                        bits.take(1)?;
                    } else {
                        run -= 1;
                        if run < 0 {
                            break;
                        }
                    }
                    k += 1;
                }
                if size != 0 && k < 64 {
                    *nonzero |= 1 << k;
                }
                k += 1;
            }
        }
        if *eobrun > 0 {
            // In a run of blocks with no new coefficient: the correction bits of the rest of the band.
            while k <= se {
                if *nonzero & (1 << k) != 0 {
                    bits.take(1)?;
                }
                k += 1;
            }
            *eobrun -= 1;
        }
        Ok(())
    }

    /// What one scan codes (G.1.1.1): every coefficient (sequential), or in a progressive image the DC or a band of
    /// AC coefficients (`ss..=se`), first (Ah = 0) or one more bit of each (Ah > 0).
    #[derive(Clone, Copy)]
    enum Pass {
        Sequential,
        DcFirst,
        DcRefine,
        AcFirst(usize, usize),
        AcRefine(usize, usize),
    }

    /// Per component of a progressive image, per block: the AC coefficients known to be nonzero, which a
    /// refinement scan sends a correction bit for. Kept from scan to scan.
    #[derive(Default)]
    pub(super) struct Progress {
        nonzero: Vec<Vec<u64>>,
        /// Per component, per coefficient (zigzag order): the lowest bit position (Al) its scans have coded so far,
        /// `UNCODED` before any.
        al: Vec<[u8; 64]>,
    }

    const UNCODED: u8 = u8::MAX;

    impl Progress {
        /// Why the scans so far do not give every coefficient of every component in full (Al = 0), if they do not:
        /// a progressive file cut between two scans (its end marker appended) decodes as a blurred or colourless
        /// preview of the image.
        pub fn incomplete(&self, f: &Frame) -> Option<String> {
            f.components.iter().enumerate().find_map(|(c, &(id, ..))| {
                let al = self.al.get(c).copied().unwrap_or([UNCODED; 64]);
                let k = al.iter().position(|&a| a != 0)?;
                Some(if al[k] == UNCODED {
                    format!("the image ends before coefficient {k} of component {id} is coded")
                } else {
                    format!("the image ends before coefficient {k} of component {id} is refined to its last bit")
                })
            })
        }
    }

    /// Decodes the scan whose header is `header` and whose data starts at `bytes[at..]`, and returns where its last
    /// MCU ended, or why the scan is not whole.
    pub(super) fn check_scan(f: &Frame, tables: &Tables, progress: &mut Progress, header: &[u8], bytes: &[u8], at: usize) -> Result<usize, String> {
        let bad = || "its header is malformed".to_string();
        let n = usize::from(*header.first().ok_or_else(bad)?);
        let selectors = header.get(1..1 + 2 * n).ok_or_else(bad)?;
        let &[ss, se, a] = header.get(1 + 2 * n..4 + 2 * n).ok_or_else(bad)? else { return Err(bad()) };
        let (ss, se, ah, al) = (usize::from(ss), usize::from(se), a >> 4, a & 15);
        let pass = match (f.progressive, ss, ah) {
            (false, _, _) => Pass::Sequential,
            (true, 0, 0) => Pass::DcFirst,
            (true, 0, _) => Pass::DcRefine,
            _ if se < ss || se > 63 || n != 1 => return Err(format!("its spectral band {ss}..{se} over {n} components is invalid")),
            (true, _, 0) => Pass::AcFirst(ss, se),
            (true, _, _) => Pass::AcRefine(ss, se),
        };
        let (hmax, vmax) = f.components.iter().fold((1, 1), |(h, v), c| (h.max(c.1), v.max(c.2)));
        let div = |a: usize, b: usize| a.div_ceil(b);
        let (mcux, mcuy) = (div(f.width, 8 * hmax), div(f.height, 8 * vmax));
        // Per scan component: its index in the frame, the Huffman tables its pass reads, its sampling.
        let mut parts = Vec::with_capacity(n);
        for s in selectors.chunks_exact(2) {
            let c = f.components.iter().position(|c| c.0 == s[0]).ok_or_else(|| format!("it names component {} the frame lacks", s[0]))?;
            let dc = tables.dc.get(usize::from(s[1] >> 4)).and_then(Option::as_ref);
            let ac = tables.ac.get(usize::from(s[1] & 15)).and_then(Option::as_ref);
            let needs_dc = matches!(pass, Pass::Sequential | Pass::DcFirst);
            let needs_ac = matches!(pass, Pass::Sequential | Pass::AcFirst(..) | Pass::AcRefine(..));
            if (needs_dc && dc.is_none()) || (needs_ac && ac.is_none()) {
                return Err("it uses a Huffman table that is not defined".into());
            }
            parts.push((c, dc, ac));
        }
        // One component: its own blocks in raster order, one per MCU (A.2.2); several: MCUs of h x v blocks each.
        let (mcus, cols) = if let [(c, ..)] = parts[..] {
            let (_, h, v) = f.components[c];
            let cols = div(div(f.width * h, hmax), 8);
            (cols * div(div(f.height * v, vmax), 8), cols)
        } else {
            (mcux * mcuy, mcux)
        };
        if let (Pass::AcFirst(..) | Pass::AcRefine(..), [(c, ..)]) = (pass, &parts[..]) {
            if progress.nonzero.len() != f.components.len() {
                progress.nonzero = vec![Vec::new(); f.components.len()];
            }
            let (_, h, v) = f.components[*c];
            if progress.nonzero[*c].is_empty() {
                progress.nonzero[*c] = vec![0; mcux * h * mcuy * v];
            }
        }
        let mut bits = Bits { data: bytes, pos: at, acc: 0, n: 0, marker: false };
        let mut eobrun = 0u32;
        for m in 0..mcus {
            if m > 0 && tables.restart_interval > 0 && m % tables.restart_interval == 0 {
                if bits.restart().is_none() {
                    return Err(format!("a restart marker is missing before MCU {m} of {mcus}: the data is cut or corrupt"));
                }
                eobrun = 0;
            }
            for &(c, dc, ac) in &parts {
                let (_, h, v) = f.components[c];
                let blocks = if n == 1 { 1 } else { h * v };
                for _ in 0..blocks {
                    let step = match (pass, dc, ac) {
                        (Pass::Sequential, Some(dc), Some(ac)) => block(&mut bits, dc, ac),
                        (Pass::DcFirst, Some(dc), _) => dc_first(&mut bits, dc),
                        (Pass::DcRefine, ..) => bits.take(1).map(|_| ()),
                        (Pass::AcFirst(ss, se), _, Some(ac)) => {
                            let nonzero = &mut progress.nonzero[c][(m / cols) * mcux * h + m % cols];
                            ac_first(&mut bits, ac, (ss, se), &mut eobrun, nonzero)
                        }
                        (Pass::AcRefine(ss, se), _, Some(ac)) => {
                            let nonzero = &mut progress.nonzero[c][(m / cols) * mcux * h + m % cols];
                            ac_refine(&mut bits, ac, (ss, se), &mut eobrun, nonzero)
                        }
                        _ => unreachable!("tables checked above"),
                    };
                    match step {
                        Ok(()) => {}
                        Err(Stop::End) => return Err(format!("its data ends after {m} of {mcus} MCUs")),
                        Err(Stop::Corrupt(why)) => return Err(format!("its data is corrupt at MCU {m} of {mcus}: {why}")),
                    }
                }
            }
        }
        if f.progressive {
            if progress.al.len() != f.components.len() {
                progress.al = vec![[UNCODED; 64]; f.components.len()];
            }
            let band = match pass {
                Pass::AcFirst(ss, se) | Pass::AcRefine(ss, se) => ss..=se,
                _ => 0..=0,
            };
            for &(c, ..) in &parts {
                progress.al[c][band.clone()].fill(al);
            }
        }
        Ok(bits.pos)
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

#[cfg(test)]
mod tests;
