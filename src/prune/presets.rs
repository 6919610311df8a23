//! Budget presets (`--budget 64|128|192`) and explicit keep counts (`--keep1 N --keep2 M`).
//!
//! The official LLaVA-1.5 numbers (576 patches, 32 decoder layers, split at 16):
//!
//! | budget | top_n | Stage-1 keep | Stage-2 keep |
//! |-------:|------:|-------------:|-------------:|
//! |     64 |     1 |          112 |           16 |
//! |    128 |     2 |          224 |           32 |
//! |    192 |     3 |          336 |           48 |
//!
//! Carried to another grid of `N` patches: both keep counts scale by `N / 576` (rounded half away from zero, at least
//! 1), `top_n` is unchanged, and the Stage-1 keep is capped at the candidate count (`regions * top_n`). The decoder's
//! layer count and split come from the manifest and do not change the keep counts; [`PrunePlan::average_tokens`]
//! reports the resulting average over layers ("budget 64" is `(112*16 + 16*16)/32`).
//! Explicit keep counts pick the smallest `top_n` (1..=4) whose candidates cover `keep1` (`ceil(keep1 / regions)` on
//! grids of whole 2x2 regions), which reproduces the presets.

use std::fmt;
use std::str::FromStr;

use super::stage1::{candidate_count, Stage1Config, REGION};
use crate::error::{Error, Result};

/// Patch count the official presets were tuned on (24x24).
pub const REFERENCE_TOKENS: usize = 576;

/// The budgets accepted by `--budget`.
pub const VALID_BUDGETS: [usize; 3] = [64, 128, 192];

/// A named Nüwa budget: the average number of visual tokens per decoder layer on LLaVA-1.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    /// 64 tokens: top_n 1, keep 112 then 16.
    B64,
    /// 128 tokens: top_n 2, keep 224 then 32.
    B128,
    /// 192 tokens: top_n 3, keep 336 then 48.
    B192,
}

impl Budget {
    /// The budget named by a token count, or an error listing the valid ones.
    pub fn from_tokens(tokens: usize) -> Result<Self> {
        match tokens {
            64 => Ok(Budget::B64),
            128 => Ok(Budget::B128),
            192 => Ok(Budget::B192),
            other => Err(Error::InvalidRequest(format!(
                "invalid budget {other}: valid budgets are 64, 128 and 192 (or give explicit keep counts with \
                 --keep1 N --keep2 M)"
            ))),
        }
    }

    /// The budget's token count (64, 128 or 192).
    pub fn tokens(self) -> usize {
        match self {
            Budget::B64 => 64,
            Budget::B128 => 128,
            Budget::B192 => 192,
        }
    }

    /// `(top_n, stage-1 keep, stage-2 keep)` as published for 576 patches.
    pub fn reference(self) -> (usize, usize, usize) {
        match self {
            Budget::B64 => (1, 112, 16),
            Budget::B128 => (2, 224, 32),
            Budget::B192 => (3, 336, 48),
        }
    }

    /// The plan for a `grid_h x grid_w` patch grid (the published numbers on 24x24, scaled elsewhere).
    pub fn plan(self, grid_h: usize, grid_w: usize) -> Result<PrunePlan> {
        let n = check_grid(grid_h, grid_w)?;
        let (top_n, k1, k2) = self.reference();
        let scale = |k: usize| ((k * n) as f64 / REFERENCE_TOKENS as f64).round().max(1.0) as usize;
        let keep1 = scale(k1).min(candidate_count(grid_h, grid_w, top_n));
        let keep2 = scale(k2).min(keep1);
        Ok(PrunePlan { top_n, keep1, keep2 })
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.tokens())
    }
}

impl FromStr for Budget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let n = s
            .trim()
            .parse::<usize>()
            .map_err(|_| Error::InvalidRequest(format!("invalid budget {s:?}: valid budgets are 64, 128 and 192")))?;
        Budget::from_tokens(n)
    }
}

/// Resolved keep counts for both stages on one grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunePlan {
    /// Candidates per 2x2 region in Stage 1.
    pub top_n: usize,
    /// Tokens kept by Stage 1 (after the vision encoder); `>= N` means no Stage-1 pruning.
    pub keep1: usize,
    /// Tokens kept by Stage 2 (from the split layer on); `>= keep1` means no Stage-2 pruning.
    pub keep2: usize,
}

impl PrunePlan {
    /// A plan from explicit keep counts; `top_n` is the smallest (1..=4) whose candidates cover `keep1`.
    pub fn explicit(grid_h: usize, grid_w: usize, keep1: usize, keep2: usize) -> Result<Self> {
        let n = check_grid(grid_h, grid_w)?;
        if keep1 == 0 || keep2 == 0 {
            return Err(Error::InvalidRequest(format!(
                "keep counts must be at least 1 (got --keep1 {keep1} --keep2 {keep2})"
            )));
        }
        if keep2 > keep1 {
            return Err(Error::InvalidRequest(format!(
                "--keep2 {keep2} exceeds --keep1 {keep1}: Stage 2 selects among the Stage-1 tokens"
            )));
        }
        // `ceil(keep1 / regions)` assumes every 2x2 region is full; the partial regions of an odd grid offer fewer
        // candidates, and Stage 1 would keep fewer than asked (5x7 at 30 kept 29).
        let top_n = (1..=REGION * REGION)
            .find(|&t| candidate_count(grid_h, grid_w, t) >= keep1.min(n))
            .unwrap_or(REGION * REGION);
        Ok(PrunePlan { top_n, keep1, keep2 })
    }

    /// The Stage-1 configuration of this plan for a grid (official pillar quantile and radius rule).
    pub fn stage1_config(&self, grid_h: usize, grid_w: usize) -> Stage1Config {
        Stage1Config::new(grid_h, grid_w, self.top_n, self.keep1)
    }

    /// Visual tokens the decoder sees on average per layer with `split` of `layers` layers before Stage 2.
    pub fn average_tokens(&self, n_tokens: usize, split: usize, layers: usize) -> f64 {
        if layers == 0 {
            return 0.0;
        }
        let k1 = self.keep1.min(n_tokens);
        let k2 = self.keep2.min(k1);
        let split = split.min(layers);
        (k1 * split + k2 * (layers - split)) as f64 / layers as f64
    }
}

fn check_grid(grid_h: usize, grid_w: usize) -> Result<usize> {
    super::grid_tokens("pruning plan", grid_h, grid_w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::stage1::separate;

    #[test]
    fn explicit_counts_are_kept_exactly_on_odd_grids() {
        // Before, top_n = ceil(keep1 / regions) assumed full 2x2 regions: 5x7 at 30 kept 29, 3x3 at 8 kept 7.
        for h in 1..=11 {
            for w in 1..=11 {
                let n = h * w;
                let metric: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32).collect();
                for keep1 in 1..n {
                    let plan = PrunePlan::explicit(h, w, keep1, 1).unwrap();
                    assert_eq!(separate(&metric, h, w, plan.top_n, keep1).unwrap().len(), keep1, "{h}x{w} keep {keep1}");
                }
            }
        }
        // Grids of whole regions keep ceil(keep1 / regions), which reproduces the presets.
        assert_eq!([112, 224, 336].map(|k| PrunePlan::explicit(24, 24, k, 16).unwrap().top_n), [1, 2, 3]);
    }

    #[test]
    fn grids_too_large_are_refused_not_wrapped() {
        for (h, w) in [(1usize << 32, 1usize << 32), (5000, 5000)] {
            let e = Budget::B64.plan(h, w).unwrap_err().to_string();
            assert!(e.contains("more than"), "{e}");
            assert!(PrunePlan::explicit(h, w, 10, 2).is_err());
        }
    }

    #[test]
    fn presets_on_24x24_are_the_published_numbers() {
        for b in [Budget::B64, Budget::B128, Budget::B192] {
            let (top_n, k1, k2) = b.reference();
            assert_eq!(b.plan(24, 24).unwrap(), PrunePlan { top_n, keep1: k1, keep2: k2 });
            assert_eq!(PrunePlan::explicit(24, 24, k1, k2).unwrap(), PrunePlan { top_n, keep1: k1, keep2: k2 });
            let avg = b.plan(24, 24).unwrap().average_tokens(576, 16, 32);
            assert_eq!(avg, b.tokens() as f64);
        }
    }

    #[test]
    fn presets_scale_to_other_grids() {
        assert_eq!(Budget::B64.plan(8, 8).unwrap(), PrunePlan { top_n: 1, keep1: 12, keep2: 2 });
        assert_eq!(Budget::B192.plan(8, 8).unwrap(), PrunePlan { top_n: 3, keep1: 37, keep2: 5 });
        assert_eq!(Budget::B64.plan(1, 1).unwrap(), PrunePlan { top_n: 1, keep1: 1, keep2: 1 });
        assert_eq!(Budget::B128.plan(3, 3).unwrap(), PrunePlan { top_n: 2, keep1: 4, keep2: 1 });
    }

    #[test]
    fn invalid_budgets_list_the_valid_ones() {
        let e = Budget::from_tokens(100).unwrap_err().to_string();
        assert!(e.contains("64, 128 and 192"), "{e}");
        assert!("abc".parse::<Budget>().is_err());
        assert_eq!("128".parse::<Budget>().unwrap(), Budget::B128);
        assert!(PrunePlan::explicit(24, 24, 0, 1).is_err());
        assert!(PrunePlan::explicit(24, 24, 10, 20).is_err());
        assert_eq!(PrunePlan::explicit(24, 24, 600, 50).unwrap().top_n, 4);
    }
}
