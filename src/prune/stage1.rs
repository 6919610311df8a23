//! Nüwa Stage 1 (after the vision encoder): region separation, pillars, and proximity-weighted aggregation.
//!
//! Follows the official code (`CLIPVisionTower_Nuwa.forward` / `prune_vision_tokens`), not the paper text:
//! 1. Separation: the grid is cut into 2x2 regions; each region nominates its `top_n` patches by the CLS metric; the
//!    global top `keep` of those candidates survive, sorted in raster order. Regions on the right/bottom border of an
//!    odd grid are partial (clipped, not padded) and nominate `min(top_n, cells)` patches.
//! 2. Pillars: kept anchors whose metric is `>=` the `pillar_quantile` (0.55) quantile of the kept metrics, with
//!    `torch.quantile`'s linear interpolation, keep their features unchanged.
//! 3. Aggregation: every other kept anchor ("collector") `i` becomes
//!    `x_i + sum_{j != i} w_ij x_j / (sum_l w_il + 1e-8)` over ALL `N` patches, with
//!    `w_ij = ReLU(cos(s_i, s_j)) * P(i, j)`, `P = 1 - min(1, d / r)` (`d`: Euclidean grid distance), and the self
//!    weight `w_ii = ReLU(cos(s_i, s_i))` (1, or 0 for an all-zero similarity row) counted in the sum. Cosines use
//!    `F.normalize` semantics (norm clamped at 1e-12). Not a convex combination: the self weight is reset to 1.
//!
//! The radius: the official code uses `r^2 = 280` on its 24x24 grid, i.e. 280/1058 of the squared grid diagonal
//! (`1058 = 23^2 + 23^2`). [`default_radius_sq`] carries that ratio to any grid: `r^2 = 280/1058 * ((H-1)^2 + (W-1)^2)`.

use ndarray::{Array2, ArrayView2, Axis};

use super::{grid_tokens, normalize_row, require_keep, require_len, top_k_of};
use crate::error::{Error, Result};

/// Side of the square separation regions (2x2 in every variant of the official code).
pub const REGION: usize = 2;

/// The pillar quantile of the LLaVA-1.5 code (0.55).
pub const DEFAULT_PILLAR_QUANTILE: f64 = 0.55;

/// Stage-1 parameters for one grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage1Config {
    /// Candidates nominated per 2x2 region (1..=4).
    pub top_n: usize,
    /// Anchors kept (K); capped at the candidate count; `>= N` disables pruning.
    pub keep: usize,
    /// Quantile of the kept metrics at or above which an anchor is a pillar (0.55 in the official code).
    pub pillar_quantile: f64,
    /// Squared proximity radius in grid cells (280 on 24x24); see [`default_radius_sq`].
    pub proximity_radius_sq: f64,
}

impl Stage1Config {
    /// The official parameters for a grid: pillar quantile 0.55 and the radius from [`default_radius_sq`].
    pub fn new(grid_h: usize, grid_w: usize, top_n: usize, keep: usize) -> Self {
        Stage1Config {
            top_n,
            keep,
            pillar_quantile: DEFAULT_PILLAR_QUANTILE,
            proximity_radius_sq: default_radius_sq(grid_h, grid_w),
        }
    }
}

/// What Stage 1 keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage1Output {
    /// Raster indices of the kept anchors, sorted ascending (their original positions).
    pub kept: Vec<usize>,
    /// Per kept anchor: true for a pillar (features unchanged), false for a collector (aggregated).
    pub pillar: Vec<bool>,
    /// Tokens to feed the projector, one row per kept anchor, `[K, D]`.
    pub tokens: Array2<f32>,
}

/// The squared proximity radius for a grid: `280/1058 * ((H-1)^2 + (W-1)^2)` (exactly 280 on 24x24).
pub fn default_radius_sq(grid_h: usize, grid_w: usize) -> f64 {
    let dh = grid_h.saturating_sub(1) as f64;
    let dw = grid_w.saturating_sub(1) as f64;
    280.0 / 1058.0 * (dh * dh + dw * dw)
}

/// Number of Stage-1 candidates a grid yields: each region nominates `min(top_n, its cells)`.
pub fn candidate_count(grid_h: usize, grid_w: usize, top_n: usize) -> usize {
    let cells = |n: usize, r: usize| n.saturating_sub(r * REGION).min(REGION);
    let mut total = 0;
    for ry in 0..grid_h.div_ceil(REGION) {
        for rx in 0..grid_w.div_ceil(REGION) {
            total += top_n.min(cells(grid_h, ry) * cells(grid_w, rx));
        }
    }
    total
}

fn check_grid(metric_len: usize, grid_h: usize, grid_w: usize, top_n: usize) -> Result<()> {
    let n = grid_tokens("stage 1", grid_h, grid_w)?;
    if !(1..=REGION * REGION).contains(&top_n) {
        return Err(Error::InvalidRequest(format!(
            "stage 1: top_n per region must be 1..={} (got {top_n})",
            REGION * REGION
        )));
    }
    require_len("stage-1 metric", metric_len, n)
}

/// Region separation: each 2x2 region's `top_n` by metric, then the global top `keep`, sorted in raster order.
///
/// `keep` is capped at [`candidate_count`]. Ties follow the module's tie rule (lower raster index wins).
pub fn separate(metric: &[f32], grid_h: usize, grid_w: usize, top_n: usize, keep: usize) -> Result<Vec<usize>> {
    check_grid(metric.len(), grid_h, grid_w, top_n)?;
    require_keep("stage 1", keep)?;
    let mut candidates = Vec::with_capacity(candidate_count(grid_h, grid_w, top_n));
    let mut cells = Vec::with_capacity(REGION * REGION);
    for y0 in (0..grid_h).step_by(REGION) {
        for x0 in (0..grid_w).step_by(REGION) {
            cells.clear();
            for y in y0..(y0 + REGION).min(grid_h) {
                for x in x0..(x0 + REGION).min(grid_w) {
                    cells.push(y * grid_w + x);
                }
            }
            candidates.extend(top_k_of(metric, cells.clone(), top_n));
        }
    }
    let mut kept = top_k_of(metric, candidates, keep);
    kept.sort_unstable();
    Ok(kept)
}

/// `torch.quantile(values, q)` with linear interpolation, computed in f64 (NaN if empty or any value is NaN).
pub fn quantile_linear(values: &[f32], q: f64) -> f64 {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let mut sorted: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    sorted.sort_by(f64::total_cmp);
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let below = rank.floor();
    let weight = rank - below;
    let lo = sorted[below as usize];
    let hi = sorted[(rank.ceil() as usize).min(sorted.len() - 1)];
    // torch.lerp's two-sided formula, so that weight 0 and 1 return the end points exactly.
    if weight < 0.5 {
        lo + weight * (hi - lo)
    } else {
        hi - (hi - lo) * (1.0 - weight)
    }
}

/// Pillar flags for kept anchors: `metric[k] >= quantile_linear(kept metrics, q)` (compared in f64); `q` in [0, 1].
pub fn pillar_flags(metric: &[f32], kept: &[usize], q: f64) -> Result<Vec<bool>> {
    if !(0.0..=1.0).contains(&q) {
        return Err(Error::InvalidRequest(format!("stage 1: pillar quantile must be in [0, 1] (got {q})")));
    }
    let scores = kept
        .iter()
        .map(|&k| {
            metric.get(k).copied().ok_or_else(|| Error::InvalidRequest(format!("kept index {k} is out of range")))
        })
        .collect::<Result<Vec<f32>>>()?;
    let threshold = quantile_linear(&scores, q);
    Ok(scores.iter().map(|&s| f64::from(s) >= threshold).collect())
}

/// Proximity by grid offset: entry `dy * grid_w + dx` is `1 - min(1, sqrt(dy^2 + dx^2) / r)`, `r = sqrt(radius_sq)`.
///
/// A radius of 0 gives 1 at offset (0, 0) and 0 elsewhere.
pub fn proximity(grid_h: usize, grid_w: usize, radius_sq: f64) -> Vec<f32> {
    let r = radius_sq.max(0.0).sqrt();
    let mut table = Vec::with_capacity(grid_h * grid_w);
    for dy in 0..grid_h {
        for dx in 0..grid_w {
            let d = ((dy * dy + dx * dx) as f64).sqrt();
            let p = if r > 0.0 {
                1.0 - (d / r).min(1.0)
            } else if d == 0.0 {
                1.0
            } else {
                0.0
            };
            table.push(p as f32);
        }
    }
    table
}

/// Aggregates the collectors (kept anchors whose `pillar` flag is false); pillars are copied unchanged.
///
/// `similarity` `[N, Ds]` (not normalised) and `features` `[N, D]` cover all `N = grid_h * grid_w` patches.
/// Cost O(collectors * N * (Ds + D)) time (two GEMMs) and O(N * Ds + collectors * N) extra memory.
pub fn aggregate(
    kept: &[usize],
    pillar: &[bool],
    similarity: ArrayView2<'_, f32>,
    features: ArrayView2<'_, f32>,
    grid_h: usize,
    grid_w: usize,
    radius_sq: f64,
) -> Result<Array2<f32>> {
    let n = grid_tokens("stage-1 aggregation", grid_h, grid_w)?;
    require_len("stage-1 similarity", similarity.nrows(), n)?;
    require_len("stage-1 features", features.nrows(), n)?;
    require_len("stage-1 pillar flags", pillar.len(), kept.len())?;
    if let Some(&bad) = kept.iter().find(|&&k| k >= n) {
        return Err(Error::InvalidRequest(format!("kept index {bad} is outside the {n}-patch grid")));
    }
    let (ds, d) = (similarity.ncols(), features.ncols());
    let sim = similarity.as_standard_layout();
    let feat = features.as_standard_layout();
    let (sim, x) = match (sim.as_slice(), feat.as_slice()) {
        (Some(s), Some(f)) => (s, f),
        _ => return Err(Error::InvalidRequest("stage 1: similarity/features are not contiguous".into())),
    };

    let mut out = Array2::<f32>::zeros((kept.len(), d));
    for (r, &k) in kept.iter().enumerate() {
        out.row_mut(r).iter_mut().zip(&x[k * d..(k + 1) * d]).for_each(|(o, &v)| *o = v);
    }
    let collectors: Vec<(usize, usize)> =
        kept.iter().zip(pillar).enumerate().filter(|(_, (_, &p))| !p).map(|(r, (&k, _))| (r, k)).collect();
    if collectors.is_empty() || ds == 0 {
        // No collector, or no similarity dimension (all cosines 0): nothing changes.
        return Ok(out);
    }

    // Two GEMMs (matrixmultiply picks AVX/FMA kernels at run time): cosines of the collectors against every
    // patch, [C, N], then the weighted feature sums, [C, D]. Nothing of size N x N is allocated.
    let mut shat = Array2::<f32>::zeros((n, ds));
    for (mut dst, src) in shat.rows_mut().into_iter().zip(sim.chunks_exact(ds)) {
        if let Some(dst) = dst.as_slice_mut() {
            normalize_row(src, dst);
        }
    }
    let picked = shat.select(Axis(0), &collectors.iter().map(|&(_, k)| k).collect::<Vec<_>>());
    let mut weights = picked.dot(&shat.t());
    let prox = proximity(grid_h, grid_w, radius_sq);
    let mut sums = Vec::with_capacity(collectors.len());
    for (mut row, &(_, i)) in weights.rows_mut().into_iter().zip(&collectors) {
        let (yi, xi) = (i / grid_w, i % grid_w);
        let mut sum = 0.0f64;
        for (j, w) in row.iter_mut().enumerate() {
            let p = prox[yi.abs_diff(j / grid_w) * grid_w + xi.abs_diff(j % grid_w)];
            // ReLU; a NaN cosine (NaN similarity input) counts as 0.
            *w = if *w > 0.0 { *w * p } else { 0.0 };
            sum += f64::from(*w);
        }
        // The self weight is in the row sum but the self term is added with weight 1 below.
        row[i] = 0.0;
        sums.push(sum);
    }
    let mixed = weights.dot(&features);
    for ((&(r, _), m), &sum) in collectors.iter().zip(mixed.rows()).zip(&sums) {
        let inv = (1.0 / (sum + 1e-8)) as f32;
        out.row_mut(r).iter_mut().zip(m).for_each(|(o, &a)| *o += a * inv);
    }
    Ok(out)
}

/// Nüwa Stage 1: separation, pillars and aggregation in one call.
///
/// `metric` `[N]` is the CLS attention, `similarity` `[N, Ds]` the similarity features (not normalised), `features`
/// `[N, D]` the pre-projector features, `N = grid_h * grid_w` in raster order. `cfg.keep >= N` means no pruning: every
/// token is returned unchanged (all flagged as pillars), so a full budget is identical to running without pruning.
pub fn nuwa_stage1(
    metric: &[f32],
    similarity: ArrayView2<'_, f32>,
    features: ArrayView2<'_, f32>,
    grid_h: usize,
    grid_w: usize,
    cfg: &Stage1Config,
) -> Result<Stage1Output> {
    check_grid(metric.len(), grid_h, grid_w, cfg.top_n)?;
    require_keep("stage 1", cfg.keep)?;
    if !(0.0..=1.0).contains(&cfg.pillar_quantile) {
        return Err(Error::InvalidRequest(format!(
            "stage 1: pillar quantile must be in [0, 1] (got {})",
            cfg.pillar_quantile
        )));
    }
    let n = grid_h * grid_w; // checked by check_grid
    require_len("stage-1 similarity", similarity.nrows(), n)?;
    require_len("stage-1 features", features.nrows(), n)?;
    if cfg.keep >= n {
        return Ok(Stage1Output { kept: (0..n).collect(), pillar: vec![true; n], tokens: features.to_owned() });
    }
    let kept = separate(metric, grid_h, grid_w, cfg.top_n, cfg.keep)?;
    let pillar = pillar_flags(metric, &kept, cfg.pillar_quantile)?;
    let tokens = aggregate(&kept, &pillar, similarity, features, grid_h, grid_w, cfg.proximity_radius_sq)?;
    Ok(Stage1Output { kept, pillar, tokens })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use proptest::prelude::*;

    /// Straightforward O(K*N*D) re-statement of the official tensor code, in f64.
    fn naive(
        kept: &[usize],
        pillar: &[bool],
        s: &Array2<f32>,
        x: &Array2<f32>,
        h: usize,
        w: usize,
        r2: f64,
    ) -> Array2<f64> {
        let n = h * w;
        let norm = |i: usize| s.row(i).iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt().max(1e-12);
        let mut out = Array2::<f64>::zeros((kept.len(), x.ncols()));
        for (r, &i) in kept.iter().enumerate() {
            let mut wts = vec![0.0f64; n];
            for (j, wt) in wts.iter_mut().enumerate() {
                if pillar[r] && j != i {
                    continue;
                }
                let c: f64 = s.row(i).iter().zip(s.row(j)).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>()
                    / (norm(i) * norm(j));
                let (dy, dx) = ((i / w) as f64 - (j / w) as f64, (i % w) as f64 - (j % w) as f64);
                let p = 1.0 - ((dy * dy + dx * dx).sqrt() / r2.sqrt()).min(1.0);
                *wt = c.max(0.0) * p;
            }
            let sum: f64 = wts.iter().sum::<f64>() + 1e-8;
            wts.iter_mut().for_each(|v| *v /= sum);
            wts[i] = 1.0;
            for (j, &wj) in wts.iter().enumerate() {
                for k in 0..x.ncols() {
                    out[[r, k]] += wj * f64::from(x[[j, k]]);
                }
            }
        }
        out
    }

    fn lcg(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn radius_rule_gives_280_on_24x24() {
        assert!((default_radius_sq(24, 24) - 280.0).abs() < 1e-9);
        assert_eq!(default_radius_sq(1, 1), 0.0);
    }

    #[test]
    fn candidate_counts() {
        assert_eq!(candidate_count(24, 24, 1), 144);
        assert_eq!(candidate_count(24, 24, 3), 432);
        assert_eq!(candidate_count(7, 9, 4), 63);
        assert_eq!(candidate_count(7, 9, 2), 12 * 2 + 4 * 2 + 3 * 2 + 1);
        assert_eq!(candidate_count(1, 1, 3), 1);
    }

    #[test]
    fn grids_too_large_or_out_of_range_quantiles_are_refused() {
        // Before, 2^33 x 2^31 wrapped in release and `separate` looped over 2^62 regions; 2^32 x 2^32 wrapped to
        // an empty grid that Stage 1 "kept" entirely.
        let z = Array2::<f32>::zeros((0, 2));
        let e = separate(&[], 1 << 33, 1 << 31, 1, 1).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        let e = nuwa_stage1(&[], z.view(), z.view(), 1 << 32, 1 << 32, &Stage1Config::new(4, 4, 1, 3)).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let e = aggregate(&[], &[], z.view(), z.view(), 1 << 32, 1 << 32, 280.0).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        // pillar_flags used to clamp -1 to 0 (every anchor a pillar) and return no pillars for NaN.
        for q in [f64::NAN, -1.0, 1.5] {
            assert!(pillar_flags(&[1.0, 2.0], &[0, 1], q).is_err(), "{q}");
        }
        assert_eq!(pillar_flags(&[1.0, 2.0], &[0, 1], 0.0).unwrap(), vec![true, true]);
    }

    #[test]
    fn quantile_matches_torch() {
        // torch.quantile(torch.tensor([1.,2.,3.,4.]), 0.55) == 2.65
        assert!((quantile_linear(&[4.0, 1.0, 3.0, 2.0], 0.55) - 2.65).abs() < 1e-12);
        assert_eq!(quantile_linear(&[5.0], 0.55), 5.0);
        assert_eq!(quantile_linear(&[1.0, 2.0, 3.0], 0.5), 2.0);
        assert!(quantile_linear(&[], 0.5).is_nan());
    }

    #[test]
    fn separation_picks_region_winners() {
        // 4x4 grid, regions {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}.
        let m: Vec<f32> = vec![1., 9., 2., 2., 3., 4., 2., 2., 0., 0., 5., 6., 0., 1., 7., 8.];
        assert_eq!(separate(&m, 4, 4, 1, 2).unwrap(), vec![1, 15]);
        // Region 2 is all ties: lowest index (2) wins; region 3's winner 9 (index 13 value 1) loses globally.
        assert_eq!(separate(&m, 4, 4, 1, 4).unwrap(), vec![1, 2, 13, 15]);
        assert_eq!(separate(&m, 4, 4, 2, 100).unwrap().len(), 8);
        assert!(separate(&m, 4, 4, 5, 2).is_err());
        assert!(separate(&m, 4, 4, 1, 0).is_err());
        assert!(separate(&m, 3, 4, 1, 2).is_err());
    }

    #[test]
    fn aggregation_matches_naive() {
        let (h, w, d) = (5, 7, 19);
        let n = h * w;
        let metric = lcg(1, n);
        let s = Array2::from_shape_vec((n, d), lcg(2, n * d)).unwrap();
        let x = Array2::from_shape_vec((n, d), lcg(3, n * d)).unwrap();
        let cfg = Stage1Config::new(h, w, 2, 14);
        let out = nuwa_stage1(&metric, s.view(), x.view(), h, w, &cfg).unwrap();
        assert_eq!(out.kept.len(), 14);
        let want = naive(&out.kept, &out.pillar, &s, &x, h, w, cfg.proximity_radius_sq);
        for (a, b) in out.tokens.iter().zip(want.iter()) {
            assert!((f64::from(*a) - b).abs() < 1e-5, "{a} vs {b}");
        }
        for (r, &k) in out.kept.iter().enumerate() {
            if out.pillar[r] {
                assert_eq!(out.tokens.row(r), x.row(k));
            }
        }
    }

    #[test]
    fn full_budget_is_identity() {
        let (h, w, d) = (3, 3, 4);
        let x = Array2::from_shape_vec((9, d), lcg(5, 9 * d)).unwrap();
        let out = nuwa_stage1(&lcg(4, 9), x.view(), x.view(), h, w, &Stage1Config::new(h, w, 1, 9)).unwrap();
        assert_eq!(out.kept, (0..9).collect::<Vec<_>>());
        assert_eq!(out.tokens, x);
    }

    #[test]
    fn shape_errors_are_reported() {
        let x = Array2::<f32>::zeros((9, 4));
        let cfg = Stage1Config::new(3, 3, 1, 2);
        assert!(nuwa_stage1(&[0.0; 8], x.view(), x.view(), 3, 3, &cfg).is_err());
        assert!(nuwa_stage1(&[0.0; 9], x.view(), x.slice(ndarray::s![..8, ..]), 3, 3, &cfg).is_err());
        let bad = Stage1Config { pillar_quantile: 1.5, ..cfg };
        assert!(nuwa_stage1(&[0.0; 9], x.view(), x.view(), 3, 3, &bad).is_err());
    }

    /// Quick timing on the real size (576 patches x 1024 dims); run with `--ignored --nocapture` in release.
    #[test]
    #[ignore]
    fn time_stage1_576x1024() {
        let (h, w, d) = (24, 24, 1024);
        let n = h * w;
        let metric = lcg(1, n);
        let s = Array2::from_shape_vec((n, d), lcg(2, n * d)).unwrap().mapv(|v| v + 0.3);
        let x = Array2::from_shape_vec((n, d), lcg(3, n * d)).unwrap();
        for (top_n, keep) in [(1, 112), (2, 224), (3, 336)] {
            let cfg = Stage1Config::new(h, w, top_n, keep);
            let _ = nuwa_stage1(&metric, s.view(), x.view(), h, w, &cfg).unwrap();
            let reps = 10;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(nuwa_stage1(&metric, s.view(), x.view(), h, w, &cfg).unwrap());
            }
            let total = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                let kept = separate(&metric, h, w, top_n, keep).unwrap();
                std::hint::black_box(pillar_flags(&metric, &kept, 0.55).unwrap());
            }
            let select = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            println!("stage1 K={keep}: {total:.2} ms (selection {select:.3} ms)");
        }
    }

    proptest! {
        #[test]
        fn separation_properties(h in 1usize..9, w in 1usize..9, top_n in 1usize..5, keep in 1usize..90,
                                 vals in proptest::collection::vec(0u8..6, 64)) {
            let n = h * w;
            let metric: Vec<f32> = vals[..n].iter().map(|&v| f32::from(v)).collect();
            let kept = separate(&metric, h, w, top_n, keep).unwrap();
            prop_assert!(kept.windows(2).all(|p| p[0] < p[1]));
            prop_assert!(kept.iter().all(|&k| k < n));
            prop_assert_eq!(kept.len(), keep.min(candidate_count(h, w, top_n)));
            for &k in &kept {
                // k must be among its region's top_n under the tie rule.
                let (y0, x0) = ((k / w) / REGION * REGION, (k % w) / REGION * REGION);
                let better = (y0..(y0 + REGION).min(h))
                    .flat_map(|y| (x0..(x0 + REGION).min(w)).map(move |x| y * w + x))
                    .filter(|&c| metric[c] > metric[k] || (metric[c] == metric[k] && c < k))
                    .count();
                prop_assert!(better < top_n);
            }
            let pillars = pillar_flags(&metric, &kept, 0.55).unwrap();
            let th = quantile_linear(&kept.iter().map(|&k| metric[k]).collect::<Vec<_>>(), 0.55);
            prop_assert_eq!(pillars.iter().filter(|&&p| p).count(),
                            kept.iter().filter(|&&k| f64::from(metric[k]) >= th).count());
            prop_assert!(pillars.iter().any(|&p| p));
        }
    }
}
