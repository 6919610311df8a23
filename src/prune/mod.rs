//! Visual token pruning as pure functions: Nüwa's two stages, their budget presets, and the baseline methods.
//!
//! Nothing here touches ONNX Runtime: every function takes the signals a stage produced (CLS attention, similarity
//! features, an attention row) and returns indices, flags and tokens. The pipeline gathers and feeds them on.
//!
//! Conventions shared by every function in this module:
//! - Patch indices are raster (row-major) indices into the `grid_h x grid_w` patch grid, `0..N`.
//! - Every returned index list is sorted ascending and free of duplicates, so kept tokens stay in image order.
//! - **Tie rule** (`torch.topk` leaves ties unspecified): the higher score wins; equal scores go to the LOWER index.
//!   NaN scores rank below every number, and `-0.0 == 0.0`. The Python reference (`onnx/reference/`) uses the same
//!   rule, so kept indices match it exactly.
//! - A keep count at or above the number of available tokens keeps all of them (never an error); a keep count of 0,
//!   an unknown budget or a shape mismatch is an error.

mod baselines;
mod method;
mod presets;
mod stage1;
mod stage2;

pub use baselines::{
    dart, divprune, fastv, pool, pool_grid, random, visionzip, visionzip_split, PooledTokens, VisionZipOutput,
};
pub use method::{Amount, Method, PositionPolicy, PruneConfig, Resolved, Stage1Result, Stage2Select, METHOD_NAMES};
pub use presets::{Budget, PrunePlan, REFERENCE_TOKENS, VALID_BUDGETS};
pub use stage1::{
    aggregate, candidate_count, default_radius_sq, nuwa_stage1, pillar_flags, proximity, quantile_linear, separate,
    Stage1Config, Stage1Output, DEFAULT_PILLAR_QUANTILE, REGION,
};
pub use stage2::nuwa_stage2;

use std::cmp::Ordering;

use crate::error::{Error, Result};

/// Ranks scores under the module's tie rule: NaN becomes -inf so it sorts last, and `-0.0` compares equal to `0.0`.
fn rank_key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Orders `(index, score)` by score descending, then index ascending (the module's tie rule).
fn by_score_desc(scores: &[f32], a: usize, b: usize) -> Ordering {
    let (sa, sb) = (rank_key(scores[a]), rank_key(scores[b]));
    sb.partial_cmp(&sa).unwrap_or(Ordering::Equal).then(a.cmp(&b))
}

/// The `k` best of `candidates` by `scores` under the tie rule, in rank order (best first); `k` is capped.
fn top_k_of(scores: &[f32], mut candidates: Vec<usize>, k: usize) -> Vec<usize> {
    let k = k.min(candidates.len());
    if k == 0 {
        return Vec::new();
    }
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, |&a, &b| by_score_desc(scores, a, b));
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(|&a, &b| by_score_desc(scores, a, b));
    candidates
}

/// The indices of the `k` highest `scores` under the tie rule, sorted ascending; `k` is capped at `scores.len()`.
pub fn top_k_sorted(scores: &[f32], k: usize) -> Vec<usize> {
    let mut kept = top_k_of(scores, (0..scores.len()).collect(), k);
    kept.sort_unstable();
    kept
}

/// The most patches a grid may have (4096 x 4096): far above any vision tower's, and small enough that the
/// per-patch tables and loops stay bounded whatever dimensions a library (or FFI) caller passes.
pub const MAX_GRID_TOKENS: usize = 1 << 24;

/// `grid_h * grid_w`, refused when a side is 0 or the product exceeds [`MAX_GRID_TOKENS`] (or overflows).
fn grid_tokens(what: &str, grid_h: usize, grid_w: usize) -> Result<usize> {
    match grid_h.checked_mul(grid_w) {
        Some(n) if n > 0 && n <= MAX_GRID_TOKENS => Ok(n),
        Some(0) => Err(Error::InvalidRequest(format!("{what}: empty patch grid {grid_h}x{grid_w}"))),
        _ => Err(Error::InvalidRequest(format!(
            "{what}: patch grid {grid_h}x{grid_w} has more than {MAX_GRID_TOKENS} patches"
        ))),
    }
}

/// Fails with [`Error::InvalidRequest`] when a keep count is zero.
fn require_keep(what: &str, keep: usize) -> Result<()> {
    if keep == 0 {
        return Err(Error::InvalidRequest(format!("{what} must keep at least one token (got 0)")));
    }
    Ok(())
}

/// Fails with [`Error::Shape`] unless `found == expected`.
fn require_len(what: &str, found: usize, expected: usize) -> Result<()> {
    if found != expected {
        return Err(Error::Shape {
            what: what.to_string(),
            message: format!("expected {expected} rows/elements, found {found}"),
        });
    }
    Ok(())
}

/// L2-normalises a row the way `F.normalize` does: `x / max(||x||, 1e-12)`, the norm accumulated in f64.
fn normalize_row(row: &[f32], out: &mut [f32]) {
    let norm = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt().max(1e-12);
    let inv = 1.0 / norm;
    for (o, &v) in out.iter_mut().zip(row) {
        *o = (f64::from(v) * inv) as f32;
    }
}

/// Dot product of two equal-length rows with 16 independent lanes (vectorises without target flags).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let mut s = 0.0f32;
    for v in acc {
        s += v;
    }
    s + tail
}

/// `acc += w * x`, elementwise.
fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        let s = [1.0, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(top_k_sorted(&s, 2), vec![1, 2]);
        assert_eq!(top_k_of(&s, (0..5).collect(), 4), vec![1, 2, 4, 3]);
        assert_eq!(top_k_sorted(&s, 9), vec![0, 1, 2, 3, 4]);
        assert!(top_k_sorted(&s, 0).is_empty());
    }

    #[test]
    fn nan_ranks_last_and_signed_zeros_tie() {
        let s = [f32::NAN, -0.0, 0.0, -1.0];
        assert_eq!(top_k_sorted(&s, 1), vec![1]);
        assert_eq!(top_k_sorted(&s, 3), vec![1, 2, 3]);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32).sin()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }
}
