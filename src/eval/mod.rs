//! `nuwa eval`: grounding and VQA accuracy of a model under a pruning setting, and sweeps over methods and budgets
//! in one process (the model is loaded once) with retention relative to the unpruned run.
//!
//! - Data ([`data`]): JSON Lines, `{"image", "kind": "grounding", "prompt", "bbox": [x1, y1, x2, y2]}` (original
//!   pixels) or `{"image", "kind": "vqa", "prompt", "answer"}`; image paths relative to the file; other fields are
//!   ignored; lines that cannot be used are counted with their line numbers, never dropped silently (so is a
//!   grounding box that reaches outside its image or is under a pixel, found once the image is read).
//! - Scoring ([`metrics`]): grounding is right when the FIRST box of the answer (mapped to original pixels by the
//!   runtime, [`crate::Output::boxes`]) has IoU >= 0.5 with `bbox` (no box: wrong); VQA is right when the normalised
//!   answer equals the normalised expected one (lower case, punctuation and symbols to spaces, whitespace collapsed,
//!   number words `zero`..`twenty` to digits, on both sides; for a `yes`/`no` expected answer only the first word of
//!   the answer counts).
//! - Decoding is greedy; every item is one independent request.
//! - Tables ([`table`]): per method and budget, accuracies, retention (`acc / acc_none` in %, null when the unpruned
//!   accuracy is 0 or undefined), mean TTFT and mean visual tokens after Stage 1 and after Stage 2; where the data
//!   gives items an optional `"qtype"`, accuracy and retention per `kind/qtype` too.

pub mod data;
pub mod metrics;
pub mod predictions;
pub mod progress;
pub mod table;

use std::sync::Arc;

use serde::Serialize;

pub use data::{Dataset, EvalItem, Unreadable};
pub use metrics::{check_box_in_image, iou, kept_share, normalize_answer, score, target_cells, Expected, ItemKind, Score, BOX_EDGE_TOLERANCE, IOU_THRESHOLD};
pub use table::{retention, Summary, Table, TypeSummary};

use crate::error::{Error, Result};
use crate::pipeline::{GenerationParams, ImageInput, ImagePrefix, Model};
use crate::prune::{Amount, Method, PositionPolicy, PruneConfig, Stage2Select};
use crate::sampler::SamplerConfig;

/// The sweep `nuwa eval --sweep` runs when given no list: every method at budgets 64, 128 and 192, plus `none`.
pub const DEFAULT_SWEEP: &str =
    "none;nuwa:64,128,192;fastv:64,128,192;visionzip:64,128,192;divprune:64,128,192;dart:64,128,192;pool:64,128,192;random:64,128,192";

/// Budgets a sweep entry without a list gets.
pub const DEFAULT_BUDGETS: [usize; 3] = [64, 128, 192];

/// The result of one item.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ItemResult {
    /// 1-based line number in the data file.
    pub line: usize,
    /// Grounding or VQA.
    pub kind: ItemKind,
    /// The verdict.
    #[serde(flatten)]
    pub score: Score,
    /// The generated text.
    pub text: String,
    /// Time to first token.
    pub ttft_ms: f64,
    /// Visual tokens the last decoder layer saw (after Stage 2).
    pub visual_tokens_kept: usize,
    /// Visual tokens after Stage 1 (what the decoder head saw).
    pub visual_tokens_after_stage1: usize,
    /// Grounding: the share of the target's grid cells ([`target_cells`]) among the tokens Stage 1 kept (for merging
    /// methods: kept as an anchor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_kept_stage1: Option<f64>,
    /// Grounding: the same share among the tokens the last decoder layer saw (after Stage 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_kept_stage2: Option<f64>,
    /// The item's type from the data ([`EvalItem::qtype`]), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
}

/// Everything one pruning setting gave on a dataset.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The setting.
    pub prune: PruneConfig,
    /// Scored items, in file order.
    pub items: Vec<ItemResult>,
    /// Lines not scored: the dataset's unreadable lines, then items whose request failed (e.g. an undecodable image).
    pub unreadable: Vec<Unreadable>,
}

/// What happened to one item, for progress reporting.
#[derive(Debug, Clone, Copy)]
pub enum ItemEvent<'a> {
    /// The item was scored.
    Scored(&'a ItemResult),
    /// The request failed; the item is counted as unreadable.
    Failed(&'a Unreadable),
}

/// A short name for a setting: `none`, `nuwa:64`, `nuwa:k112/16`, and with an ablation option
/// `nuwa+pillar=0:64`, `nuwa+regions=0:64`, `nuwa+stage2=random:64`, `visionzip+contextual=0:64`,
/// `visionzip+positions=original:64` (a position convention is named
/// only where it is not the method's own); the syntax [`parse_sweep`] reads.
pub fn label(prune: &PruneConfig) -> String {
    let mut method = prune.method.to_string();
    match prune.positions {
        Some(p) if p != prune.method.published_positions() && prune.method != Method::None => {
            method += if p == PositionPolicy::Original { "+positions=original" } else { "+positions=contiguous" }
        }
        _ => {}
    }
    if let Some(q) = prune.pillar_quantile {
        method += &format!("+pillar={q}");
    }
    if let Some(c) = prune.contextual {
        method += &format!("+contextual={c}");
    }
    // The published values (separation on, attention ranking) are the method itself and get no option.
    if prune.regions == Some(false) {
        method += "+regions=0";
    }
    if prune.stage2_select == Some(Stage2Select::Random) {
        method += "+stage2=random";
    }
    match prune.amount {
        Amount::All => method,
        Amount::Budget(b) => format!("{method}:{b}"),
        Amount::Keep { keep1, keep2 } => format!("{method}:k{keep1}/{keep2}"),
    }
}

/// Applies the `+key=value` ablation options of a sweep entry's method part to `c`.
fn apply_options(entry: &str, options: &str, c: &mut PruneConfig) -> Result<()> {
    for opt in options.split('+').map(str::trim).filter(|o| !o.is_empty()) {
        let bad = |what: &str| Error::InvalidRequest(format!("sweep entry {entry:?}: {what}"));
        // A value's own parse error, prefixed with the entry it came from.
        let in_entry = |e: Error| match e {
            Error::InvalidRequest(m) => bad(&m),
            other => other,
        };
        let (key, value) = opt.split_once('=').ok_or_else(|| bad(&format!("option {opt:?} is not KEY=VALUE")))?;
        match key.trim() {
            "pillar" => {
                let q: f64 = value.trim().parse().map_err(|_| bad(&format!("pillar quantile {value:?} is not a number")))?;
                c.pillar_quantile = Some(q);
            }
            "positions" => {
                let policy = value.trim().parse().map_err(in_entry)?;
                c.positions = Some(policy);
            }
            "contextual" => {
                let n: usize = value.trim().parse().map_err(|_| bad(&format!("contextual count {value:?} is not a number")))?;
                c.contextual = Some(n);
            }
            // The published values are stored as the default (None), so `nuwa+regions=1:64` is `nuwa:64`.
            "regions" => {
                c.regions = match value.trim() {
                    "0" => Some(false),
                    "1" => None,
                    other => return Err(bad(&format!("regions={other:?}: 0 (no region separation) or 1"))),
                };
            }
            "stage2" => {
                let select: Stage2Select = value.trim().parse().map_err(in_entry)?;
                c.stage2_select = (select == Stage2Select::Random).then_some(select);
            }
            other => {
                return Err(bad(&format!(
                    "unknown option {other:?}; valid: pillar=Q, regions=0|1, stage2=attention|random (nuwa), contextual=N \
                     (visionzip), positions=original|contiguous"
                )))
            }
        }
    }
    Ok(())
}

/// Runs every item of `data` under `prune`; `on_item` sees each result as it comes (for progress).
pub fn evaluate(
    model: &Arc<Model>,
    data: &Dataset,
    prune: &PruneConfig,
    max_new_tokens: usize,
    mut on_item: impl FnMut(ItemEvent<'_>),
) -> Result<RunResult> {
    let mut runs = evaluate_sweep(model, data, std::slice::from_ref(prune), max_new_tokens, |_, e| on_item(e))?;
    runs.pop().ok_or_else(|| Error::InvalidRequest("no evaluation run".into()))
}

/// Runs every item of `data` under each of `settings`, one [`RunResult`] per setting, in order.
///
/// Images are the outer loop: the items on one image (wherever they are in the file) share one decode and vision pass
/// ([`Model::prepare`]), and under each setting one [`ImagePrefix`] (Stage 1, projector and the decoder over the
/// tokens before the prompt), so a sweep costs one vision pass per image and one prefix per image and setting.
/// Results are the same as running every item alone; TTFT still counts the shared work, as a lone request pays it.
/// `on_item` gets the setting's index with each result.
pub fn evaluate_sweep(
    model: &Arc<Model>,
    data: &Dataset,
    settings: &[PruneConfig],
    max_new_tokens: usize,
    on_item: impl FnMut(usize, ItemEvent<'_>),
) -> Result<Vec<RunResult>> {
    evaluate_sweep_from(model, data, settings, max_new_tokens, vec![Vec::new(); settings.len()], on_item)
}

/// [`evaluate_sweep`] continuing a stopped one: `prior[i]` holds the items setting `i` already scored (read back
/// with [`predictions::read`]); they are kept as they are and not run again, and an image whose every item is done
/// under every setting is not even decoded. `on_item` sees only the new results.
pub fn evaluate_sweep_from(
    model: &Arc<Model>,
    data: &Dataset,
    settings: &[PruneConfig],
    max_new_tokens: usize,
    prior: Vec<Vec<ItemResult>>,
    mut on_item: impl FnMut(usize, ItemEvent<'_>),
) -> Result<Vec<RunResult>> {
    let v = &model.manifest().vision;
    check_settings(model.manifest(), settings)?;
    if max_new_tokens == 0 {
        return Err(Error::InvalidRequest("--max-tokens must be at least 1".into()));
    }
    if prior.len() != settings.len() {
        return Err(Error::InvalidRequest(format!("{} settings but earlier results for {}", settings.len(), prior.len())));
    }
    let done: Vec<std::collections::HashSet<usize>> = prior.iter().map(|items| items.iter().map(|r| r.line).collect()).collect();
    let mut runs: Vec<RunResult> = settings
        .iter()
        .zip(prior)
        .map(|(prune, mut items)| {
            items.reserve(data.items.len().saturating_sub(items.len()));
            RunResult { prune: prune.clone(), items, unreadable: data.unreadable.clone() }
        })
        .collect();
    let base = GenerationParams { max_new_tokens, sampler: SamplerConfig::Greedy, record: false, ..GenerationParams::default() };
    // The items on one image share its vision pass and, per setting, its image prefix; images go in the order of
    // their first item, so a file sorted by kind or interleaved costs no more vision passes than a grouped one.
    let mut groups: Vec<Vec<&EvalItem>> = Vec::new();
    let mut group_of: std::collections::HashMap<&std::path::Path, usize> = std::collections::HashMap::new();
    for item in &data.items {
        let g = *group_of.entry(item.image.as_path()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(item);
    }
    for group in &groups {
        let path = &group[0].image;
        let pending = |i: usize| group.iter().any(|it| !done[i].contains(&it.line));
        if !(0..runs.len()).any(pending) {
            continue;
        }
        let prepared = model.prepare(&ImageInput::Path(path.clone()), &base.limits).map_err(|e| e.to_string());
        for (i, run) in runs.iter_mut().enumerate() {
            if !pending(i) {
                continue;
            }
            let params = GenerationParams { prune: run.prune.clone(), ..base.clone() };
            let prefix =
                prepared.as_ref().map_err(Clone::clone).and_then(|image| model.image_prefix(image, &params.prune).map_err(|e| e.to_string()));
            for item in group.iter().filter(|it| !done[i].contains(&it.line)) {
                let outcome = prefix.as_ref().map_err(Clone::clone).and_then(|prefix| {
                    if let (Expected::Grounding { bbox }, Ok(image)) = (&item.expected, &prepared) {
                        let r = &image.pixels.resize;
                        check_box_in_image(*bbox, r.original_width, r.original_height)?;
                    }
                    run_item(model, prefix, &item.prompt, &params).map_err(|e| e.to_string())
                });
                match outcome {
                    Ok(out) => {
                        let s = &out.stats;
                        // The answer's first group of four numbers is its box; a malformed one is no box.
                        let first = crate::boxes::first_box(&out.text, &model.manifest().box_format, &out.resize).map(|b| b.original);
                        let target = match &item.expected {
                            Expected::Grounding { bbox } => {
                                let b = out.resize.to_model_box(bbox.map(|v| v as f32));
                                target_cells(b, out.resize.model_width, out.resize.model_height, v.grid_w, v.grid_h)
                            }
                            Expected::Vqa { .. } => Vec::new(),
                        };
                        let result = ItemResult {
                            line: item.line,
                            kind: item.expected.kind(),
                            score: score(&item.expected, &out.text, first.as_slice()),
                            ttft_ms: s.ttft_ms,
                            visual_tokens_kept: s.visual_tokens_kept,
                            visual_tokens_after_stage1: s.visual_tokens_after_stage1,
                            target_kept_stage1: kept_share(&target, &s.kept_stage1),
                            target_kept_stage2: kept_share(&target, &s.kept_stage2),
                            text: out.text,
                            qtype: item.qtype.clone(),
                        };
                        on_item(i, ItemEvent::Scored(&result));
                        run.items.push(result);
                    }
                    Err(e) => {
                        let u = Unreadable { line: item.line, reason: format!("{}: {e}", item.image.display()) };
                        on_item(i, ItemEvent::Failed(&u));
                        run.unreadable.push(u);
                    }
                }
            }
        }
    }
    for run in &mut runs {
        run.items.sort_by_key(|r| r.line);
        run.unreadable.sort_by_key(|u| u.line);
    }
    Ok(runs)
}

fn run_item(model: &Arc<Model>, prefix: &ImagePrefix, prompt: &str, params: &GenerationParams) -> Result<crate::pipeline::Output> {
    let mut generation = model.generate_with_prefix(prefix, prompt, params)?;
    generation.run_to_end(|_| true)?;
    Ok(generation.output())
}

/// Parses a sweep: entries separated by `;`, each `METHOD` or `METHOD:B1,B2,...` (budgets as for `--budget`, or
/// `kN/M` for `--keep1 N --keep2 M`); a method without budgets gets 64, 128 and 192, `none` takes none. The method
/// may carry ablation options: `nuwa+pillar=0` (Stage 1's pillar quantile: 0 is no aggregation),
/// `visionzip+contextual=0` (contextual tokens in the budget), `+positions=original|contiguous`. `default` is
/// [`DEFAULT_SWEEP`]; an empty or blank spec is refused. The `none` run is always included, first, since retention
/// is relative to it; repeated entries run once. `template` gives the position policy (unless an entry sets one)
/// and seed of every setting.
pub fn parse_sweep(spec: &str, template: &PruneConfig) -> Result<Vec<PruneConfig>> {
    let spec = spec.trim();
    // An empty list is more likely an unset shell variable than a request for the longest run there is.
    if spec.is_empty() {
        return Err(Error::InvalidRequest(
            "the sweep is empty: give settings (\"nuwa:64;fastv:64\"), or \"default\" (--sweep alone) for every method at 64, 128 and 192".into(),
        ));
    }
    let spec = if spec.eq_ignore_ascii_case("default") || spec.eq_ignore_ascii_case("all") {
        DEFAULT_SWEEP
    } else {
        spec
    };
    let make = |method, amount| PruneConfig {
        method,
        amount,
        // A `--positions` given with the sweep applies to the pruned rows; the unpruned one has nothing to renumber.
        positions: if method == Method::None { None } else { template.positions },
        pillar_quantile: None,
        contextual: None,
        regions: None,
        stage2_select: None,
        ..template.clone()
    };
    let mut out = vec![make(Method::None, Amount::All)];
    let mut seen: std::collections::HashSet<String> = out.iter().map(label).collect();
    let mut entries = 0;
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        entries += 1;
        let (name, budgets) = match entry.split_once(':') {
            Some((n, b)) => (n.trim(), Some(b)),
            None => (entry, None),
        };
        let (name, options) = name.split_once('+').unwrap_or((name, ""));
        let method: Method = name.trim().parse()?;
        if method == Method::None && !options.trim().is_empty() {
            return Err(Error::InvalidRequest(format!("sweep entry {entry:?}: none takes no options")));
        }
        let amounts: Vec<Amount> = match (method, budgets) {
            (Method::None, None) => vec![Amount::All],
            (Method::None, Some(_)) => {
                return Err(Error::InvalidRequest(format!("sweep entry {entry:?}: none takes no budgets")))
            }
            (_, None) => DEFAULT_BUDGETS.iter().map(|&b| Amount::Budget(b)).collect(),
            (_, Some(list)) => list
                .split(',')
                .map(|b| {
                    let b = b.trim();
                    let bad = || Error::InvalidRequest(format!("sweep entry {entry:?}: budget {b:?} is not a number or kN/M"));
                    match b.strip_prefix('k').and_then(|k| k.split_once('/')) {
                        Some((k1, k2)) => Ok(Amount::Keep {
                            keep1: k1.trim().parse().map_err(|_| bad())?,
                            keep2: k2.trim().parse().map_err(|_| bad())?,
                        }),
                        None => b.parse::<usize>().map(Amount::Budget).map_err(|_| bad()),
                    }
                })
                .collect::<Result<_>>()?,
        };
        for amount in amounts {
            let mut c = make(method, amount);
            apply_options(entry, options, &mut c)?;
            // By label: `nuwa+positions=original` is `nuwa` (its own convention), one setting under one name.
            if seen.insert(label(&c)) {
                out.push(c);
            }
        }
    }
    // ";" or " ; " (unset variables in "$A;$B") would otherwise run `none` alone.
    if entries == 0 {
        return Err(Error::InvalidRequest(format!("the sweep {spec:?} names no setting: give settings (\"nuwa:64;fastv:64\") or \"default\"")));
    }
    Ok(out)
}

/// Checks every setting of a sweep against the model's grid, so a bad budget fails before hours of work.
pub fn check_settings(manifest: &crate::manifest::Manifest, settings: &[PruneConfig]) -> Result<()> {
    let v = &manifest.vision;
    for s in settings {
        s.resolve(v.grid_h, v.grid_w).map_err(|e| match e {
            Error::InvalidRequest(m) => Error::InvalidRequest(format!("{}: {m}", label(s))),
            other => Error::InvalidRequest(format!("{}: {other}", label(s))),
        })?;
    }
    Ok(())
}
