"""Writes the Stage-1/Stage-2 pruning goldens to tests/golden/prune/ (read by tests/prune_golden.rs).

    .venv/bin/python onnx/reference/make_prune_goldens.py [--real models/tiny-llava-clip/golden]

Inputs are float32 .npy; the reference (nuwa_reference.py) computes in float64 from those float32 values. Each case
records its parameters in index.json; file paths there are relative to tests/golden/prune/. With --real (default:
models/tiny-llava-clip/golden when it exists) a case is added from the real exported signals of that model
(cls_attention.npy, similarity.npy, features.npy; a leading batch dimension of 1 is dropped).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

import nuwa_reference as ref

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "prune"


def save(rel: str, arr: np.ndarray) -> str:
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return rel


def inputs(name, rng, n, d, sim_offset=0.3):
    metric = rng.random(n, dtype=np.float32) ** 3  # skewed like CLS attention
    sim = (rng.standard_normal((n, d), dtype=np.float32) + np.float32(sim_offset)).astype(np.float32)
    feat = rng.standard_normal((n, d), dtype=np.float32)
    return {
        "metric": save(f"{name}/metric.npy", metric),
        "similarity": save(f"{name}/similarity.npy", sim),
        "features": save(f"{name}/features.npy", feat),
    }


def load(files):
    return {k: np.load(OUT / v) for k, v in files.items()}


def stage2_inputs(name, rng, k1, k2, ties=False):
    prefix, suffix = 5, 9
    row = rng.random(prefix + k1 + suffix, dtype=np.float32)
    if ties:
        row = (rng.integers(0, 3, size=row.shape) / 4).astype(np.float32)
    row = row / row.sum(dtype=np.float32)
    span = [prefix, prefix + k1]
    kept = ref.nuwa_stage2(row, span[0], span[1], k2).astype(np.int64)
    return {
        "attention_row": save(f"{name}/attention_row.npy", row.astype(np.float32)),
        "span": span,
        "keep": k2,
        "kept": save(f"{name}/stage2_kept.npy", kept),
    }


def case(name, files, h, w, top_n, keep1, keep2, rng, stage2_ties=False, note="", stage2=None):
    a = load(files)
    radius_sq = ref.default_radius_sq(h, w)
    kept, pillar, tokens = ref.nuwa_stage1(a["metric"], a["similarity"], a["features"], h, w, top_n, keep1,
                                           ref.PILLAR_QUANTILE, radius_sq)
    entry = {
        "name": name, "note": note, "grid_h": h, "grid_w": w, "top_n": top_n, "keep": keep1,
        "pillar_quantile": ref.PILLAR_QUANTILE, "radius_sq": radius_sq, **files,
        "kept": save(f"{name}/kept.npy", kept.astype(np.int64)),
        "pillar": save(f"{name}/pillar.npy", pillar.astype(np.uint8)),
        "tokens": save(f"{name}/tokens.npy", tokens.astype(np.float32)),
        "stage2": stage2 if stage2 else stage2_inputs(name, rng, len(kept), keep2, ties=stage2_ties),
    }
    print(f"{name}: grid {h}x{w} top_n {top_n} keep {keep1} -> {len(kept)} kept, {int(pillar.sum())} pillars")
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=ROOT / "models" / "tiny-llava-clip" / "golden")
    args = ap.parse_args()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rng = np.random.default_rng(20260202)
    cases = []

    shared = inputs("random_24x24", rng, 576, 32)
    for budget in (64, 128, 192):
        top_n, k1, k2 = ref.plan(budget, 24, 24)
        cases.append(case(f"budget{budget}_24x24", shared, 24, 24, top_n, k1, k2, rng, note=f"preset {budget}"))

    ties = dict(shared)
    ties["metric"] = save("ties_24x24/metric.npy", (rng.integers(0, 4, size=576) / 8).astype(np.float32))
    cases.append(case("ties_24x24", ties, 24, 24, 2, 224, 32, rng, stage2_ties=True, note="metric with 4 levels"))

    cases.append(case("full_budget_6x6", inputs("full_budget_6x6", rng, 36, 8), 6, 6, 1, 36, 36, rng,
                      note="keep >= N: no pruning"))
    cases.append(case("over_budget_5x5", inputs("over_budget_5x5", rng, 25, 8), 5, 5, 4, 100, 30, rng,
                      note="keep > N: no pruning"))
    cases.append(case("odd_7x9", inputs("odd_7x9", rng, 63, 16), 7, 9, 2, 20, 6, rng, note="partial border regions"))
    cases.append(case("odd_7x9_all_candidates", {**load_files("odd_7x9")}, 7, 9, 3, 62, 10, rng,
                      note="keep capped at the candidate count"))

    zero = inputs("zero_similarity_8x8", rng, 64, 16)
    zero["similarity"] = save("zero_similarity_8x8/similarity.npy", np.zeros((64, 16), np.float32))
    cases.append(case("zero_similarity_8x8", zero, 8, 8, 1, 12, 2, rng, note="all-zero similarity"))

    cases.append(case("single_region_2x2", inputs("single_region_2x2", rng, 4, 8), 2, 2, 2, 2, 1, rng,
                      note="one region"))
    cases.append(case("single_patch_1x1", inputs("single_patch_1x1", rng, 1, 8), 1, 1, 1, 1, 1, rng,
                      note="1x1 grid"))
    cases.append(case("stage2_ties_8x8", inputs("stage2_ties_8x8", rng, 64, 16), 8, 8, 2, 24, 8, rng,
                      stage2_ties=True, note="stage-2 row with many ties"))

    real = args.real
    names = ["cls_attention.npy", "similarity.npy", "features.npy"]
    if real and all((real / f).exists() for f in names):
        arrs = [np.load(real / f).astype(np.float32) for f in names]
        arrs = [a[0] if a.ndim >= 2 and a.shape[0] == 1 else a for a in arrs]
        n = arrs[0].shape[-1] if arrs[0].ndim == 1 else arrs[0].size
        side = int(round(n ** 0.5))
        if side * side == n:
            files = {
                "metric": save("real_tiny_llava/metric.npy", arrs[0].reshape(n)),
                "similarity": save("real_tiny_llava/similarity.npy", arrs[1].reshape(n, -1)),
                "features": save("real_tiny_llava/features.npy", arrs[2].reshape(n, -1)),
            }
            keep1 = max(1, n * 3 // 8)
            top_n = -(-keep1 // ((side + 1) // 2) ** 2)
            stage2 = None
            meta = real / "golden.json"
            if (real / "attention_row.npy").exists() and meta.exists():
                # The real (unpruned) prefill's stage-2 row and its image span.
                row = np.load(real / "attention_row.npy").astype(np.float32).reshape(-1)
                span = json.loads(meta.read_text())["image_span"]
                k2 = max(1, (span[1] - span[0]) // 4)
                stage2 = {
                    "attention_row": save("real_tiny_llava/attention_row.npy", row),
                    "span": span, "keep": k2,
                    "kept": save("real_tiny_llava/stage2_kept.npy",
                                 ref.nuwa_stage2(row, span[0], span[1], k2).astype(np.int64)),
                }
            src = real.relative_to(ROOT) if real.is_relative_to(ROOT) else real
            cases.append(case("real_tiny_llava", files, side, side, top_n, keep1, max(1, keep1 // 3), rng,
                              note=f"real signals from {src}", stage2=stage2))
        else:
            print(f"skipping real case: {n} patches is not a square grid")
    else:
        print(f"no real signals at {real} (optional): real_tiny_llava case skipped")

    (OUT / "index.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(cases)} cases to {OUT.relative_to(ROOT)} ({total / 1024:.0f} KiB)")


def load_files(name):
    return {k: f"{name}/{k}.npy" for k in ("metric", "similarity", "features")}


if __name__ == "__main__":
    main()
