//! The evaluation data: JSON Lines, one item a line, image paths relative to the file.
//!
//! ```text
//! {"image": "img/0001.jpg", "kind": "grounding", "prompt": "Please provide ...: the red circle.", "bbox": [12, 40, 96, 130]}
//! {"image": "img/0002.jpg", "kind": "vqa", "prompt": "Is there a red circle in the image?", "answer": "yes"}
//! ```
//!
//! `bbox` is `[x1, y1, x2, y2]` in original-image pixels; `answer` is a string (a number is read as its decimal
//! text). Other fields are ignored. Blank lines are skipped. A line that cannot be used (not JSON, a missing or
//! wrongly typed field, an unknown kind, an empty or inverted box, an image that does not exist) is recorded as
//! [`Unreadable`] with its 1-based line number and the reason, and the rest of the file is still read.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::metrics::Expected;
use crate::error::{Error, Result};

/// Largest data (or predictions) file read, 1 GiB: a million items take about 200 MB. The file must be a regular
/// file: a FIFO would block the read.
pub const MAX_DATA_FILE_BYTES: u64 = 1 << 30;

/// One usable line of the data.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    /// 1-based line number in the file.
    pub line: usize,
    /// The image, resolved against the data file's directory.
    pub image: PathBuf,
    /// The prompt sent to the model.
    pub prompt: String,
    /// What counts as right.
    pub expected: Expected,
    /// The item's type, from the optional `"qtype"` field (`"attr"`, `"count"`, ...): the table breaks accuracy and
    /// retention down by it.
    pub qtype: Option<String>,
}

/// A line (or, during a run, an item) that could not be scored, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    /// 1-based line number in the file.
    pub line: usize,
    /// What was wrong.
    pub reason: String,
}

/// A parsed data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file.
    pub path: PathBuf,
    /// Usable items, in file order.
    pub items: Vec<EvalItem>,
    /// Lines that could not be used, in file order.
    pub unreadable: Vec<Unreadable>,
}

impl Dataset {
    /// Reads `path`. With `limit`, only the first `limit` non-blank lines are read (usable or not). Fails only when
    /// the file itself cannot be read or holds no non-blank line (or `limit` is 0); bad lines become
    /// [`Dataset::unreadable`].
    pub fn load(path: impl AsRef<Path>, limit: Option<usize>) -> Result<Dataset> {
        let path = path.as_ref();
        let bytes = crate::manifest::read_bounded(path, MAX_DATA_FILE_BYTES).map_err(|e| Error::io(path, e))?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut items = Vec::new();
        let mut unreadable = Vec::new();
        let mut taken = 0;
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            if limit.is_some_and(|l| taken >= l) {
                break;
            }
            let line = i + 1;
            let text = match std::str::from_utf8(raw) {
                // A byte-order mark (Windows editors write one) is not part of the first line's JSON.
                Ok(t) if i == 0 => t.trim_start_matches('\u{feff}').trim(),
                Ok(t) => t.trim(),
                Err(e) => {
                    taken += 1;
                    unreadable.push(Unreadable { line, reason: format!("not UTF-8: {e}") });
                    continue;
                }
            };
            if text.is_empty() {
                continue;
            }
            taken += 1;
            match parse_line(text, line, &base) {
                Ok(item) if !item.image.is_file() => {
                    unreadable.push(Unreadable { line, reason: format!("image {} not found", item.image.display()) })
                }
                Ok(item) => items.push(item),
                Err(reason) => unreadable.push(Unreadable { line, reason }),
            }
        }
        if taken == 0 {
            return Err(Error::InvalidRequest(match limit {
                Some(0) => "a limit of 0 items reads nothing".into(),
                _ => format!("{}: no items (the file is empty or holds only blank lines)", path.display()),
            }));
        }
        Ok(Dataset { path: path.to_path_buf(), items, unreadable })
    }

    /// Grounding items.
    pub fn n_grounding(&self) -> usize {
        self.items.iter().filter(|i| matches!(i.expected, Expected::Grounding { .. })).count()
    }

    /// VQA items.
    pub fn n_vqa(&self) -> usize {
        self.items.len() - self.n_grounding()
    }
}

/// Parses one line (no file system access: the image is only resolved against `base`, not checked).
pub fn parse_line(text: &str, line: usize, base: &Path) -> std::result::Result<EvalItem, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        // serde_json says "at line 1 column N" of the one-line text; the column is what helps.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or_default().to_string();
        format!("malformed JSON at column {}: {msg}", e.column())
    })?;
    let obj = value.as_object().ok_or_else(|| "not a JSON object".to_string())?;
    let string = |key: &str| -> std::result::Result<&str, String> {
        match obj.get(key) {
            None => Err(format!("missing field \"{key}\"")),
            Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field \"{key}\" is empty")),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("field \"{key}\" must be a string, not {}", short(other))),
        }
    };
    let image = base.join(string("image")?);
    let prompt = string("prompt")?.to_string();
    let expected = match string("kind")? {
        "grounding" => Expected::Grounding { bbox: parse_bbox(obj.get("bbox"))? },
        "vqa" => Expected::Vqa { answer: parse_answer(obj.get("answer"))? },
        other => return Err(format!("unknown kind {other:?} (expected \"grounding\" or \"vqa\")")),
    };
    let qtype = match obj.get("qtype") {
        None | Some(Value::Null) => None,
        Some(_) => Some(string("qtype")?.trim().to_string()),
    };
    Ok(EvalItem { line, image, prompt, expected, qtype })
}

fn parse_bbox(v: Option<&Value>) -> std::result::Result<[f64; 4], String> {
    let v = v.ok_or_else(|| "grounding item without \"bbox\"".to_string())?;
    let bad = || format!("\"bbox\" must be [x1, y1, x2, y2] in pixels, got {}", short(v));
    let arr = v.as_array().filter(|a| a.len() == 4).ok_or_else(bad)?;
    let mut b = [0.0; 4];
    for (slot, x) in b.iter_mut().zip(arr) {
        *slot = x.as_f64().filter(|f| f.is_finite()).ok_or_else(bad)?;
    }
    if b[0] < 0.0 || b[1] < 0.0 || b[2] <= b[0] || b[3] <= b[1] {
        return Err(format!("\"bbox\" {} is empty, inverted or negative (need 0 <= x1 < x2 and 0 <= y1 < y2)", short(v)));
    }
    Ok(b)
}

fn parse_answer(v: Option<&Value>) -> std::result::Result<String, String> {
    let answer = match v {
        None => return Err("vqa item without \"answer\"".into()),
        Some(Value::String(s)) => s.clone(),
        // A whole number written as a float (Python's json.dumps(2.0) gives 2.0) is that number: "2", not "2.0",
        // which would normalise to "2 0" and never match.
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Some(other) => return Err(format!("\"answer\" must be a string, not {}", short(other))),
    };
    if super::metrics::normalize_answer(&answer).is_empty() {
        return Err(format!("\"answer\" {answer:?} is empty after normalisation"));
    }
    Ok(answer)
}

/// A JSON value as text, cut to 60 characters, for messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}
