"""Independent numpy reference of Nüwa's pruning (Stage 1 and Stage 2), written from docs/NUWA-METHOD.

Mirrors the official LLaVA-1.5 code (Man-PaperRejected/Nuwa, nuwa/clip_encoder.py) in float64, with the runtime's
deterministic tie rule: higher score first, equal scores to the LOWER raster index (torch.topk leaves ties unspecified).
No torch needed. Used by make_prune_goldens.py; the Rust side (src/prune/) must match it.
"""
from __future__ import annotations

import math

import numpy as np

REGION = 2
PILLAR_QUANTILE = 0.55


def rank_desc(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """`candidates` ordered by score descending, ties by lower index (NaN last)."""
    s = np.asarray(scores, dtype=np.float64)[candidates]
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((candidates, -s))
    return candidates[order]


def top_k_sorted(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores (tie rule), ascending."""
    idx = np.arange(len(scores))
    return np.sort(rank_desc(scores, idx)[:k])


def default_radius_sq(h: int, w: int) -> float:
    """280/1058 of the squared grid diagonal: exactly 280 on 24x24."""
    return 280.0 / 1058.0 * ((h - 1) ** 2 + (w - 1) ** 2)


def separate(metric: np.ndarray, h: int, w: int, top_n: int, keep: int) -> np.ndarray:
    """Per 2x2 region (clipped at the border) its top_n by metric; then the global top-keep; raster-sorted."""
    cands = []
    for y0 in range(0, h, REGION):
        for x0 in range(0, w, REGION):
            cells = np.array([y * w + x for y in range(y0, min(y0 + REGION, h)) for x in range(x0, min(x0 + REGION, w))])
            cands.extend(rank_desc(metric, cells)[:top_n].tolist())
    cands = np.array(cands, dtype=np.int64)
    return np.sort(rank_desc(metric, cands)[:keep])


def quantile_linear(values: np.ndarray, q: float) -> float:
    """torch.quantile(values, q) ('linear'), with torch.lerp's two-sided formula, in float64."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    rank = q * (len(v) - 1)
    below = math.floor(rank)
    weight = rank - below
    lo, hi = v[below], v[min(math.ceil(rank), len(v) - 1)]
    return lo + weight * (hi - lo) if weight < 0.5 else hi - (hi - lo) * (1.0 - weight)


def pillar_flags(metric: np.ndarray, kept: np.ndarray, q: float = PILLAR_QUANTILE) -> np.ndarray:
    scores = np.asarray(metric, dtype=np.float64)[kept]
    return scores >= quantile_linear(scores, q)


def proximity_matrix(h: int, w: int, radius_sq: float) -> np.ndarray:
    """P[i, j] = 1 - min(1, dist(i, j) / sqrt(radius_sq)) over raster indices (N x N)."""
    ys, xs = np.divmod(np.arange(h * w), w)
    d = np.sqrt((ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2).astype(np.float64)
    if radius_sq <= 0:
        return (d == 0).astype(np.float64)
    return 1.0 - np.minimum(1.0, d / math.sqrt(radius_sq))


def aggregate(kept, pillar, similarity, features, h, w, radius_sq):
    """Official tensor code, restated: pillars' rows keep only their self weight; rows normalised; self := 1."""
    s = np.asarray(similarity, dtype=np.float64)
    x = np.asarray(features, dtype=np.float64)
    norm = np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)  # F.normalize
    sn = s / norm
    sim = sn @ sn.T
    weights = np.maximum(sim, 0.0) * proximity_matrix(h, w, radius_sq)
    bw = weights[kept].copy()
    penalty = np.ones_like(bw)
    penalty[pillar] = 0.0
    penalty[np.arange(len(kept)), kept] = 1.0
    bw *= penalty
    bw = bw / (bw.sum(axis=1, keepdims=True) + 1e-8)
    bw[np.arange(len(kept)), kept] = 1.0
    return bw @ x


def nuwa_stage1(metric, similarity, features, h, w, top_n, keep, q=PILLAR_QUANTILE, radius_sq=None):
    """Returns (kept, pillar, tokens); keep >= N is 'no pruning' (all tokens, all pillars, unchanged)."""
    n = h * w
    if radius_sq is None:
        radius_sq = default_radius_sq(h, w)
    if keep >= n:
        return np.arange(n), np.ones(n, dtype=bool), np.asarray(features, dtype=np.float64)
    kept = separate(metric, h, w, top_n, keep)
    pillar = pillar_flags(metric, kept, q)
    return kept, pillar, aggregate(kept, pillar, similarity, features, h, w, radius_sq)


def nuwa_stage2(attention_row, span_start, span_end, keep):
    """Top-keep of attention_row[span] (tie rule), indices relative to span_start, ascending."""
    return top_k_sorted(np.asarray(attention_row)[span_start:span_end], keep)


PRESETS = {64: (1, 112, 16), 128: (2, 224, 32), 192: (3, 336, 48)}


def candidate_count(h, w, top_n):
    return sum(min(top_n, min(REGION, h - y0) * min(REGION, w - x0)) for y0 in range(0, h, REGION) for x0 in range(0, w, REGION))


def plan(budget, h, w):
    """Preset carried to an h x w grid: keeps scaled by N/576 (half away from zero, >= 1), keep1 capped."""
    top_n, k1, k2 = PRESETS[budget]
    n = h * w
    scale = lambda k: max(1, int(math.floor(k * n / 576 + 0.5)))
    keep1 = min(scale(k1), candidate_count(h, w, top_n))
    return top_n, keep1, min(scale(k2), keep1)
