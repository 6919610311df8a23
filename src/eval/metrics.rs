//! Scoring one answer: box IoU for grounding, normalised exact match for VQA.

use serde::Serialize;

/// What an item expects.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Expected {
    /// A referring expression: the first predicted box must overlap `bbox` with IoU >= [`IOU_THRESHOLD`].
    Grounding {
        /// `[x1, y1, x2, y2]` in original-image pixels.
        bbox: [f64; 4],
    },
    /// A question: the normalised answer must equal the normalised `answer`.
    Vqa {
        /// The expected answer as written in the data.
        answer: String,
    },
}

/// The kind of an item, as the data and the predictions file write it (`"grounding"` or `"vqa"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// A referring expression answered with a box.
    Grounding,
    /// A question answered in words.
    Vqa,
}

impl ItemKind {
    /// `"grounding"` or `"vqa"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::Grounding => "grounding",
            ItemKind::Vqa => "vqa",
        }
    }
}

impl std::fmt::Display for ItemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Expected {
    /// Which kind of item this is.
    pub fn kind(&self) -> ItemKind {
        match self {
            Expected::Grounding { .. } => ItemKind::Grounding,
            Expected::Vqa { .. } => ItemKind::Vqa,
        }
    }
}

/// Grounding counts as correct at this IoU or above (Acc@0.5, as RefCOCO is reported).
pub const IOU_THRESHOLD: f64 = 0.5;

/// The verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Score {
    /// Whether the answer counts as correct.
    pub correct: bool,
    /// Grounding: IoU of the first predicted box with the expected box (None: no box was predicted, or VQA).
    pub iou: Option<f64>,
    /// Grounding: the first predicted box in original pixels.
    pub predicted_box: Option<[f32; 4]>,
    /// VQA: the normalised answer that was compared (the first word only for yes/no questions).
    pub normalized: Option<String>,
}

/// How far (in pixels) an expected box may reach past the image's edges, for rounding in the data.
pub const BOX_EDGE_TOLERANCE: f64 = 1.0;

/// Checks an expected box against the size of the image it refers to: it must lie inside the image (within
/// [`BOX_EDGE_TOLERANCE`]) and be at least one pixel wide and high. A box that fails is a data error (most often
/// normalised coordinates where pixels are expected, or the box of another image), which would otherwise score as a
/// silent miss.
pub fn check_box_in_image(bbox: [f64; 4], width: u32, height: u32) -> Result<(), String> {
    let [x1, y1, x2, y2] = bbox;
    let (w, h) = (f64::from(width), f64::from(height));
    let t = BOX_EDGE_TOLERANCE;
    // Every comparison with NaN is false: without this, a NaN box passed every check below.
    if !bbox.iter().all(|v| v.is_finite()) {
        return Err(format!("\"bbox\" {bbox:?} has a coordinate that is not a finite number"));
    }
    if x2 - x1 < 1.0 || y2 - y1 < 1.0 {
        return Err(format!(
            "\"bbox\" {bbox:?} is under one pixel wide or high: boxes are in original-image pixels, not normalised"
        ));
    }
    if x1 < -t || y1 < -t || x2 > w + t || y2 > h + t {
        return Err(format!("\"bbox\" {bbox:?} reaches outside the {width}x{height} px image"));
    }
    Ok(())
}

/// The grid cells (raster indices) an object occupies: those whose centre lies inside `model_box` (model-input
/// pixels, `[x1, y1, x2, y2]`, as [`crate::image::ResizeRecord::to_model_box`] gives), or, for a box too small to contain a
/// cell centre, the cell under the box's centre. Empty when the box is not finite or lies outside the input, or
/// the grid is empty or above [`crate::prune::MAX_GRID_TOKENS`] cells.
pub fn target_cells(model_box: [f32; 4], model_w: u32, model_h: u32, grid_w: usize, grid_h: usize) -> Vec<usize> {
    let grid_ok = grid_w.checked_mul(grid_h).is_some_and(|n| n > 0 && n <= crate::prune::MAX_GRID_TOKENS);
    if !model_box.iter().all(|v| v.is_finite()) || model_w == 0 || model_h == 0 || !grid_ok {
        return Vec::new();
    }
    let (cw, ch) = (model_w as f32 / grid_w as f32, model_h as f32 / grid_h as f32);
    let [x1, y1, x2, y2] = model_box;
    let (x1, x2, y1, y2) = (x1.min(x2), x1.max(x2), y1.min(y2), y1.max(y2));
    let mut cells = Vec::new();
    for r in 0..grid_h {
        let cy = (r as f32 + 0.5) * ch;
        if cy < y1 || cy > y2 {
            continue;
        }
        for c in 0..grid_w {
            let cx = (c as f32 + 0.5) * cw;
            if cx >= x1 && cx <= x2 {
                cells.push(r * grid_w + c);
            }
        }
    }
    if cells.is_empty() {
        let (mx, my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
        if mx >= 0.0 && my >= 0.0 && mx < model_w as f32 && my < model_h as f32 {
            cells.push(((my / ch) as usize).min(grid_h - 1) * grid_w + ((mx / cw) as usize).min(grid_w - 1));
        }
    }
    cells
}

/// The share of `target` cells that are among `kept` (None for an empty target).
pub fn kept_share(target: &[usize], kept: &[usize]) -> Option<f64> {
    if target.is_empty() {
        return None;
    }
    let mut kept = kept.to_vec();
    kept.sort_unstable();
    let hit = target.iter().filter(|t| kept.binary_search(t).is_ok()).count();
    Some(hit as f64 / target.len() as f64)
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes; 0 when either is empty, has a non-finite coordinate, or
/// they do not overlap.
pub fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    if !a.iter().chain(&b).all(|v| v.is_finite()) {
        return 0.0;
    }
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

const NUMBER_WORDS: [&str; 21] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
    "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
];

/// Normalises an answer for comparison: lower case; every character that is neither alphanumeric nor whitespace
/// (punctuation, symbols) becomes a space; whitespace runs collapse to one space, trimmed; number words `zero` to
/// `twenty` become digits (`"Two."` -> `"2"`).
pub fn normalize_answer(s: &str) -> String {
    let cleaned: String = s.to_lowercase().chars().map(|c| if c.is_alphanumeric() { c } else { ' ' }).collect();
    let words: Vec<String> = cleaned
        .split_whitespace()
        .map(|w| match NUMBER_WORDS.iter().position(|&n| n == w) {
            Some(i) => i.to_string(),
            None => w.to_string(),
        })
        .collect();
    words.join(" ")
}

/// Whether a VQA answer is right: both sides normalised ([`normalize_answer`]); when the expected answer is `yes` or
/// `no`, only the first word of the prediction is compared ("Yes, there is." counts as "yes").
pub fn vqa_correct(expected: &str, predicted: &str) -> (bool, String) {
    let want = normalize_answer(expected);
    let mut got = normalize_answer(predicted);
    if want == "yes" || want == "no" {
        got = got.split(' ').next().unwrap_or_default().to_string();
    }
    (!want.is_empty() && got == want, got)
}

/// Scores a generated answer: `text` for VQA, `boxes` (original pixels, in the order they appear) for grounding,
/// where only the first box counts and no box is wrong (the evaluation passes the answer's first group of four
/// numbers, [`crate::boxes::first_box`], so that a malformed first box is no box).
pub fn score(expected: &Expected, text: &str, boxes: &[[f32; 4]]) -> Score {
    match expected {
        Expected::Grounding { bbox } => match boxes.first() {
            None => Score { correct: false, iou: None, predicted_box: None, normalized: None },
            Some(b) => {
                let v = iou(*bbox, b.map(f64::from));
                Score { correct: v >= IOU_THRESHOLD, iou: Some(v), predicted_box: Some(*b), normalized: None }
            }
        },
        Expected::Vqa { answer } => {
            let (correct, got) = vqa_correct(answer, text);
            Score { correct, iou: None, predicted_box: None, normalized: Some(got) }
        }
    }
}
