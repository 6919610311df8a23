//! Baseline pruning methods as pure selection functions (FastV, VisionZip, DivPrune, DART, pooling, random).
//!
//! Each follows its official code where our signals allow it; the adaptations are noted on each function.
//! All index lists are raster indices (or span-relative for FastV), sorted ascending, under the module's tie rule.

use std::ops::Range;

use ndarray::{Array2, ArrayView2};

use super::{axpy, by_score_desc, dot, normalize_row, require_keep, top_k_of, top_k_sorted};
use crate::error::{Error, Result};

/// FastV: the top-`keep` image positions by the head-mean attention of the last token at an early layer.
///
/// The selection is the same as [`super::nuwa_stage2`]; FastV differs in where the row comes from (layer 2, "K=2")
/// and in keeping a ratio of the span (pass `keep = span_len * (1 - R)`). Indices are relative to the span start.
pub fn fastv(attention_row: &[f32], image_span: Range<usize>, keep: usize) -> Result<Vec<usize>> {
    super::nuwa_stage2(attention_row, image_span, keep)
}

/// VisionZip's published split of a token budget into (dominant, contextual): 54+10 at 64, 108+20, 162+30.
pub fn visionzip_split(total: usize) -> (usize, usize) {
    if total <= 1 {
        return (total, 0);
    }
    let contextual = ((total * 10) as f64 / 64.0).round().max(1.0) as usize;
    (total - contextual, contextual)
}

/// What VisionZip keeps: dominant patches, then one merged token per contextual target.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionZipOutput {
    /// Raster indices of the dominant patches, sorted ascending.
    pub dominant: Vec<usize>,
    /// Raster index of each contextual target (the patch each merged token was built on), ascending.
    pub targets: Vec<usize>,
    /// Dominant features followed by contextual tokens, `[dominant + targets, D]`.
    pub tokens: Array2<f32>,
}

/// VisionZip: top-`dominant` patches by CLS `metric`, plus `contextual` tokens merged from the rest.
///
/// Procedure of the official code: the remaining patches (raster order) are sampled uniformly as targets
/// (`step = max(1, m / contextual)`, the first `contextual` of `0, step, 2*step, ...`); every other remaining patch
/// joins its most similar target (dot product of L2-normalised `similarity` rows; first target on ties); a
/// contextual token is `target features + mean of its members' features`. Adaptations: the official code compares
/// layer -2 attention keys and keeps the CLS token among the dominant ones; we have no keys and no CLS, so
/// `similarity` stands in for the keys and all `dominant` slots go to patches. VisionZip gives the result contiguous
/// positions (dominant first, then contextual); `targets` lets a caller use original positions instead.
pub fn visionzip(
    metric: &[f32],
    similarity: ArrayView2<'_, f32>,
    features: ArrayView2<'_, f32>,
    dominant: usize,
    contextual: usize,
) -> Result<VisionZipOutput> {
    let n = metric.len();
    super::require_len("visionzip similarity", similarity.nrows(), n)?;
    super::require_len("visionzip features", features.nrows(), n)?;
    require_keep("visionzip", dominant + contextual)?;
    let d = features.ncols();
    let dom = top_k_sorted(metric, dominant);
    let mut is_dom = vec![false; n];
    dom.iter().for_each(|&i| is_dom[i] = true);
    let rest: Vec<usize> = (0..n).filter(|&i| !is_dom[i]).collect();
    let m = rest.len();
    let (mut targets, mut merged) = (Vec::new(), Vec::new());
    if contextual > 0 && m > 0 {
        let step = (m / contextual).max(1);
        let local: Vec<usize> = (0..m).step_by(step).take(contextual).collect();
        targets = local.iter().map(|&t| rest[t]).collect();
        let ds = similarity.ncols();
        let norm = |i: usize| {
            let row: Vec<f32> = similarity.row(i).iter().copied().collect();
            let mut out = vec![0.0; ds];
            normalize_row(&row, &mut out);
            out
        };
        let tn: Vec<Vec<f32>> = targets.iter().map(|&t| norm(t)).collect();
        let mut sums = vec![0.0f32; targets.len() * d];
        let mut counts = vec![0usize; targets.len()];
        let mut is_target = vec![false; m];
        local.iter().for_each(|&t| is_target[t] = true);
        for (li, &i) in rest.iter().enumerate() {
            if is_target[li] {
                continue;
            }
            let si = norm(i);
            let mut best = (0usize, f32::NEG_INFINITY);
            for (t, trow) in tn.iter().enumerate() {
                let c = dot(&si, trow);
                if c > best.1 {
                    best = (t, c);
                }
            }
            let xi: Vec<f32> = features.row(i).iter().copied().collect();
            axpy(&mut sums[best.0 * d..(best.0 + 1) * d], 1.0, &xi);
            counts[best.0] += 1;
        }
        for (t, &ti) in targets.iter().enumerate() {
            let c = counts[t].max(1) as f32;
            merged.extend(features.row(ti).iter().zip(&sums[t * d..(t + 1) * d]).map(|(&x, &s)| x + s / c));
        }
    }
    let mut data: Vec<f32> = Vec::with_capacity((dom.len() + targets.len()) * d);
    for &i in &dom {
        data.extend(features.row(i).iter().copied());
    }
    data.extend(merged);
    let tokens = Array2::from_shape_vec((dom.len() + targets.len(), d), data)
        .map_err(|e| Error::InvalidRequest(format!("visionzip: {e}")))?;
    Ok(VisionZipOutput { dominant: dom, targets, tokens })
}

fn normalized_rows(x: ArrayView2<'_, f32>) -> Vec<f32> {
    let d = x.ncols();
    let mut out = vec![0.0f32; x.nrows() * d];
    for (dst, row) in out.chunks_exact_mut(d.max(1)).zip(x.rows()) {
        let src: Vec<f32> = row.iter().copied().collect();
        normalize_row(&src, dst);
    }
    out
}

/// DivPrune: greedy max-min selection of `keep` tokens on cosine distance `1 - cos` of `features` rows.
///
/// As in the official code, the first pick is the token whose nearest other token is farthest (the largest
/// minimum distance to the rest); each next pick maximises its minimum distance to the picks so far. First index
/// wins ties. Already-picked tokens are excluded explicitly (the official code relies on their distance being 0).
/// The official code runs on projected LLaVA features; any per-token features can be passed. O(N^2 D) for the
/// first pick, O(keep N D) after.
pub fn divprune(features: ArrayView2<'_, f32>, keep: usize) -> Result<Vec<usize>> {
    require_keep("divprune", keep)?;
    let n = features.nrows();
    if keep >= n {
        return Ok((0..n).collect());
    }
    let d = features.ncols();
    let xn = normalized_rows(features);
    let row = |i: usize| &xn[i * d..(i + 1) * d];
    let mut nearest = vec![f32::INFINITY; n];
    for i in 0..n {
        for j in (i + 1)..n {
            let dist = 1.0 - dot(row(i), row(j));
            nearest[i] = nearest[i].min(dist);
            nearest[j] = nearest[j].min(dist);
        }
    }
    let argmax = |v: &[f32], skip: &[bool]| {
        let mut best: Option<usize> = None;
        for (i, &s) in skip.iter().enumerate() {
            if !s && best.is_none_or(|b| by_score_desc(v, i, b).is_lt()) {
                best = Some(i);
            }
        }
        best
    };
    let mut picked = vec![false; n];
    let mut out = Vec::with_capacity(keep);
    let mut next = argmax(&nearest, &picked);
    let mut mind = vec![f32::INFINITY; n];
    while let Some(p) = next {
        picked[p] = true;
        out.push(p);
        if out.len() == keep {
            break;
        }
        for j in 0..n {
            if !picked[j] {
                mind[j] = mind[j].min(1.0 - dot(row(p), row(j)));
            }
        }
        next = argmax(&mind, &picked);
    }
    out.sort_unstable();
    Ok(out)
}

/// DART: `pivots` tokens with the largest L1 norm, each followed by its least similar (lowest cosine) tokens.
///
/// Pivots are taken in descending norm order; each claims its share of the `keep - pivots` remaining slots (the
/// first `(keep - pivots) % pivots` pivots one more) among the tokens not yet kept. Adaptations: the official code
/// ranks pivots by the L1 norm of layer-2 KEYS in the LLM (and adds text-token pivots); we only have per-token
/// features here, so pass whichever features the pipeline exposes (pre-projector features by default). DART's
/// LLaVA setting uses 8 pivots (4 image + 4 text). Keeps exactly `min(keep, N)` tokens.
pub fn dart(features: ArrayView2<'_, f32>, keep: usize, pivots: usize) -> Result<Vec<usize>> {
    require_keep("dart", keep)?;
    require_keep("dart pivots", pivots)?;
    let n = features.nrows();
    if keep >= n {
        return Ok((0..n).collect());
    }
    let d = features.ncols();
    let l1: Vec<f32> = features.rows().into_iter().map(|r| r.iter().map(|v| v.abs()).sum()).collect();
    let p = pivots.min(keep);
    let pivot_list = top_k_of(&l1, (0..n).collect(), p);
    let xn = normalized_rows(features);
    let mut kept = vec![false; n];
    pivot_list.iter().for_each(|&i| kept[i] = true);
    let rest = keep - p;
    for (r, &pv) in pivot_list.iter().enumerate() {
        let share = rest / p + usize::from(r < rest % p);
        if share == 0 {
            continue;
        }
        let pr = &xn[pv * d..(pv + 1) * d];
        // Score = -cos, so the top scores are the least similar tokens.
        let mut score = vec![f32::NEG_INFINITY; n];
        let valid: Vec<usize> = (0..n).filter(|&j| !kept[j]).collect();
        for &j in &valid {
            score[j] = -dot(pr, &xn[j * d..(j + 1) * d]);
        }
        for j in top_k_of(&score, valid, share) {
            kept[j] = true;
        }
    }
    Ok((0..n).filter(|&i| kept[i]).collect())
}

/// Pooled tokens and the raster index of each pooled cell's centre patch.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledTokens {
    /// Raster index of each output cell's centre patch (its position), ascending.
    pub positions: Vec<usize>,
    /// Average of each cell's patches, `[out_h * out_w, D]`.
    pub tokens: Array2<f32>,
}

/// The largest `out_h x out_w` grid with at most `keep` cells and about the input's aspect ratio.
pub fn pool_grid(grid_h: usize, grid_w: usize, keep: usize) -> (usize, usize) {
    // Rows capped at `keep` too: on a grid taller than `keep` times its width the aspect ratio alone would give
    // more rows than cells allowed (20x1 at keep 10 gave 14x1).
    let oh = ((keep as f64 * grid_h as f64 / grid_w.max(1) as f64).sqrt().floor() as usize).clamp(1, grid_h.max(1)).min(keep.max(1));
    let ow = (keep / oh).clamp(1, grid_w.max(1));
    (oh, ow)
}

/// Uniform average pooling of the patch grid to `out_h x out_w` (`adaptive_avg_pool2d` bins).
///
/// Bin `i` of an axis covers `floor(i * H / out_h) .. ceil((i + 1) * H / out_h)`; each pooled token takes the
/// position of the centre patch of its bin (`(start + end - 1) / 2` per axis). Output sizes are capped at the grid.
pub fn pool(
    features: ArrayView2<'_, f32>,
    grid_h: usize,
    grid_w: usize,
    out_h: usize,
    out_w: usize,
) -> Result<PooledTokens> {
    let n = super::grid_tokens("pool", grid_h, grid_w)?;
    super::require_len("pool features", features.nrows(), n)?;
    require_keep("pool", out_h.min(out_w))?;
    let (oh, ow) = (out_h.min(grid_h), out_w.min(grid_w));
    let d = features.ncols();
    let bins = |n: usize, o: usize| -> Vec<(usize, usize)> {
        (0..o).map(|i| (i * n / o, ((i + 1) * n).div_ceil(o))).collect()
    };
    let (rows, cols) = (bins(grid_h, oh), bins(grid_w, ow));
    let mut positions = Vec::with_capacity(oh * ow);
    let mut tokens = Array2::<f32>::zeros((oh * ow, d));
    for (bi, &(y0, y1)) in rows.iter().enumerate() {
        for (bj, &(x0, x1)) in cols.iter().enumerate() {
            let mut acc = vec![0.0f64; d];
            for y in y0..y1 {
                for x in x0..x1 {
                    acc.iter_mut().zip(features.row(y * grid_w + x)).for_each(|(a, &v)| *a += f64::from(v));
                }
            }
            let cnt = ((y1 - y0) * (x1 - x0)) as f64;
            let r = bi * ow + bj;
            tokens.row_mut(r).iter_mut().zip(&acc).for_each(|(t, &a)| *t = (a / cnt) as f32);
            positions.push(((y0 + y1 - 1) / 2) * grid_w + (x0 + x1 - 1) / 2);
        }
    }
    Ok(PooledTokens { positions, tokens })
}

/// `keep` of `n` indices drawn uniformly without replacement from a seeded SplitMix64 stream, sorted.
pub fn random(n: usize, keep: usize, seed: u64) -> Result<Vec<usize>> {
    require_keep("random", keep)?;
    let keep = keep.min(n);
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..keep {
        // Multiply-shift maps 64 random bits onto 0..(n - i) without modulo bias worth noting.
        let span = (n - i) as u128;
        let j = i + ((u128::from(next()) * span) >> 64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(keep);
    idx.sort_unstable();
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn grid(n: usize, d: usize) -> Array2<f32> {
        Array2::from_shape_fn((n, d), |(i, k)| ((i * 7 + k * 3) % 11) as f32 - 5.0 + (i as f32) * 0.01)
    }

    #[test]
    fn visionzip_counts_and_merge() {
        let n = 16;
        let x = grid(n, 4);
        let metric: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
        let out = visionzip(&metric, x.view(), x.view(), 5, 3).unwrap();
        assert_eq!(
            out.dominant,
            vec![4, 9, 14, 3, 8].into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>()
        );
        assert_eq!(out.targets.len(), 3);
        assert_eq!(out.tokens.nrows(), 8);
        assert_eq!(visionzip_split(64), (54, 10));
        assert_eq!(visionzip_split(128), (108, 20));
        assert_eq!(visionzip_split(192), (162, 30));
        // Everything dominant: features unchanged.
        let all = visionzip(&metric, x.view(), x.view(), 20, 2).unwrap();
        assert_eq!(all.tokens, x);
    }

    #[test]
    fn divprune_first_pick_is_most_isolated() {
        // Three near-identical tokens and one orthogonal one.
        let x = Array2::from_shape_vec((4, 2), vec![1.0, 0.0, 1.0, 0.01, 1.0, 0.02, 0.0, 1.0]).unwrap();
        assert_eq!(divprune(x.view(), 1).unwrap(), vec![3]);
        assert_eq!(divprune(x.view(), 2).unwrap(), vec![0, 3]);
        assert_eq!(divprune(x.view(), 9).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn dart_keeps_pivots_and_dissimilar_tokens() {
        let x = Array2::from_shape_vec((4, 2), vec![5.0, 0.0, 1.0, 0.1, -1.0, 0.0, 0.0, 1.0]).unwrap();
        assert_eq!(dart(x.view(), 2, 1).unwrap(), vec![0, 2]);
        // Two pivots, three slots: the first pivot (larger L1) takes two, the second one, each its least similar
        // tokens among those not yet kept. Worked by hand: pivot 0 = [10, 0] takes 2 (cos -1) and 4 (-0.71);
        // pivot 1 = [0, 8] then takes 3 (cos -1) over 6 (-0.89) and 5 (0.71).
        let x = Array2::from_shape_vec(
            (7, 2),
            vec![10.0, 0.0, 0.0, 8.0, -1.0, 0.0, 0.0, -1.0, -0.7, -0.7, 1.0, 1.0, 0.5, -1.0],
        )
        .unwrap();
        assert_eq!(dart(x.view(), 5, 2).unwrap(), vec![0, 1, 2, 3, 4]);
        // With the slots the other way round it would be [0, 1, 2, 3, 6]; one slot each: 2 and 3.
        assert_eq!(dart(x.view(), 4, 2).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn visionzip_merges_each_remaining_token_into_its_most_similar_target() {
        // Recomputed here from the definition, in f64: contextual token = target's features + the mean of the
        // features of the tokens whose similarity row is closest (cosine) to the target's. Similarity and features
        // differ, so a merge on the wrong matrix shows.
        let n = 12;
        let x = Array2::from_shape_fn((n, 3), |(i, c)| ((i * 5 + c * 7) % 11) as f32 - 4.0);
        let sim = Array2::from_shape_fn((n, 2), |(i, c)| if c == 0 { (i as f32 * 0.7).cos() } else { (i as f32 * 0.7).sin() });
        let metric: Vec<f32> = (0..n).map(|i| ((i * 7) % 12) as f32).collect();
        let out = visionzip(&metric, sim.view(), x.view(), 4, 3).unwrap();
        let dominant: Vec<usize> = {
            let mut d: Vec<usize> = (0..n).collect();
            d.sort_by(|&a, &b| metric[b].total_cmp(&metric[a]).then(a.cmp(&b)));
            d.truncate(4);
            d.sort_unstable();
            d
        };
        assert_eq!(out.dominant, dominant);
        let rest: Vec<usize> = (0..n).filter(|i| !dominant.contains(i)).collect();
        let targets: Vec<usize> = rest.iter().step_by(rest.len() / 3).take(3).copied().collect();
        assert_eq!(out.targets, targets);
        let cos = |a: usize, b: usize| {
            let (ra, rb) = (sim.row(a), sim.row(b));
            let dot: f64 = ra.iter().zip(rb.iter()).map(|(&p, &q)| f64::from(p) * f64::from(q)).sum();
            let na: f64 = ra.iter().map(|&p| f64::from(p).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = rb.iter().map(|&p| f64::from(p).powi(2)).sum::<f64>().sqrt();
            dot / (na * nb)
        };
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); targets.len()];
        for &i in rest.iter().filter(|i| !targets.contains(i)) {
            let best = (0..targets.len()).fold(0, |b, t| if cos(i, targets[t]) > cos(i, targets[b]) { t } else { b });
            members[best].push(i);
        }
        assert!(members.iter().filter(|m| !m.is_empty()).count() >= 2, "the example should spread the merge: {members:?}");
        for (k, &t) in targets.iter().enumerate() {
            for c in 0..3 {
                let mean = if members[k].is_empty() {
                    0.0
                } else {
                    members[k].iter().map(|&i| f64::from(x[[i, c]])).sum::<f64>() / members[k].len() as f64
                };
                let want = f64::from(x[[t, c]]) + mean;
                let got = f64::from(out.tokens[[4 + k, c]]);
                assert!((got - want).abs() < 1e-5, "target {t} col {c}: {got} vs {want} (members {:?})", members[k]);
            }
        }
        for (row, &d) in dominant.iter().enumerate() {
            assert_eq!(out.tokens.row(row), x.row(d), "dominant tokens are unchanged");
        }
    }

    #[test]
    fn pool_averages_bins() {
        let x = Array2::from_shape_fn((16, 1), |(i, _)| i as f32);
        let p = pool(x.view(), 4, 4, 2, 2).unwrap();
        assert_eq!(p.positions, vec![0, 2, 8, 10]);
        assert_eq!(p.tokens.column(0).to_vec(), vec![2.5, 4.5, 10.5, 12.5]);
        assert_eq!(pool_grid(24, 24, 64), (8, 8));
        let id = pool(x.view(), 4, 4, 9, 9).unwrap();
        assert_eq!(id.tokens, x);
    }

    #[test]
    fn pool_grid_never_exceeds_keep_on_tall_or_wide_grids() {
        // Before, the rows came from the aspect ratio alone: 20x1 at keep 10 gave 14x1, 24x6 at keep 1 gave 2x1.
        assert_eq!(pool_grid(20, 1, 10), (10, 1));
        assert_eq!(pool_grid(24, 6, 1), (1, 1));
        assert_eq!(pool_grid(8, 2, 1), (1, 1));
        for (h, w) in [(1, 1), (1, 30), (30, 1), (24, 6), (6, 24), (5, 7), (24, 24)] {
            for keep in 1..=h * w {
                let (oh, ow) = pool_grid(h, w, keep);
                assert!(oh * ow <= keep && oh <= h && ow <= w, "{h}x{w} keep {keep}: {oh}x{ow}");
            }
        }
    }

    #[test]
    fn pool_refuses_a_grid_whose_size_overflows() {
        // Before, 2^32 x 2^32 wrapped to 0 rows in release and indexed out of bounds.
        let z = Array2::<f32>::zeros((0, 2));
        let e = pool(z.view(), 1 << 32, 1 << 32, 1, 1).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }

    proptest! {
        #[test]
        fn selections_are_sorted_unique_and_sized(n in 1usize..40, keep in 1usize..50, seed in any::<u64>()) {
            let x = grid(n, 3);
            for kept in [random(n, keep, seed).unwrap(), divprune(x.view(), keep).unwrap(),
                         dart(x.view(), keep, 3).unwrap()] {
                prop_assert_eq!(kept.len(), keep.min(n));
                prop_assert!(kept.windows(2).all(|p| p[0] < p[1]));
                prop_assert!(kept.iter().all(|&k| k < n));
            }
            prop_assert_eq!(random(n, keep, seed).unwrap(), random(n, keep, seed).unwrap());
        }
    }
}
