//! The `--predictions` file: one JSON object per scored item and setting, written as items are scored, and read
//! back to resume a stopped sweep.
//!
//! A line is an [`ItemResult`] with the setting's [`label`](super::label) as `run`:
//! `{"run": "nuwa:64", "line": 12, "kind": "vqa", "correct": true, "normalized": "yes", "text": " Yes", ...}`.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use super::data::Dataset;
use super::metrics::Score;
use super::ItemResult;
use crate::error::{Error, Result};

/// One line of the file for `item` scored under the setting labelled `run` (no trailing newline).
pub fn line(item: &ItemResult, run: &str) -> Result<String> {
    let mut v = serde_json::to_value(item).map_err(|e| Error::InvalidRequest(format!("prediction of line {}: {e}", item.line)))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("run".into(), run.into());
    }
    Ok(v.to_string())
}

/// What a line holds, as written by [`line`].
#[derive(Deserialize)]
struct Stored {
    run: String,
    line: usize,
    kind: String,
    #[serde(flatten)]
    score: Score,
    text: String,
    ttft_ms: f64,
    visual_tokens_kept: usize,
    visual_tokens_after_stage1: usize,
    target_kept_stage1: Option<f64>,
    target_kept_stage2: Option<f64>,
}

/// What a predictions file already holds for a sweep.
#[derive(Debug, Default)]
pub struct Resumed {
    /// Per setting (in the order of `labels`), its items already scored.
    pub items: Vec<Vec<ItemResult>>,
    /// Bytes of the file that hold complete lines; anything after (a line cut short when the run was stopped) is
    /// to be truncated before appending.
    pub complete_len: u64,
}

impl Resumed {
    /// Items already scored, over all settings.
    pub fn len(&self) -> usize {
        self.items.iter().map(Vec::len).sum()
    }

    /// Whether nothing was scored yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a predictions file written by an earlier run of the same sweep on the same data: every line must name one
/// of `labels` as its run and an item of `data` of the same kind, once. A last line without its newline (cut short
/// when that run was stopped) is left out; any other line that does not parse is an error naming it.
pub fn read(path: &Path, data: &Dataset, labels: &[String]) -> Result<Resumed> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let complete_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..complete_len])
        .map_err(|e| Error::InvalidRequest(format!("{}: not UTF-8: {e}", path.display())))?;
    let kinds: std::collections::HashMap<usize, &'static str> = data.items.iter().map(|i| (i.line, i.expected.kind())).collect();
    let mut items: Vec<Vec<ItemResult>> = vec![Vec::new(); labels.len()];
    let mut seen = HashSet::new();
    let bad = |n: usize, why: String| Error::InvalidRequest(format!("{} line {n}: {why}", path.display()));
    for (n, raw) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
        if raw.trim().is_empty() {
            continue;
        }
        let s: Stored = serde_json::from_str(raw).map_err(|e| bad(n, format!("not a prediction: {e}")))?;
        let run = labels.iter().position(|l| *l == s.run).ok_or_else(|| {
            bad(n, format!("run {:?} is not a setting of this sweep ({}); resume with the same --sweep", s.run, labels.join(", ")))
        })?;
        let kind = match kinds.get(&s.line) {
            Some(k) if *k == s.kind => *k,
            Some(k) => return Err(bad(n, format!("line {} of {} is a {k} item, the prediction a {:?} one: made on other data?", s.line, data.path.display(), s.kind))),
            None => return Err(bad(n, format!("line {} is not a usable item of {}: made on other data?", s.line, data.path.display()))),
        };
        if !seen.insert((run, s.line)) {
            return Err(bad(n, format!("a second prediction for line {} under {}", s.line, s.run)));
        }
        items[run].push(ItemResult {
            line: s.line,
            kind,
            score: s.score,
            text: s.text,
            ttft_ms: s.ttft_ms,
            visual_tokens_kept: s.visual_tokens_kept,
            visual_tokens_after_stage1: s.visual_tokens_after_stage1,
            target_kept_stage1: s.target_kept_stage1,
            target_kept_stage2: s.target_kept_stage2,
        });
    }
    Ok(Resumed { items, complete_len: complete_len as u64 })
}
