"""Diagnostic: where do the superlative expressions' boxes land? (issue 4, session 17)

Reads `nuwa eval --predictions` output and the held-out set it was run on (items + scenes from make_data.py) and
sorts every superlative expression ("the largest / smallest <kind>") by where its predicted box lies: a hit
(IoU >= 0.5 with the target), a box on another shape of the same kind or of another kind (IoU >= 0.5 with it), or
on no shape. It prints the rate a model that finds the kind and then picks one of its shapes at random would get,
so a model that ignores size shows up as hits / (hits + same-kind misses) near that rate. No model is run.

    target/release/nuwa eval --model models/nuwa-demo --data data/heldout/heldout.jsonl --json \
        --predictions .cache/eval.predictions.jsonl
    .venv/bin/python onnx/demo/probe_superlatives.py --predictions .cache/eval.predictions.jsonl
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_common import predictions_of, read_jsonl  # noqa: E402


def iou(a: list[float], b: list[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--predictions", type=Path, required=True, help="nuwa eval --predictions JSON Lines")
    p.add_argument("--data", type=Path, default=Path("data/heldout/heldout.jsonl"),
                   help="the data the predictions are of; its scenes file (<stem>.scenes.jsonl) sits beside it")
    p.add_argument("--run", default="none", help="which sweep setting's predictions (the `run` field; default none)")
    args = p.parse_args(argv)

    items = read_jsonl(args.data)
    scenes_path = args.data.with_name(args.data.stem + ".scenes.jsonl")
    scenes = {s["image"]: s for s in read_jsonl(scenes_path)}
    counts: collections.Counter = collections.Counter()
    by_word: collections.Counter = collections.Counter()
    chance, n = 0.0, 0
    for item, pred in predictions_of(args.predictions, items, args.data, run=args.run):
        if item.get("qtype") != "superl":
            continue
        scene = scenes.get(item["image"])
        if scene is None:
            raise SystemExit(f"{scenes_path}: no scene for {item['image']}")
        shapes, target = scene["shapes"], item["target"]
        kind = shapes[target]["kind"]
        word = item["expr"].split()[1]  # "the largest circle" -> largest
        n += 1
        chance += 1 / sum(s["kind"] == kind for s in shapes)
        box = pred.get("predicted_box")
        if pred.get("correct"):
            verdict = "hit"
            by_word[word, "hit"] += 1
        elif box is None:
            verdict = "no box"
        else:
            overlaps = [iou(box, s["bbox"]) for s in shapes]
            best = max(range(len(shapes)), key=overlaps.__getitem__)
            if overlaps[best] < 0.5:
                verdict = "on no shape"
            elif shapes[best]["kind"] == kind:
                verdict = "another shape of the same kind"
            else:
                verdict = "a shape of another kind"
        counts[verdict] += 1
        by_word[word, "n"] += 1
    if n == 0:
        raise SystemExit(f"no superlative items of run {args.run!r} in {args.predictions}")
    for verdict, c in counts.most_common():
        print(f"{verdict:32s} {c:4d} / {n}")
    right_kind = counts["hit"] + counts["another shape of the same kind"]
    if right_kind:
        print(f"right shape among boxes on a shape of the right kind: {counts['hit']} / {right_kind} "
              f"({counts['hit'] / right_kind:.2f}); random among the same-kind shapes: {chance / n:.2f}")
    for word in sorted({w for w, _ in by_word}):
        print(f"{word}: {by_word[word, 'hit']} / {by_word[word, 'n']}")


if __name__ == "__main__":
    sys.exit(main())
