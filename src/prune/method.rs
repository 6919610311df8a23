//! Pruning as a request option: which method, how much, and which position convention; one interface so any method
//! can be switched on per request and compared in one run.
//!
//! Where each method acts and what a budget means for it:
//! - `none`: every token, both stages.
//! - `nuwa`: Stage 1 (separation, pillars, aggregation) keeps `keep1`, Stage 2 at the split layer keeps `keep2`
//!   (presets 64/128/192 -> 112/224/336 then 16/32/48 on 576 tokens, scaled by N/576 on other grids).
//! - `fastv`: no Stage 1; keeps the top `keep2` by the last token's attention at the decoder's first cut, which is
//!   FastV's own early layer when the model was exported with `--fastv-layer 2` (a middle segment), else the split.
//! - `visionzip`, `divprune`, `dart`, `pool`, `random`: Stage 1 only, keeping the budget itself (64/128/192 on
//!   576 tokens, scaled) for every layer, as those papers count budgets.
//!
//! The presets 64/128/192 always prune (scaled to the grid: 64 means 64/576 of LLaVA-1.5's tokens). Any other
//! budget of N (the grid's token count) or more means no pruning, for any method.

use std::str::FromStr;

use ndarray::{Array2, Axis};

use super::{
    dart, divprune, fastv, nuwa_stage1, nuwa_stage2, pool, pool_grid, random, visionzip, visionzip_split, Budget,
    PrunePlan, REFERENCE_TOKENS,
};
use crate::error::{Error, Result};
use crate::vision::VisionTokens;

/// A pruning method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Keep every token.
    #[default]
    None,
    /// Nüwa Stage 1 + Stage 2.
    Nuwa,
    /// FastV: attention of the last prompt token inside the decoder.
    FastV,
    /// VisionZip: dominant tokens by CLS attention plus merged contextual tokens.
    VisionZip,
    /// DivPrune: greedy max-min diversity.
    DivPrune,
    /// DART: tokens least similar to high-norm pivots.
    Dart,
    /// Uniform average pooling on the grid.
    Pool,
    /// Seeded uniform random selection.
    Random,
}

/// Every method name, in the order `--prune` lists them.
pub const METHOD_NAMES: [&str; 8] = ["none", "nuwa", "fastv", "visionzip", "divprune", "dart", "pool", "random"];

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" => Method::None,
            "nuwa" => Method::Nuwa,
            "fastv" => Method::FastV,
            "visionzip" => Method::VisionZip,
            "divprune" => Method::DivPrune,
            "dart" => Method::Dart,
            "pool" => Method::Pool,
            "random" => Method::Random,
            other => {
                return Err(Error::InvalidRequest(format!(
                    "unknown pruning method {other:?}; valid methods: {}",
                    METHOD_NAMES.join(", ")
                )))
            }
        })
    }
}

impl Method {
    /// The position convention the method was published with: VisionZip re-indexes its kept tokens, the others
    /// keep original positions. A request without `positions` gets this one.
    pub fn published_positions(self) -> PositionPolicy {
        if self == Method::VisionZip {
            PositionPolicy::Contiguous
        } else {
            PositionPolicy::Original
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = [Method::None, Method::Nuwa, Method::FastV, Method::VisionZip, Method::DivPrune, Method::Dart, Method::Pool, Method::Random]
            .iter()
            .position(|m| m == self)
            .unwrap_or(0);
        f.write_str(METHOD_NAMES[i])
    }
}

/// How kept visual tokens are positioned for RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionPolicy {
    /// Each token keeps its original raster position; text after the image continues as if nothing was pruned.
    Original,
    /// Kept tokens are re-indexed 0..M and text continues right after them (what VisionZip does).
    Contiguous,
}

impl FromStr for PositionPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "original" => Ok(PositionPolicy::Original),
            "contiguous" => Ok(PositionPolicy::Contiguous),
            other => Err(Error::InvalidRequest(format!("unknown position policy {other:?}; valid: original, contiguous"))),
        }
    }
}

/// How much to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// Everything.
    #[default]
    All,
    /// A budget in average visual tokens per layer: a preset 64, 128 or 192 (on 576 tokens, scaled to the grid), or
    /// N (the token count) or more for none.
    Budget(usize),
    /// Explicit counts after Stage 1 and after Stage 2.
    Keep {
        /// Tokens after Stage 1 (or kept by a Stage-1-only method).
        keep1: usize,
        /// Tokens after Stage 2 (or kept by FastV).
        keep2: usize,
    },
}

/// The pruning options of a request.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PruneConfig {
    /// Method.
    pub method: Method,
    /// How much to keep.
    pub amount: Amount,
    /// Position convention (default: original, except contiguous for VisionZip).
    pub positions: Option<PositionPolicy>,
    /// Seed for `random`.
    pub seed: u64,
    /// Nüwa ablation: Stage 1's pillar quantile instead of the published 0.55. 0 makes every kept anchor a pillar
    /// (selection without aggregation); 1 aggregates every anchor but the highest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pillar_quantile: Option<f64>,
    /// VisionZip ablation: contextual (merged) tokens within the budget instead of the published 10 per 64; 0 keeps
    /// dominant tokens only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contextual: Option<usize>,
    /// Nüwa ablation: `Some(false)` turns Stage 1's region separation off, so the anchors are the global top-K by
    /// metric (every cell of each 2x2 region a candidate), as the paper's ablation without separation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<bool>,
    /// Nüwa ablation: how Stage 2 picks the tokens the later layers see (published: by attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage2_select: Option<Stage2Select>,
}

/// How Nüwa's Stage 2 picks its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage2Select {
    /// The top tokens of the last prompt token's head-mean attention row (published).
    Attention,
    /// A seeded uniform draw among the Stage-1 tokens (the paper's random Stage-2 ablation; `seed` sets it).
    Random,
}

impl FromStr for Stage2Select {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "attention" => Ok(Stage2Select::Attention),
            "random" => Ok(Stage2Select::Random),
            other => Err(Error::InvalidRequest(format!("unknown Stage-2 selection {other:?}: attention or random"))),
        }
    }
}

impl std::fmt::Display for Stage2Select {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage2Select::Attention => "attention",
            Stage2Select::Random => "random",
        })
    }
}

/// A config resolved against a grid: what each stage keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// Stage-1 keep (None: no Stage-1 pruning).
    pub stage1: Option<usize>,
    /// Nüwa's candidates per region, for Stage 1.
    pub top_n: usize,
    /// Stage-2 keep (None: no Stage-2 pruning).
    pub stage2: Option<usize>,
    /// Position convention.
    pub positions: PositionPolicy,
}

/// What Stage 1 kept.
#[derive(Debug, Clone)]
pub struct Stage1Result {
    /// Raster index (original grid position) of each kept token, in sequence order.
    pub kept: Vec<usize>,
    /// Per kept token: unchanged anchor (true) or aggregated/merged (false); None for plain selections.
    pub pillar: Option<Vec<bool>>,
    /// Pre-projector features of the kept tokens, `[kept, D]`.
    pub tokens: Array2<f32>,
}

fn scale_to_grid(k: usize, n: usize) -> usize {
    ((k * n) as f64 / REFERENCE_TOKENS as f64).round().max(1.0) as usize
}

impl PruneConfig {
    /// Whether the selection reads `seed`: the `random` method, and Nüwa with random Stage 2.
    pub fn uses_seed(&self) -> bool {
        self.method == Method::Random || self.stage2_select == Some(Stage2Select::Random)
    }

    /// Whether `other` selects the same tokens: equal settings, with the seed compared only where it is read
    /// ([`PruneConfig::uses_seed`]; a prefix built under one sampling seed serves requests with another).
    pub fn same_selection(&self, other: &PruneConfig) -> bool {
        let seedless = |c: &PruneConfig| PruneConfig { seed: if c.uses_seed() { c.seed } else { 0 }, ..c.clone() };
        seedless(self) == seedless(other)
    }

    /// Resolves the keep counts of this config on a `grid_h x grid_w` grid.
    pub fn resolve(&self, grid_h: usize, grid_w: usize) -> Result<Resolved> {
        let n = super::grid_tokens("pruning", grid_h, grid_w)?;
        let positions = self.positions.unwrap_or(self.method.published_positions());
        let none = Resolved { stage1: None, top_n: 1, stage2: None, positions };
        if let Some(q) = self.pillar_quantile {
            if self.method != Method::Nuwa {
                return Err(Error::InvalidRequest(format!("the pillar quantile is a Nüwa option, not one of {}", self.method)));
            }
            if !(0.0..=1.0).contains(&q) {
                return Err(Error::InvalidRequest(format!("pillar quantile must be in [0, 1] (got {q})")));
            }
        }
        if (self.regions.is_some() || self.stage2_select.is_some()) && self.method != Method::Nuwa {
            return Err(Error::InvalidRequest(format!(
                "region separation and the Stage-2 selection are Nüwa options, not ones of {}",
                self.method
            )));
        }
        if self.contextual.is_some() && self.method != Method::VisionZip {
            return Err(Error::InvalidRequest(format!("contextual tokens are a VisionZip option, not one of {}", self.method)));
        }
        if self.method == Method::None {
            // Nothing is pruned, so a position convention would have no effect: refused rather than ignored.
            if let Some(p) = self.positions {
                return Err(Error::InvalidRequest(format!(
                    "--positions {} renumbers kept visual tokens and needs a pruning method (--prune METHOD other than none)",
                    if p == PositionPolicy::Original { "original" } else { "contiguous" }
                )));
            }
            if self.amount != Amount::All {
                return Err(Error::InvalidRequest("--budget/--keep1/--keep2 need a pruning method (--prune METHOD other than none)".into()));
            }
            return Ok(none);
        }
        let (plan, single) = match self.amount {
            Amount::All => {
                return Err(Error::InvalidRequest(format!(
                    "--prune {} needs --budget 64|128|192 or --keep1 N --keep2 M",
                    self.method
                )))
            }
            Amount::Budget(b) => match Budget::from_tokens(b) {
                Ok(budget) => (budget.plan(grid_h, grid_w)?, scale_to_grid(b, n).min(n)),
                // Not a preset: the full token count (or more) is a valid request for no pruning.
                Err(_) if b >= n => return Ok(none),
                Err(e) => return Err(e),
            },
            Amount::Keep { keep1, keep2 } => {
                // Checked on the counts as given (not clamped to the grid), and per method: a count the method
                // does not use must not be silently ignored.
                if keep2 > keep1 {
                    return Err(Error::InvalidRequest(format!(
                        "--keep2 {keep2} exceeds --keep1 {keep1}: Stage 2 selects among the Stage-1 tokens"
                    )));
                }
                match self.method {
                    Method::FastV if keep1 < n => {
                        return Err(Error::InvalidRequest(format!(
                            "FastV has no Stage 1: --keep1 must be the full token count {n} (got {keep1}); its tokens are --keep2"
                        )))
                    }
                    Method::VisionZip | Method::DivPrune | Method::Dart | Method::Pool | Method::Random if keep2 != keep1 => {
                        return Err(Error::InvalidRequest(format!(
                            "{} keeps one set of tokens: --keep2 must equal --keep1 (got {keep1} and {keep2})",
                            self.method
                        )))
                    }
                    _ => {}
                }
                if keep1 >= n && keep2 >= keep1 {
                    return Ok(none);
                }
                let plan = PrunePlan::explicit(grid_h, grid_w, keep1.min(n), keep2.min(n))?;
                (plan, keep1.min(n))
            }
        };
        let cut = |k: usize, of: usize| if k >= of { None } else { Some(k) };
        Ok(match self.method {
            Method::None => none,
            Method::Nuwa => Resolved {
                stage1: cut(plan.keep1, n),
                top_n: plan.top_n,
                stage2: cut(plan.keep2, plan.keep1),
                positions,
            },
            Method::FastV => Resolved { stage1: None, top_n: 1, stage2: cut(plan.keep2, n), positions },
            Method::VisionZip | Method::DivPrune | Method::Dart | Method::Pool | Method::Random => {
                if let (Some(c), Some(keep)) = (self.contextual, cut(single, n)) {
                    if c > keep {
                        return Err(Error::InvalidRequest(format!(
                            "VisionZip: {c} contextual tokens do not fit in a budget of {keep} tokens"
                        )));
                    }
                }
                Resolved { stage1: cut(single, n), top_n: 1, stage2: None, positions }
            }
        })
    }

    /// Runs Stage 1 of this config on the vision tower's output.
    pub fn stage1(&self, r: &Resolved, t: &VisionTokens) -> Result<Stage1Result> {
        let n = t.features.nrows();
        let Some(keep) = r.stage1 else {
            return Ok(Stage1Result { kept: (0..n).collect(), pillar: None, tokens: t.features.clone() });
        };
        let metric = || {
            t.cls_attention.as_deref().ok_or_else(|| {
                Error::InvalidRequest(format!("--prune {} needs the CLS attention signal, which this vision tower lacks", self.method))
            })
        };
        let select = |kept: Vec<usize>| {
            let tokens = t.features.select(Axis(0), &kept);
            Stage1Result { kept, pillar: None, tokens }
        };
        Ok(match self.method {
            Method::Nuwa => {
                let mut cfg = PrunePlan { top_n: r.top_n, keep1: keep, keep2: keep }.stage1_config(t.grid_h, t.grid_w);
                if let Some(q) = self.pillar_quantile {
                    cfg.pillar_quantile = q;
                }
                if self.regions == Some(false) {
                    // Every cell of a region nominated: the candidates are all patches, separation is a global top-K.
                    cfg.top_n = super::stage1::REGION * super::stage1::REGION;
                }
                let out = nuwa_stage1(metric()?, t.similarity.view(), t.features.view(), t.grid_h, t.grid_w, &cfg)?;
                Stage1Result { kept: out.kept, pillar: Some(out.pillar), tokens: out.tokens }
            }
            Method::VisionZip => {
                let (dominant, contextual) = match self.contextual {
                    Some(c) => (keep - c.min(keep), c.min(keep)),
                    None => visionzip_split(keep),
                };
                let out = visionzip(metric()?, t.similarity.view(), t.features.view(), dominant, contextual)?;
                let mut kept: Vec<usize> = out.dominant.iter().chain(&out.targets).copied().collect();
                let mut pillar: Vec<bool> = out.dominant.iter().map(|_| true).chain(out.targets.iter().map(|_| false)).collect();
                let mut tokens = out.tokens;
                if r.positions == PositionPolicy::Original {
                    // Original positions: order the sequence by position so RoPE positions increase along it.
                    let mut order: Vec<usize> = (0..kept.len()).collect();
                    order.sort_by_key(|&i| kept[i]);
                    kept = order.iter().map(|&i| kept[i]).collect();
                    pillar = order.iter().map(|&i| pillar[i]).collect();
                    tokens = tokens.select(Axis(0), &order);
                }
                Stage1Result { kept, pillar: Some(pillar), tokens }
            }
            Method::DivPrune => select(divprune(t.features.view(), keep)?),
            Method::Dart => select(dart(t.features.view(), keep, dart_pivots(keep))?),
            Method::Random => select(random(n, keep, self.seed)?),
            Method::Pool => {
                let (h, w) = pool_grid(t.grid_h, t.grid_w, keep);
                let out = pool(t.features.view(), t.grid_h, t.grid_w, h, w)?;
                Stage1Result { kept: out.positions, pillar: None, tokens: out.tokens }
            }
            Method::None | Method::FastV => Stage1Result { kept: (0..n).collect(), pillar: None, tokens: t.features.clone() },
        })
    }

    /// Whether this setting drops visual tokens inside the decoder (Nüwa's Stage 2, FastV), so that layers after
    /// that point see fewer tokens than those before it.
    pub fn prunes_in_decoder(&self, r: &Resolved) -> bool {
        r.stage2.is_some() && matches!(self.method, Method::Nuwa | Method::FastV)
    }

    /// Stage 2 (Nüwa) or FastV: the kept indices relative to `image_span`, from the head-mean attention row of the
    /// last prompt token; None when this setting keeps every token at that point.
    pub fn stage2(&self, r: &Resolved, attention_row: &[f32], image_span: std::ops::Range<usize>) -> Result<Option<Vec<usize>>> {
        let Some(keep) = r.stage2 else { return Ok(None) };
        match self.method {
            Method::Nuwa if self.stage2_select == Some(Stage2Select::Random) => {
                // Checks the span against the row as the attention selection does, then draws instead.
                nuwa_stage2(attention_row, image_span.clone(), keep)?;
                random(image_span.len(), keep, self.seed).map(Some)
            }
            Method::Nuwa => nuwa_stage2(attention_row, image_span, keep).map(Some),
            Method::FastV => fastv(attention_row, image_span, keep).map(Some),
            _ => Ok(None),
        }
    }
}

/// DART's pivot count: the official code uses 8 pivots at 576 tokens; at least 1, at most half the kept tokens.
fn dart_pivots(keep: usize) -> usize {
    8.min(keep.div_ceil(2)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_too_large_is_refused_quickly() {
        // Before, 2^32 x 2^32 wrapped to 0 in release and the preset's candidate count looped for minutes.
        let c = PruneConfig { method: Method::Nuwa, amount: Amount::Budget(64), ..PruneConfig::default() };
        let e = c.resolve(1 << 32, 1 << 32).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }

    fn cfg(method: Method, amount: Amount) -> PruneConfig {
        PruneConfig { method, amount, positions: None, seed: 0, ..Default::default() }
    }

    #[test]
    fn presets_resolve_to_the_published_counts_on_24x24() {
        let r = cfg(Method::Nuwa, Amount::Budget(64)).resolve(24, 24).expect("resolve");
        assert_eq!((r.stage1, r.top_n, r.stage2), (Some(112), 1, Some(16)));
        let r = cfg(Method::Nuwa, Amount::Budget(192)).resolve(24, 24).expect("resolve");
        assert_eq!((r.stage1, r.top_n, r.stage2), (Some(336), 3, Some(48)));
        let r = cfg(Method::VisionZip, Amount::Budget(64)).resolve(24, 24).expect("resolve");
        assert_eq!((r.stage1, r.stage2, r.positions), (Some(64), None, PositionPolicy::Contiguous));
        let r = cfg(Method::FastV, Amount::Budget(128)).resolve(24, 24).expect("resolve");
        assert_eq!((r.stage1, r.stage2), (None, Some(32)));
    }

    #[test]
    fn a_position_convention_without_pruning_is_refused_not_ignored() {
        for p in [PositionPolicy::Original, PositionPolicy::Contiguous] {
            let c = PruneConfig { positions: Some(p), ..cfg(Method::None, Amount::All) };
            let e = c.resolve(24, 24).expect_err("none with --positions");
            assert!(e.to_string().contains("--positions") && e.to_string().contains("pruning method"), "{e}");
        }
        // A budget that prunes nothing is still a pruning request: the convention is legal there (and idle).
        let c = PruneConfig { positions: Some(PositionPolicy::Contiguous), ..cfg(Method::Nuwa, Amount::Budget(576)) };
        assert_eq!(c.resolve(24, 24).expect("resolve").stage1, None);
    }

    #[test]
    fn full_budget_means_no_pruning_and_bad_requests_are_named() {
        for m in [Method::Nuwa, Method::FastV, Method::DivPrune, Method::Pool] {
            let r = cfg(m, Amount::Budget(576)).resolve(24, 24).expect("resolve");
            assert_eq!((r.stage1, r.stage2), (None, None), "{m}");
            let r = cfg(m, Amount::Budget(81)).resolve(9, 9).expect("resolve");
            assert_eq!((r.stage1, r.stage2), (None, None), "{m}");
        }
        // A preset prunes even on a grid smaller than its number: it is a share of the grid.
        let r = cfg(Method::Nuwa, Amount::Budget(128)).resolve(9, 9).expect("resolve");
        assert_eq!((r.stage1, r.stage2), (Some(32), Some(5)));
        let e = cfg(Method::Nuwa, Amount::Budget(100)).resolve(24, 24).expect_err("bad budget");
        assert!(e.to_string().contains("64, 128 and 192"), "{e}");
        let e = cfg(Method::Nuwa, Amount::All).resolve(24, 24).expect_err("no amount");
        assert!(e.to_string().contains("--budget"), "{e}");
        let e = "fastest".parse::<Method>().expect_err("unknown");
        assert!(e.to_string().contains("nuwa") && e.to_string().contains("fastest"), "{e}");
        let e = cfg(Method::Nuwa, Amount::Keep { keep1: 10, keep2: 20 }).resolve(24, 24).expect_err("keep2 > keep1");
        assert!(e.to_string().contains("--keep2"), "{e}");
        assert_eq!("divprune".parse::<Method>().expect("parse").to_string(), "divprune");
    }

    /// A 12x12 grid whose features, similarity and CLS metric are distinct and deterministic.
    fn tokens_12x12() -> VisionTokens {
        let n = 144;
        let f = Array2::from_shape_fn((n, 8), |(i, d)| ((i * 7 + d * 13) % 17) as f32 / 17.0 - 0.4);
        let metric = (0..n).map(|i| ((i * 37) % 101) as f32 / 101.0 + 0.01).collect();
        VisionTokens { features: f.clone(), cls_attention: Some(metric), similarity: f, grid_h: 12, grid_w: 12 }
    }

    #[test]
    fn ablation_options_change_only_what_they_name() {
        let t = tokens_12x12();
        let run = |c: &PruneConfig| {
            let r = c.resolve(12, 12).expect("resolve");
            (r, c.stage1(&r, &t).expect("stage 1"))
        };
        // Nüwa with pillar quantile 0: the same anchors, every one a pillar, features untouched.
        let published = cfg(Method::Nuwa, Amount::Budget(64));
        let (r, a) = run(&published);
        let flags = a.pillar.clone().expect("flags");
        assert!(flags.iter().any(|p| !p) && flags.iter().any(|p| *p), "published: pillars and collectors");
        let (r0, b) = run(&PruneConfig { pillar_quantile: Some(0.0), ..published.clone() });
        assert_eq!((r0.stage1, r0.stage2), (r.stage1, r.stage2));
        assert_eq!(b.kept, a.kept);
        assert!(b.pillar.expect("flags").iter().all(|p| *p));
        assert_eq!(b.tokens, t.features.select(Axis(0), &b.kept));
        // The aggregated rows differ from the raw features; the pillars of the published run do not.
        for (row, (&k, &pillar)) in a.kept.iter().zip(&flags).enumerate() {
            assert_eq!(a.tokens.row(row) == t.features.row(k), pillar, "row {row}");
        }
        // VisionZip without contextual tokens: the whole budget goes to dominant tokens, none merged.
        let vz = cfg(Method::VisionZip, Amount::Budget(64));
        let (rv, full) = run(&vz);
        let (_, dom) = run(&PruneConfig { contextual: Some(0), ..vz.clone() });
        assert_eq!(dom.kept.len(), rv.stage1.expect("keep"));
        assert_eq!(full.kept.len(), dom.kept.len());
        assert!(full.pillar.expect("flags").iter().any(|p| !p));
        assert!(dom.pillar.expect("flags").iter().all(|p| *p));
        // Options on the wrong method, out of range, or larger than the budget are refused by name.
        for (c, needle) in [
            (PruneConfig { pillar_quantile: Some(0.5), ..cfg(Method::FastV, Amount::Budget(64)) }, "Nüwa option"),
            (PruneConfig { pillar_quantile: Some(1.5), ..published.clone() }, "[0, 1]"),
            (PruneConfig { contextual: Some(1), ..cfg(Method::Nuwa, Amount::Budget(64)) }, "VisionZip option"),
            (PruneConfig { contextual: Some(999), ..vz }, "do not fit"),
            (PruneConfig { regions: Some(false), ..cfg(Method::Random, Amount::Budget(64)) }, "Nüwa options"),
            (PruneConfig { stage2_select: Some(Stage2Select::Random), ..cfg(Method::FastV, Amount::Budget(64)) }, "Nüwa options"),
        ] {
            let e = c.resolve(12, 12).expect_err("refused").to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn without_region_separation_the_anchors_are_the_global_top_k() {
        // The metric falls along the raster, so the global top-K is the first rows, whole regions at a time.
        let metric: Vec<f32> = (0..144).map(|i| 1.0 - i as f32 / 144.0).collect();
        let t = VisionTokens { cls_attention: Some(metric.clone()), ..tokens_12x12() };
        let run = |c: &PruneConfig| {
            let r = c.resolve(12, 12).expect("resolve");
            (r, c.stage1(&r, &t).expect("stage 1"))
        };
        let published = cfg(Method::Nuwa, Amount::Budget(128));
        let (r, separated) = run(&published);
        let (r0, global) = run(&PruneConfig { regions: Some(false), ..published.clone() });
        assert_eq!((r0.stage1, r0.stage2), (r.stage1, r.stage2), "the same counts");
        let keep = r.stage1.expect("keep");
        let mut want: Vec<usize> = (0..144).collect();
        want.sort_by(|&a, &b| metric[b].total_cmp(&metric[a]).then(a.cmp(&b)));
        want.truncate(keep);
        want.sort_unstable();
        assert_eq!(global.kept, want);
        assert_eq!(want, (0..keep).collect::<Vec<_>>());
        assert_ne!(separated.kept, want, "separation takes at most 2 cells of each 2x2 region");
        // Explicitly on: the published selection.
        assert_eq!(run(&PruneConfig { regions: Some(true), ..published }).1.kept, separated.kept);
    }

    #[test]
    fn random_stage2_draws_from_the_span_by_seed() {
        let r = cfg(Method::Nuwa, Amount::Budget(64)).resolve(24, 24).expect("resolve");
        let row: Vec<f32> = (0..130).map(|i| i as f32).collect();
        let span = 5..117; // 112 Stage-1 tokens
        let pick = |select, seed| {
            let c = PruneConfig { stage2_select: select, seed, ..cfg(Method::Nuwa, Amount::Budget(64)) };
            c.stage2(&r, &row, span.clone()).expect("stage 2").expect("prunes")
        };
        // Attention: the top 16 of the row, which grows along the span.
        assert_eq!(pick(None, 0), (96..112).collect::<Vec<_>>());
        assert_eq!(pick(Some(Stage2Select::Attention), 3), pick(None, 0));
        let a = pick(Some(Stage2Select::Random), 1);
        assert_eq!(a.len(), 16);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|&k| k < 112), "{a:?}");
        assert_eq!(a, pick(Some(Stage2Select::Random), 1), "seeded");
        assert_ne!(a, pick(Some(Stage2Select::Random), 2));
        assert_ne!(a, pick(None, 0));
        // The seed matters to the prefix check only when it is read.
        let base = PruneConfig { stage2_select: Some(Stage2Select::Random), ..cfg(Method::Nuwa, Amount::Budget(64)) };
        assert!(!base.same_selection(&PruneConfig { seed: 9, ..base.clone() }));
        let attention = cfg(Method::Nuwa, Amount::Budget(64));
        assert!(attention.same_selection(&PruneConfig { seed: 9, ..attention.clone() }));
        assert_eq!("random".parse::<Stage2Select>().expect("parse"), Stage2Select::Random);
        assert!("top".parse::<Stage2Select>().is_err());
    }
}
