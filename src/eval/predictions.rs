//! The `--predictions` file: one JSON object per scored item and setting, written as items are scored, and read
//! back to resume a stopped sweep.
//!
//! A line is an [`ItemResult`] with the setting's [`label`](super::label) as `run`, and the [`Made`] of the run
//! (model id, token limit, the seed where a setting draws from it, the vision graph): `{"run": "nuwa:64", "model":
//! "nuwa-demo-y", "max_new_tokens": 32, "vision_fp32": false, "line": 12, "kind": "vqa", "correct": true,
//! "normalized": "yes", "text": " Yes", ...}`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use super::data::{Dataset, EvalItem};
use super::metrics::score;
use super::ItemResult;
use crate::error::{Error, Result};

/// What made a predictions file besides the settings and the data, which a resumed run must match: an answer
/// from another model, under another token limit, another seed of a seeded setting or the other vision graph
/// would be counted as this run's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    /// The model's manifest id.
    pub model: String,
    /// Most tokens generated per item.
    pub max_new_tokens: usize,
    /// The `--seed`, where a setting of the sweep draws from it ([`PruneConfig::uses_seed`]); None otherwise.
    ///
    /// [`PruneConfig::uses_seed`]: crate::prune::PruneConfig::uses_seed
    pub seed: Option<u64>,
    /// Whether the unquantised vision graph ran (`--vision-fp32`).
    pub vision_fp32: bool,
}

/// The image's file name as a line records it (not the path, which depends on where the data file lies).
fn image_name(item: &EvalItem) -> String {
    item.image.file_name().unwrap_or(item.image.as_os_str()).to_string_lossy().into_owned()
}

/// One line of the file for `item`, the result of the data's item `source`, scored under the setting labelled
/// `run` (no trailing newline). The item's prompt and image name are recorded, so that a resumed run can tell
/// other data from this.
pub fn line(item: &ItemResult, source: &EvalItem, run: &str, made: &Made) -> Result<String> {
    let mut v = serde_json::to_value(item).map_err(|e| Error::InvalidRequest(format!("prediction of line {}: {e}", item.line)))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("prompt".into(), source.prompt.clone().into());
        o.insert("image".into(), image_name(source).into());
        o.insert("run".into(), run.into());
        o.insert("model".into(), made.model.clone().into());
        o.insert("max_new_tokens".into(), made.max_new_tokens.into());
        if let Some(seed) = made.seed {
            o.insert("seed".into(), seed.into());
        }
        o.insert("vision_fp32".into(), made.vision_fp32.into());
    }
    Ok(v.to_string())
}

/// What a line holds, as written by [`line`] (files written before the model, limit, seed and vision graph were
/// recorded lack them).
#[derive(Deserialize)]
struct Stored {
    run: String,
    model: Option<String>,
    max_new_tokens: Option<usize>,
    seed: Option<u64>,
    vision_fp32: Option<bool>,
    prompt: Option<String>,
    image: Option<String>,
    #[serde(flatten)]
    item: ItemResult,
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

/// Reads a predictions file written by an earlier run of the same sweep on the same data, model, token limit,
/// seed and vision graph (`made`): every line must name one of `labels` as its run and an item of `data` of the same kind, once. A last line without its newline (cut short
/// when that run was stopped) is left out; any other line that does not parse is an error naming it.
pub fn read(path: &Path, data: &Dataset, labels: &[String], made: &Made) -> Result<Resumed> {
    let bytes = crate::manifest::read_bounded(path, super::data::MAX_DATA_FILE_BYTES).map_err(|e| Error::io(path, e))?;
    let complete_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..complete_len])
        .map_err(|e| Error::InvalidRequest(format!("{}: not UTF-8: {e}", path.display())))?;
    let sources: HashMap<usize, &EvalItem> = data.items.iter().map(|i| (i.line, i)).collect();
    let mut items: Vec<Vec<ItemResult>> = vec![Vec::new(); labels.len()];
    let mut seen = HashSet::new();
    let bad = |n: usize, why: String| Error::InvalidRequest(format!("{} line {n}: {why}", path.display()));
    for (n, raw) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
        if raw.trim().is_empty() {
            continue;
        }
        let Stored { run, model, max_new_tokens, seed, vision_fp32, prompt, image, mut item } =
            serde_json::from_str(raw).map_err(|e| bad(n, format!("not a prediction: {e}")))?;
        if let Some(m) = model.filter(|m| *m != made.model) {
            return Err(bad(n, format!("made with model {m:?}, this run uses {:?}; resume with the same --model", made.model)));
        }
        if let Some(t) = max_new_tokens.filter(|&t| t != made.max_new_tokens) {
            return Err(bad(n, format!("made with --max-tokens {t}, this run uses {}; resume with the same", made.max_new_tokens)));
        }
        if let (Some(was), Some(now)) = (seed, made.seed) {
            if was != now {
                return Err(bad(n, format!("made with --seed {was}, this run uses {now}; resume with the same")));
            }
        }
        if let Some(was) = vision_fp32.filter(|&v| v != made.vision_fp32) {
            let graph = |fp32: bool| if fp32 { "the fp32 vision graph (--vision-fp32)" } else { "the quantised vision graph" };
            return Err(bad(n, format!("made with {}, this run uses {}; resume with the same", graph(was), graph(made.vision_fp32))));
        }
        let setting = labels.iter().position(|l| *l == run).ok_or_else(|| {
            bad(n, format!("run {run:?} is not a setting of this sweep ({}); resume with the same --sweep", labels.join(", ")))
        })?;
        let Some(source) = sources.get(&item.line) else {
            return Err(bad(n, format!("line {} is not a usable item of {}: made on other data?", item.line, data.path.display())));
        };
        let other_data = |what: &str| {
            bad(n, format!("line {} of {} has another {what} than the prediction's: made on other data?", item.line, data.path.display()))
        };
        let k = source.expected.kind();
        if k != item.kind {
            return Err(bad(n, format!("line {} of {} is a {k} item, the prediction a {} one: made on other data?", item.line, data.path.display(), item.kind)));
        }
        // Files written before the prompt and image were recorded lack them.
        if prompt.is_some_and(|p| p != source.prompt) {
            return Err(other_data("prompt"));
        }
        if image.is_some_and(|i| i != image_name(source)) {
            return Err(other_data("image"));
        }
        // The type is the data's, and so is the verdict: an edited answer or box is scored anew against the
        // answer text and first box the file holds, not taken from the `correct` an earlier run wrote.
        item.qtype = source.qtype.clone();
        item.score = score(&source.expected, &item.text, item.score.predicted_box.as_slice());
        if !seen.insert((setting, item.line)) {
            return Err(bad(n, format!("a second prediction for line {} under {run}", item.line)));
        }
        items[setting].push(item);
    }
    Ok(Resumed { items, complete_len: complete_len as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{Expected, ItemKind, Score};

    fn item(line: usize, expected: Expected) -> EvalItem {
        EvalItem { line, image: "a.jpg".into(), prompt: "p".into(), expected, qtype: None }
    }

    #[test]
    fn lines_read_back_as_the_items_written() {
        let dir = std::env::temp_dir().join(format!("nuwa-predictions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = Dataset {
            path: dir.join("data.jsonl"),
            items: vec![
                item(1, Expected::Grounding { bbox: [1.0, 2.0, 30.0, 40.0] }),
                // A type in the data reaches the items read back, whether the file recorded it or not.
                EvalItem { qtype: Some("exist".into()), ..item(3, Expected::Vqa { answer: "yes".into() }) },
            ],
            unreadable: vec![],
        };
        let grounding = ItemResult {
            line: 1,
            kind: ItemKind::Grounding,
            score: Score { correct: true, iou: Some(0.5), predicted_box: Some([1.0, 2.0, 30.0, 21.0]), normalized: None },
            text: "[0.01, 0.02, 0.30, 0.40]".into(),
            ttft_ms: 101.5,
            visual_tokens_kept: 16,
            visual_tokens_after_stage1: 112,
            target_kept_stage1: Some(0.5),
            target_kept_stage2: Some(0.25),
            qtype: None,
        };
        let vqa = ItemResult {
            line: 3,
            kind: ItemKind::Vqa,
            score: Score { correct: false, iou: None, predicted_box: None, normalized: Some("no".into()) },
            text: " No\n\"quoted\"".into(),
            ttft_ms: 99.0,
            visual_tokens_kept: 576,
            visual_tokens_after_stage1: 576,
            target_kept_stage1: None,
            target_kept_stage2: None,
            qtype: None,
        };
        let labels = vec!["none".to_string(), "nuwa:64".to_string()];
        let made = Made { model: "m".into(), max_new_tokens: 32, seed: Some(7), vision_fp32: false };
        let file = dir.join("p.jsonl");
        // The second setting's line is cut short, as when a run is stopped while writing.
        let cut = line(&grounding, &data.items[0], "nuwa:64", &made).unwrap();
        let text = format!("{}\n{}\n{}", line(&grounding, &data.items[0], "none", &made).unwrap(), line(&vqa, &data.items[1], "none", &made).unwrap(), &cut[..cut.len() / 2]);
        std::fs::write(&file, &text).unwrap();
        let r = read(&file, &data, &labels, &made).unwrap();
        assert_eq!(r.items, vec![vec![grounding.clone(), ItemResult { qtype: Some("exist".into()), ..vqa.clone() }], vec![]]);
        assert_eq!(r.complete_len as usize, text.rfind('\n').unwrap() + 1);

        // A prediction whose kind differs from the data's item on that line comes from other data.
        let wrong = ItemResult { kind: ItemKind::Vqa, ..grounding.clone() };
        std::fs::write(&file, line(&wrong, &data.items[0], "none", &made).unwrap() + "\n").unwrap();
        let e = read(&file, &data, &labels, &made).unwrap_err().to_string();
        assert!(e.contains("line 1 of") && e.contains("is a grounding item, the prediction a vqa one"), "{e}");
        // An unknown kind is not a prediction.
        std::fs::write(&file, line(&grounding, &data.items[0], "none", &made).unwrap().replace("\"grounding\"", "\"caption\"") + "\n").unwrap();
        let e = read(&file, &data, &labels, &made).unwrap_err().to_string();
        assert!(e.contains("line 1: not a prediction") && e.contains("caption"), "{e}");

        // Another model, token limit, seed or vision graph is refused by name; a line from before they were recorded
        // is accepted.
        let g = line(&grounding, &data.items[0], "none", &made).unwrap();
        for (other, needle) in [
            (Made { model: "other".into(), ..made.clone() }, "made with model \"m\", this run uses \"other\""),
            (Made { max_new_tokens: 8, ..made.clone() }, "made with --max-tokens 32, this run uses 8"),
            (Made { seed: Some(8), ..made.clone() }, "made with --seed 7, this run uses 8"),
            (Made { vision_fp32: true, ..made.clone() }, "made with the quantised vision graph, this run uses the fp32"),
        ] {
            std::fs::write(&file, format!("{g}\n")).unwrap();
            let e = read(&file, &data, &labels, &other).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let mut old: serde_json::Value = serde_json::from_str(&g).unwrap();
        old.as_object_mut().unwrap().retain(|k, _| !["model", "max_new_tokens", "seed", "vision_fp32"].contains(&k.as_str()));
        std::fs::write(&file, format!("{old}\n")).unwrap();
        let other = Made { model: "other".into(), max_new_tokens: 1, seed: Some(1), vision_fp32: true };
        assert_eq!(read(&file, &data, &labels, &other).unwrap().len(), 1);

        // Another prompt or image on that line is other data; lines from before they were recorded pass.
        for (edit, needle) in [
            (EvalItem { prompt: "q".into(), ..data.items[0].clone() }, "another prompt"),
            (EvalItem { image: "dir/b.jpg".into(), ..data.items[0].clone() }, "another image"),
        ] {
            let edited = Dataset { items: vec![edit, data.items[1].clone()], ..data.clone() };
            std::fs::write(&file, format!("{g}\n")).unwrap();
            let e = read(&file, &edited, &labels, &made).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("line 1 of"), "{e}");
        }
        // The image is recorded by name: the same data moved elsewhere resumes.
        let moved = Dataset { items: vec![EvalItem { image: "/elsewhere/a.jpg".into(), ..data.items[0].clone() }, data.items[1].clone()], ..data.clone() };
        std::fs::write(&file, format!("{g}\n")).unwrap();
        assert_eq!(read(&file, &moved, &labels, &made).unwrap().len(), 1);

        // The verdict is the current data's: an answer or box edited since is scored anew, not taken from the file.
        let v = line(&vqa, &data.items[1], "none", &made).unwrap();
        let answer_no = Dataset { items: vec![data.items[0].clone(), EvalItem { expected: Expected::Vqa { answer: "no".into() }, ..data.items[1].clone() }], ..data.clone() };
        let far = Dataset { items: vec![EvalItem { expected: Expected::Grounding { bbox: [100.0, 100.0, 200.0, 200.0] }, ..data.items[0].clone() }, data.items[1].clone()], ..data.clone() };
        std::fs::write(&file, format!("{g}\n{v}\n")).unwrap();
        let before = read(&file, &data, &labels, &made).unwrap();
        assert_eq!((before.items[0][0].score.correct, before.items[0][1].score.correct), (true, false));
        let r = read(&file, &answer_no, &labels, &made).unwrap();
        assert!(r.items[0][1].score.correct, "the stored \"No\" is right against the edited answer");
        let r = read(&file, &far, &labels, &made).unwrap();
        assert!(!r.items[0][0].score.correct && r.items[0][0].score.iou == Some(0.0), "{:?}", r.items[0][0].score);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
