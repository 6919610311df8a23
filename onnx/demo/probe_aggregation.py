"""Diagnostic: what Nüwa's Stage-1 aggregation does to a model's visual tokens, measured on the runtime's own dumps.

For the first grounding item of each of the first --n held-out images, runs
`nuwa run --prune nuwa --budget B --dump DIR` (one generated token is enough: Stage 1 runs before the decoder),
recomputes the aggregation weights from the dumped signals exactly as the method defines them (ReLU of the cosine of
the similarity features x proximity 1 - min(1, d / sqrt(280)), row-normalised with the self weight, then self weight
1) and checks them against the dumped aggregated tokens. Every grid cell is labelled from the scene file (the item's
target shape, another shape, the photo, or the expand-to-square padding). Printed:

- where the pillars (left unchanged) and the collectors (aggregated) sit;
- per collector: the row's weight sum, the effective number of contributors (sum w)^2 / sum w^2, the norm of what
  is added relative to the anchor's own feature, its cosine with the image's mean feature and with the anchor, the
  weighted mean grid distance of the contributors;
- which kinds of cells a collector's added weight comes from.

    .venv/bin/python onnx/demo/probe_aggregation.py --n 40 --budget 64      # ~45 s
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from make_data import norm_box  # noqa: E402
KINDS = ["photo", "padding", "other shape", "target"]


def cell_labels(scene: dict, target: int, grid: int) -> np.ndarray:
    """0 photo, 1 padding, 2 another shape, 3 the target, by each cell's centre in the padded square (make_data's
    norm_box mapping; the centre rule is the runtime's "target cells kept")."""
    w, h = scene["width"], scene["height"]
    photo = norm_box((0, 0, w, h), w, h)
    boxes = [norm_box(s["bbox"], w, h) for s in scene["shapes"]]
    lab = np.zeros(grid * grid, int)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        x, y = (c + 0.5) / grid, (r + 0.5) / grid
        if not (photo[0] <= x < photo[2] and photo[1] <= y < photo[3]):
            lab[k] = 1
            continue
        for si, (x1, y1, x2, y2) in enumerate(boxes):
            if x1 <= x <= x2 and y1 <= y <= y2:
                lab[k] = 3 if si == target else max(lab[k], 2)
    return lab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/nuwa-demo")
    p.add_argument("--data", type=Path, default=ROOT / "data/heldout/heldout.jsonl")
    p.add_argument("--scenes", type=Path, help="default: DATA with .jsonl -> .scenes.jsonl")
    p.add_argument("--nuwa", type=Path, default=ROOT / "target/release/nuwa")
    p.add_argument("--n", type=int, default=40, help="images (the first grounding item of each)")
    p.add_argument("--budget", default="64")
    p.add_argument("--work", type=Path, help="keep the dumps here (default: a temporary directory, removed)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="nuwa-probe-aggregation-")  # removed at exit
    work = args.work or Path(tmp.name)

    scenes_path = args.scenes or args.data.with_name(args.data.name.replace(".jsonl", ".scenes.jsonl"))
    scenes = {s["image"]: s for s in map(json.loads, scenes_path.read_text().splitlines())}
    chosen, seen = [], set()
    for it in map(json.loads, args.data.read_text().splitlines()):
        if it["kind"] == "grounding" and it["image"] not in seen and len(chosen) < args.n:
            seen.add(it["image"])
            chosen.append(it)

    stats = {k: [] for k in ["weight sum", "contributors", "|added|/|x|", "cos(added, mean)", "cos(added, x)",
                             "distance"]}
    where = np.zeros((4, 4))
    pillars, collectors, cells = np.zeros(4, int), np.zeros(4, int), np.zeros(4, int)
    pairwise_cos, max_err = [], 0.0
    for n, it in enumerate(chosen):
        d = work / f"b{args.budget}-{n}"  # always dumped afresh: never a dump of another model read back
        run = subprocess.run([str(args.nuwa), "run", "--model", str(args.model), "--image",
                              str(args.data.parent / it["image"]), "--prompt", it["prompt"], "--prune", "nuwa",
                              "--budget", args.budget, "--dump", str(d), "--max-tokens", "1"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"nuwa run failed on {it['image']}: {run.stderr.strip()}")
        feats = np.load(d / "vision_features.npy").astype(np.float64)
        sim = np.load(d / "vision_similarity.npy").astype(np.float64)
        kept, pillar = np.load(d / "stage1_kept.npy"), np.load(d / "stage1_pillar.npy").astype(bool)
        tokens = np.load(d / "stage1_tokens.npy")
        grid = math.isqrt(len(feats))
        rr, cc = np.divmod(np.arange(grid * grid), grid)
        dist = np.hypot(rr[:, None] - rr[None], cc[:, None] - cc[None])
        prox = 1 - np.minimum(1, dist / math.sqrt(280))
        unit = sim / np.maximum(np.linalg.norm(sim, axis=1, keepdims=True), 1e-12)
        cos = unit @ unit.T
        pairwise_cos.append(np.median(cos[np.triu_indices(len(cos), 1)]))
        weights = np.maximum(cos, 0) * prox
        lab = cell_labels(scenes[it["image"]], it["target"], grid)
        np.add.at(cells, lab, 1)
        mean = feats.mean(0)
        for row, (k, is_pillar) in enumerate(zip(kept, pillar)):
            if is_pillar:
                pillars[lab[k]] += 1
                continue
            collectors[lab[k]] += 1
            w = weights[k] / (weights[k].sum() + 1e-8)
            total = weights[k].sum()
            w[k] = 0.0
            added = w @ feats
            max_err = max(max_err, float(np.abs(feats[k] + added - tokens[row]).max()))
            norm = np.linalg.norm
            stats["weight sum"].append(total)
            stats["contributors"].append(w.sum() ** 2 / (w ** 2).sum())
            stats["|added|/|x|"].append(norm(added) / norm(feats[k]))
            stats["cos(added, mean)"].append(added @ mean / norm(added) / norm(mean))
            stats["cos(added, x)"].append(added @ feats[k] / norm(added) / norm(feats[k]))
            stats["distance"].append((w * dist[k]).sum() / w.sum())
            for kind in range(4):
                where[lab[k], kind] += w[lab == kind].sum() / w.sum()

    print(f"{len(chosen)} images, nuwa budget {args.budget}; recomputed vs dumped aggregated tokens: "
          f"max |difference| {max_err:.1e}")
    print(f"median pairwise cosine of the similarity features: {np.median(pairwise_cos):.3f}")
    print("grid cells:      " + ", ".join(f"{KINDS[i]} {cells[i] / cells.sum():.3f}" for i in range(4)))
    print("pillars on:      " + ", ".join(f"{KINDS[i]} {pillars[i]}" for i in range(4)))
    print("collectors on:   " + ", ".join(f"{KINDS[i]} {collectors[i]}" for i in range(4)))
    print("per collector (median [p10, p90]):")
    for name, v in stats.items():
        v = np.asarray(v)
        print(f"  {name:18s} {np.median(v):8.3f} [{np.percentile(v, 10):.3f}, {np.percentile(v, 90):.3f}]")
    print("share of a collector's added weight by cell kind (rows: where the collector sits):")
    for i in range(4):
        if collectors[i]:
            print(f"  {KINDS[i]:12s} " + "  ".join(f"{KINDS[j]} {where[i, j] / collectors[i]:.3f}" for j in range(4)))


if __name__ == "__main__":
    main()
