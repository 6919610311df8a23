//! Bounding boxes in generated text, mapped back to original image pixels.
//!
//! LLaVA-1.5 answers grounding questions with `[x1, y1, x2, y2]` in [0, 1] of the model input (e.g.
//! `[0.12, 0.34, 0.56, 0.78]`). Every well-formed group of four numbers is parsed; anything else in brackets is
//! ignored. Normalised coordinates become model-input pixels (`x * width`, `y * height`), then original pixels
//! through the [`ResizeRecord`] of the preprocessing, ordered (`x1 <= x2`, `y1 <= y2`) and clamped to the image.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::image::ResizeRecord;

/// The manifest's `box_format`: how the model writes boxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BoxFormat {
    /// `[x1, y1, x2, y2]`, each in [0, 1] of the model input, usually printed with `decimals` digits.
    NormalizedXyxy {
        /// Digits after the decimal point the model was trained to print (informative; parsing is lenient).
        decimals: u32,
    },
}

/// A box as written in the text.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedBox {
    /// Byte range of the bracketed group in the text, brackets included.
    pub span: Range<usize>,
    /// The four numbers as written (for `normalized_xyxy`: x1, y1, x2, y2 in [0, 1]).
    pub coords: [f32; 4],
}

/// A box found in the text and mapped to original image pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageBox {
    /// Byte range of the bracketed group in the text, brackets included.
    pub span: Range<usize>,
    /// The four numbers as written.
    pub coords: [f32; 4],
    /// `[x1, y1, x2, y2]` in model-input pixels, ordered.
    pub model: [f32; 4],
    /// `[x1, y1, x2, y2]` in original image pixels, ordered and clamped to the image.
    pub original: [f32; 4],
}

/// Finds every well-formed `[a, b, c, d]` group in `text` that fits `format`.
pub fn parse_boxes(text: &str, format: &BoxFormat) -> Vec<ParsedBox> {
    four_number_groups(text).into_iter().filter(|g| fits(&g.coords, format)).collect()
}

/// Every bracketed group of four plain numbers in `text`, whatever their values.
fn four_number_groups(text: &str) -> Vec<ParsedBox> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'[' {
            i += 1;
            continue;
        }
        // The group ends at the next ']'; a '[' before it starts a new candidate instead.
        let Some(rel) = bytes[i + 1..].iter().position(|&b| b == b']' || b == b'[') else { break };
        let end = i + 1 + rel;
        if bytes[end] == b'[' {
            i = end;
            continue;
        }
        // '[' and ']' are ASCII, so both ends are character boundaries.
        if let Some(coords) = text.get(i + 1..end).and_then(parse_four) {
            out.push(ParsedBox { span: i..end + 1, coords });
        }
        i = end + 1;
    }
    out
}

fn fits(c: &[f32; 4], format: &BoxFormat) -> bool {
    match format {
        BoxFormat::NormalizedXyxy { .. } => c.iter().all(|v| (0.0..=1.0).contains(v)),
    }
}

/// Parses "a, b, c, d" (any whitespace around the commas) into four numbers.
fn parse_four(inner: &str) -> Option<[f32; 4]> {
    let mut out = [0.0f32; 4];
    let mut parts = inner.split(',');
    for slot in &mut out {
        *slot = parse_number(parts.next()?.trim())?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

/// Accepts plain decimals only: `12`, `0.5`, `.5`, `1.` (no sign, exponent, inf or NaN).
fn parse_number(s: &str) -> Option<f32> {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let dots = s.bytes().filter(|&b| b == b'.').count();
    if digits == 0 || dots > 1 || digits + dots != s.len() {
        return None;
    }
    s.parse::<f32>().ok().filter(|v| v.is_finite())
}

/// Maps one box as written to model-input pixels (ordered, not clamped).
pub fn to_model_pixels(coords: [f32; 4], format: &BoxFormat, record: &ResizeRecord) -> [f32; 4] {
    match format {
        BoxFormat::NormalizedXyxy { .. } => {
            let (w, h) = (record.model_width as f32, record.model_height as f32);
            let (xa, xb) = (coords[0] * w, coords[2] * w);
            let (ya, yb) = (coords[1] * h, coords[3] * h);
            [xa.min(xb), ya.min(yb), xa.max(xb), ya.max(yb)]
        }
    }
}

/// Finds the boxes in `text` and maps each to original image pixels (clamped to the image). A box with no area
/// on the image is left out: one that lies wholly in the padding of a padded input, or is a point or a line as
/// written. Clamping would turn it into a zero-width or zero-height box on the image's edge, which the model never
/// pointed at; the text keeps what it wrote.
pub fn extract_boxes(text: &str, format: &BoxFormat, record: &ResizeRecord) -> Vec<ImageBox> {
    parse_boxes(text, format).into_iter().filter_map(|p| to_image_box(p, format, record)).collect()
}

/// The box an answer gives first: the first bracketed group of four numbers in `text`, mapped to original pixels.
/// None when the text has no such group, or when its first one does not fit `format` (`[0.1, 0.1, 1.2, 0.9]`) or
/// has no area on the image: a grounding answer whose first box is malformed is wrong, not rescued by a later one
/// that [`extract_boxes`] would still find.
pub fn first_box(text: &str, format: &BoxFormat, record: &ResizeRecord) -> Option<ImageBox> {
    let first = four_number_groups(text).into_iter().next()?;
    fits(&first.coords, format).then_some(first).and_then(|p| to_image_box(p, format, record))
}

fn to_image_box(p: ParsedBox, format: &BoxFormat, record: &ResizeRecord) -> Option<ImageBox> {
    let model = to_model_pixels(p.coords, format, record);
    let original = record.to_original_box(model);
    let on_image = original[2] > original[0] && original[3] > original[1];
    on_image.then_some(ImageBox { span: p.span, coords: p.coords, model, original })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageConfig, Interpolation, ResizePolicy};

    const FMT: BoxFormat = BoxFormat::NormalizedXyxy { decimals: 2 };

    fn coords(text: &str) -> Vec<[f32; 4]> {
        parse_boxes(text, &FMT).into_iter().map(|b| b.coords).collect()
    }

    fn record(resize: ResizePolicy, w: u32, h: u32) -> ResizeRecord {
        let config = ImageConfig {
            height: 336,
            width: 336,
            resize,
            interpolation: Interpolation::Bicubic,
            pad_color: [0, 0, 0],
            rescale: 1.0 / 255.0,
            mean: [0.5; 3],
            std: [0.5; 3],
        };
        ResizeRecord::new(&config, w, h).unwrap()
    }

    fn close(a: [f32; 4], b: [f32; 4]) {
        for i in 0..4 {
            assert!((a[i] - b[i]).abs() < 1e-2, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn deserializes_manifest_box_format() {
        let f: BoxFormat = serde_json::from_str(r#"{"kind": "normalized_xyxy", "decimals": 2}"#).unwrap();
        assert_eq!(f, FMT);
        assert!(serde_json::from_str::<BoxFormat>(r#"{"kind": "pixel_xyxy", "decimals": 2}"#).is_err());
        assert!(serde_json::from_str::<BoxFormat>(r#"{"kind": "normalized_xyxy"}"#).is_err());
    }

    #[test]
    fn parses_llava_style_answers() {
        assert_eq!(coords("[0.12, 0.34, 0.56, 0.78]"), vec![[0.12, 0.34, 0.56, 0.78]]);
        assert_eq!(coords("The dog is at [0.1,0.2,0.3,0.4]."), vec![[0.1, 0.2, 0.3, 0.4]]);
        assert_eq!(coords("[ 0 , 0.5 ,1,  1. ]"), vec![[0.0, 0.5, 1.0, 1.0]]);
        assert_eq!(coords("[.25, 0.5, 0.75, 1.00]"), vec![[0.25, 0.5, 0.75, 1.0]]);
        let t = "Two: [0.1, 0.2, 0.3, 0.4] and [0.5, 0.6, 0.7, 0.8], done.";
        let b = parse_boxes(t, &FMT);
        assert_eq!(b.len(), 2);
        assert_eq!(&t[b[0].span.clone()], "[0.1, 0.2, 0.3, 0.4]");
        assert_eq!(&t[b[1].span.clone()], "[0.5, 0.6, 0.7, 0.8]");
        // Nested brackets: the inner group counts.
        assert_eq!(coords("[[0.1, 0.2, 0.3, 0.4]]"), vec![[0.1, 0.2, 0.3, 0.4]]);
        assert_eq!(coords("世界 [0.1, 0.2, 0.3, 0.4] 🙂"), vec![[0.1, 0.2, 0.3, 0.4]]);
    }

    #[test]
    fn ignores_malformed_groups() {
        for t in [
            "[0.1, 0.2, 0.3]",
            "[0.1, 0.2, 0.3, 0.4, 0.5]",
            "[0.1, 0.2, 0.3, abc]",
            "[0.1, 0.2, 0.3, 0.4",
            "[0.1, , 0.3, 0.4]",
            "[-0.1, 0.2, 0.3, 0.4]",
            "[0.1, 0.2, 0.3, 1.5]",
            "[1e-1, 0.2, 0.3, 0.4]",
            "[NaN, 0.2, 0.3, 0.4]",
            "[0.1.2, 0.2, 0.3, 0.4]",
            "[., 0.2, 0.3, 0.4]",
            "[]",
            "[",
            "]",
            "",
        ] {
            assert!(coords(t).is_empty(), "{t}");
        }
        assert_eq!(coords("[x] [0.1, 0.2, 0.3, 0.4] [0.5]"), vec![[0.1, 0.2, 0.3, 0.4]]);
    }

    #[test]
    fn maps_through_stretch() {
        let r = record(ResizePolicy::Stretch, 640, 480);
        let b = extract_boxes("[0.25, 0.5, 0.75, 1]", &FMT, &r);
        close(b[0].model, [84.0, 168.0, 252.0, 336.0]);
        close(b[0].original, [160.0, 240.0, 480.0, 480.0]);
    }

    #[test]
    fn maps_through_crop() {
        // 640x480 -> 448x336, 56 px cropped on each side: model x in [0, 336] covers original x in [80, 560].
        let r = record(ResizePolicy::Crop, 640, 480);
        let b = extract_boxes("[0, 0, 1, 1] [0.5, 0.25, 0.75, 0.5]", &FMT, &r);
        close(b[0].original, [80.0, 0.0, 560.0, 480.0]);
        close(b[1].original, [320.0, 120.0, 440.0, 240.0]);
    }

    #[test]
    fn maps_through_pad() {
        // 640x480 padded to 640x640 (80 px top and bottom): y in [0.125, 0.875] covers the image.
        let r = record(ResizePolicy::Pad, 640, 480);
        let b = extract_boxes("[0.25, 0.125, 0.75, 0.875]", &FMT, &r);
        close(b[0].original, [160.0, 0.0, 480.0, 480.0]);
        // Boxes reaching into the padding are clamped to the image.
        let b = extract_boxes("[0, 0, 1, 1]", &FMT, &r);
        close(b[0].original, [0.0, 0.0, 640.0, 480.0]);
        // Portrait 300x600: 150 px padding left and right.
        let r = record(ResizePolicy::Pad, 300, 600);
        let b = extract_boxes("[0.5, 0.5, 0.375, 0.25]", &FMT, &r);
        close(b[0].model, [126.0, 84.0, 168.0, 168.0]);
        close(b[0].original, [75.0, 150.0, 150.0, 300.0]);
    }

    #[test]
    fn boxes_with_no_area_on_the_image_are_left_out() {
        // 640x480 padded: y below 0.125 is the top padding. A box wholly there would clamp to [64, 0, 576, 0].
        let r = record(ResizePolicy::Pad, 640, 480);
        let b = extract_boxes("[0.1, 0.0, 0.9, 0.1] then [0.1, 0.1, 0.9, 0.2]", &FMT, &r);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].coords, [0.1, 0.1, 0.9, 0.2]);
        close(b[0].original, [64.0, 0.0, 576.0, 48.0]);
        // Points and lines as written.
        assert!(extract_boxes("[0.10, 0.20, 0.10, 0.20]", &FMT, &r).is_empty());
        assert!(extract_boxes("[0.10, 0.20, 0.50, 0.20]", &FMT, &r).is_empty());
        // Portrait: a box wholly in the right-hand padding.
        let r = record(ResizePolicy::Pad, 300, 600);
        assert!(extract_boxes("[0.8, 0.1, 0.95, 0.9]", &FMT, &r).is_empty());
    }

    #[test]
    fn reorders_swapped_corners() {
        let r = record(ResizePolicy::Stretch, 100, 200);
        let b = extract_boxes("[0.9, 0.8, 0.1, 0.2]", &FMT, &r);
        close(b[0].original, [10.0, 40.0, 90.0, 160.0]);
    }
}
