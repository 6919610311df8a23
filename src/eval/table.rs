//! Summaries of runs and the methods x budgets table, as markdown and JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::data::Unreadable;
use super::{label, ItemKind, RunResult};
use crate::error::{Error, Result};
use crate::prune::{Amount, Method};

/// The figures of one run (one method at one budget).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Short name: `none`, `nuwa:64`, `nuwa:k112/16`.
    pub label: String,
    /// Pruning method.
    pub method: String,
    /// Budget (`--budget`), if the run used one.
    pub budget: Option<usize>,
    /// Explicit Stage-1 count (`--keep1`), if the run used one.
    pub keep1: Option<usize>,
    /// Explicit Stage-2 count (`--keep2`), if the run used one.
    pub keep2: Option<usize>,
    /// Grounding Acc@0.5 in [0, 1] (null without grounding items).
    pub grounding_acc: Option<f64>,
    /// VQA accuracy in [0, 1] (null without VQA items).
    pub vqa_acc: Option<f64>,
    /// `grounding_acc / grounding_acc(none)` in %, null when either is null or the unpruned accuracy is 0.
    pub grounding_retention: Option<f64>,
    /// `vqa_acc / vqa_acc(none)` in %, null when either is null or the unpruned accuracy is 0.
    pub vqa_retention: Option<f64>,
    /// Grounding items scored.
    pub n_grounding: usize,
    /// VQA items scored.
    pub n_vqa: usize,
    /// Grounding items right.
    pub grounding_correct: usize,
    /// VQA items right.
    pub vqa_correct: usize,
    /// Mean IoU of the first box over grounding items (no box counts 0).
    pub grounding_mean_iou: Option<f64>,
    /// Grounding answers without any box.
    pub grounding_no_box: usize,
    /// Mean time to first token over scored items.
    pub mean_ttft_ms: Option<f64>,
    /// Mean visual tokens the last decoder layer saw (after Stage 2).
    pub mean_visual_tokens_kept: Option<f64>,
    /// Mean visual tokens after Stage 1 (what the decoder head saw).
    pub mean_visual_tokens_after_stage1: Option<f64>,
    /// Grounding: mean share of the target's grid cells Stage 1 kept (null without grounding items).
    pub target_kept_stage1: Option<f64>,
    /// Grounding: mean share of the target's grid cells the last decoder layer saw.
    pub target_kept_stage2: Option<f64>,
    /// Whether this run scored other items than the unpruned one (a request failed in one and not the other, e.g.
    /// a prompt that fits the context only with re-indexed positions): its retention then compares different sets.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub items_differ_from_none: bool,
    /// Per item type, keyed `kind/qtype` (`grounding/attr`, `vqa/count`), for data whose items carry a `qtype`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_qtype: BTreeMap<String, TypeSummary>,
    /// Lines not scored (bad lines, missing images, failed requests).
    pub unreadable: usize,
    /// Each of them with its line number and reason.
    pub unreadable_items: Vec<Unreadable>,
}

/// The figures of one item type in one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeSummary {
    /// Items of the type scored.
    pub n: usize,
    /// Items right.
    pub correct: usize,
    /// `correct / n`.
    pub acc: Option<f64>,
    /// `acc / acc` of the type in the unpruned run, in %.
    pub retention: Option<f64>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// `acc / acc_none` in %; None when either is unknown or the unpruned accuracy is 0 (never NaN or infinite). The
/// quotient comes first so that equal accuracies give exactly 100 (`100 * a / a` can land one ulp below it).
pub fn retention(acc: Option<f64>, acc_none: Option<f64>) -> Option<f64> {
    match (acc, acc_none) {
        (Some(a), Some(n)) if n > 0.0 && a.is_finite() && n.is_finite() => Some(a / n * 100.0),
        _ => None,
    }
}

impl Summary {
    /// Summarises a run; retention stays null until [`Summary::set_retention`].
    pub fn of(run: &RunResult) -> Summary {
        let (budget, keep1, keep2) = match run.prune.amount {
            Amount::All => (None, None, None),
            Amount::Budget(b) => (Some(b), None, None),
            Amount::Keep { keep1, keep2 } => (None, Some(keep1), Some(keep2)),
        };
        let grounding: Vec<_> = run.items.iter().filter(|i| i.kind == ItemKind::Grounding).collect();
        let vqa: Vec<_> = run.items.iter().filter(|i| i.kind == ItemKind::Vqa).collect();
        let grounding_correct = grounding.iter().filter(|i| i.score.correct).count();
        let mut by_qtype: BTreeMap<String, TypeSummary> = BTreeMap::new();
        for i in &run.items {
            if let Some(q) = &i.qtype {
                let t = by_qtype.entry(format!("{}/{q}", i.kind)).or_insert(TypeSummary { n: 0, correct: 0, acc: None, retention: None });
                t.n += 1;
                t.correct += usize::from(i.score.correct);
            }
        }
        for t in by_qtype.values_mut() {
            t.acc = ratio(t.correct, t.n);
        }
        let vqa_correct = vqa.iter().filter(|i| i.score.correct).count();
        Summary {
            label: label(&run.prune),
            method: run.prune.method.to_string(),
            budget,
            keep1,
            keep2,
            grounding_acc: ratio(grounding_correct, grounding.len()),
            vqa_acc: ratio(vqa_correct, vqa.len()),
            grounding_retention: None,
            vqa_retention: None,
            n_grounding: grounding.len(),
            n_vqa: vqa.len(),
            grounding_correct,
            vqa_correct,
            grounding_mean_iou: mean(grounding.iter().map(|i| i.score.iou.unwrap_or(0.0))),
            grounding_no_box: grounding.iter().filter(|i| i.score.predicted_box.is_none()).count(),
            mean_ttft_ms: mean(run.items.iter().map(|i| i.ttft_ms)),
            mean_visual_tokens_kept: mean(run.items.iter().map(|i| i.visual_tokens_kept as f64)),
            mean_visual_tokens_after_stage1: mean(run.items.iter().map(|i| i.visual_tokens_after_stage1 as f64)),
            target_kept_stage1: mean(grounding.iter().filter_map(|i| i.target_kept_stage1)),
            target_kept_stage2: mean(grounding.iter().filter_map(|i| i.target_kept_stage2)),
            items_differ_from_none: false,
            by_qtype,
            unreadable: run.unreadable.len(),
            unreadable_items: run.unreadable.clone(),
        }
    }

    /// Fills the retention fields relative to the unpruned run's summary.
    pub fn set_retention(&mut self, none: &Summary) {
        self.grounding_retention = retention(self.grounding_acc, none.grounding_acc);
        self.vqa_retention = retention(self.vqa_acc, none.vqa_acc);
        for (k, t) in &mut self.by_qtype {
            t.retention = retention(t.acc, none.by_qtype.get(k).and_then(|n| n.acc));
        }
    }
}

fn lossy_path<S: serde::Serializer>(path: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

/// The table of a sweep: one row per method and budget, the unpruned row first.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// Model id (manifest).
    pub model: String,
    /// The data file (written lossily where its path is not UTF-8, so the table of a finished run is never lost).
    #[serde(serialize_with = "lossy_path")]
    pub data: PathBuf,
    /// The command that produced the table, if known.
    pub command: Option<String>,
    /// Most tokens generated per item (greedy).
    pub max_new_tokens: usize,
    /// Usable items in the data (after `--limit`).
    pub items: usize,
    /// Rows; retention is relative to the `none` row.
    pub rows: Vec<Summary>,
}

/// A row's budget column: the preset, `keep1/keep2`, or `-` unpruned.
fn budget_cell(r: &Summary) -> String {
    match (r.budget, r.keep1, r.keep2) {
        (Some(b), _, _) => b.to_string(),
        (None, Some(k1), Some(k2)) => format!("{k1}/{k2}"),
        _ => "-".into(),
    }
}

fn fmt_opt(v: Option<f64>, digits: usize, suffix: &str) -> String {
    match v {
        Some(x) => format!("{x:.digits$}{suffix}"),
        None => "n/a".into(),
    }
}

impl Table {
    /// Builds the table from runs; retention is computed against the first `none` run (all null without one).
    pub fn new(model: &str, data: &Path, command: Option<String>, max_new_tokens: usize, items: usize, runs: &[RunResult]) -> Table {
        let mut rows: Vec<Summary> = runs.iter().map(Summary::of).collect();
        let scored = |run: &RunResult| run.items.iter().map(|i| i.line).collect::<std::collections::BTreeSet<_>>();
        if let Some(n) = runs.iter().position(|r| r.prune.method == Method::None) {
            let (none, none_items) = (rows[n].clone(), scored(&runs[n]));
            for (r, run) in rows.iter_mut().zip(runs) {
                r.set_retention(&none);
                r.items_differ_from_none = scored(run) != none_items;
            }
        }
        Table { model: model.to_string(), data: data.to_path_buf(), command, max_new_tokens, items, rows }
    }

    /// The table as markdown: a header naming the model, data and command, then one row per run.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# nuwa eval: {} on {}\n", self.model, self.data.display());
        if let Some(c) = &self.command {
            let _ = writeln!(s, "Command: `{c}`\n");
        }
        let _ = writeln!(
            s,
            "Greedy decoding, at most {} tokens per answer; {} items parsed from the data (each row counts what it \
             scored and what was unreadable; the JSON lists the unreadable lines). Grounding: Acc@0.5 of the first \
             predicted box; VQA: normalised exact match; retention: accuracy / unpruned accuracy; tokens: mean visual \
             tokens after Stage 1 -> what the last decoder layer sees; target kept: mean share of a grounding \
             target's grid cells among the tokens after Stage 1 / after Stage 2; TTFT: mean time to first token, \
             image decoding included.\n",
            self.max_new_tokens, self.items
        );
        s.push_str("| method | budget | tokens | grounding acc | grounding retention | VQA acc | VQA retention | target kept S1 / S2 | mean TTFT ms | n grounding / VQA | unreadable |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            let budget = budget_cell(r);
            let tokens = format!(
                "{} -> {}",
                fmt_opt(r.mean_visual_tokens_after_stage1, 0, ""),
                fmt_opt(r.mean_visual_tokens_kept, 0, "")
            );
            let mark = if r.items_differ_from_none { " *" } else { "" };
            let _ = writeln!(
                s,
                "| {} | {budget} | {tokens} | {} | {}{mark} | {} | {}{mark} | {} / {} | {} | {} / {} | {} |",
                // the method with its ablation options (`nuwa+pillar=0`), as in the label
                r.label.split(':').next().unwrap_or(&r.method),
                fmt_opt(r.grounding_acc, 3, ""),
                fmt_opt(r.grounding_retention, 1, "%"),
                fmt_opt(r.vqa_acc, 3, ""),
                fmt_opt(r.vqa_retention, 1, "%"),
                fmt_opt(r.target_kept_stage1.map(|v| 100.0 * v), 0, "%"),
                fmt_opt(r.target_kept_stage2.map(|v| 100.0 * v), 0, "%"),
                fmt_opt(r.mean_ttft_ms, 1, ""),
                r.n_grounding,
                r.n_vqa,
                r.unreadable
            );
        }
        self.markdown_by_qtype(&mut s);
        if self.rows.iter().any(|r| r.items_differ_from_none) {
            s.push_str(
                "\n\\* Scored on other items than `none` (a request failed in one run and not the other; the JSON lists \
                 which): the retention compares different sets of items.\n",
            );
        }
        s
    }

    /// The per-type table, when the data's items carry a `qtype`: accuracy (retention) per row and type.
    fn markdown_by_qtype(&self, s: &mut String) {
        let mut types: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &self.rows {
            for (k, t) in &r.by_qtype {
                let n = types.entry(k.as_str()).or_insert(0);
                *n = (*n).max(t.n);
            }
        }
        if types.is_empty() {
            return;
        }
        let _ = writeln!(s, "\nBy item type (the data's `qtype`): accuracy (retention against `none`).\n");
        s.push_str("| method | budget |");
        for (k, n) in &types {
            // The type comes from the data: a `|` or a line break in it must not break the table.
            let k = k.replace('|', "\\|").replace(['\n', '\r'], " ");
            let _ = write!(s, " {k} (n={n}) |");
        }
        s.push_str("\n|---|---:|");
        s.push_str(&"---:|".repeat(types.len()));
        s.push('\n');
        for r in &self.rows {
            let _ = write!(s, "| {} | {} |", r.label.split(':').next().unwrap_or(&r.method), budget_cell(r));
            for k in types.keys() {
                let cell = match r.by_qtype.get(*k) {
                    Some(t) if r.method == "none" => fmt_opt(t.acc, 3, ""),
                    Some(t) => format!("{} ({})", fmt_opt(t.acc, 3, ""), fmt_opt(t.retention, 0, "%")),
                    None => "n/a".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
    }

    /// The two files [`Table::write`] writes for `stem`: `STEM.md` and `STEM.json` (a stem ending in `.md` or
    /// `.json` loses that extension first). A stem that names a directory (an existing one, or a path ending in a
    /// separator) is refused: it would give hidden files `DIR/.md` and `DIR/.json`.
    pub fn paths(stem: &Path) -> Result<(PathBuf, PathBuf)> {
        let text = stem.as_os_str().to_string_lossy();
        if stem.file_name().is_none() || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) || stem.is_dir() {
            return Err(Error::InvalidRequest(format!(
                "the table's path {} names a directory: give a file stem such as {}",
                stem.display(),
                stem.join("results").display()
            )));
        }
        let stem = match stem.extension().and_then(|e| e.to_str()) {
            Some("md" | "json") => stem.with_extension(""),
            _ => stem.to_path_buf(),
        };
        let mut md = stem.clone().into_os_string();
        md.push(".md");
        let mut json = stem.into_os_string();
        json.push(".json");
        Ok((PathBuf::from(md), PathBuf::from(json)))
    }

    /// Writes `<stem>.md` and `<stem>.json` (a trailing `.md` or `.json` on `stem` is dropped), creating the
    /// directory; returns both paths.
    pub fn write(&self, stem: &Path) -> Result<(PathBuf, PathBuf)> {
        let (md, json) = Table::paths(stem)?;
        if let Some(dir) = md.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(&md, self.markdown()).map_err(|e| Error::io(&md, e))?;
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::InvalidRequest(format!("serialising the table: {e}")))?;
        std::fs::write(&json, text + "\n").map_err(|e| Error::io(&json, e))?;
        Ok((md, json))
    }
}
