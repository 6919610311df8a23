"""Does the demo model fit its own training scenes? Two small tools around `nuwa eval`.

  sample     a seeded sample of a prepare_train set's items (the first N images, K grounding + K VQA items
             each) written as a `nuwa eval` data file; image paths are made relative to the output file.
  breakdown  hits per question type of one or more `nuwa eval --predictions` files, joined to the data file's
             items by line number (colour questions split by their qualifier: "at the top" / "on the left" are
             `color:position`, "left of the star" / "above ..." `color:relation`, the rest `color:plain`).

Scoring the same model on scenes it was trained on, on fresh scenes from the same generator and on the
held-out set separates underfitting (weak everywhere) from overfitting (weak only on new scenes):

  .venv/bin/python onnx/demo/fit_check.py sample --set .cache/demo-train-big3 --images 100 --per-kind 5 \
      --out .cache/fit/seen.jsonl
  target/release/nuwa eval --model models/nuwa-demo --data .cache/fit/seen.jsonl --json \
      --predictions .cache/fit/seen.pred.jsonl
  .venv/bin/python onnx/demo/fit_check.py breakdown --data .cache/fit/seen.jsonl \
      --predictions .cache/fit/seen.pred.jsonl
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_common import predictions_of, read_jsonl  # noqa: E402

RELATIONS = (" left of ", " right of ", " above ", " below ")
POSITIONS = (" at the ", " on the ")


def qtype_of(item: dict) -> str:
    q = item.get("qtype", "?")
    if q != "color":
        return q
    prompt = item.get("prompt", "").split("?")[0]
    if any(w in prompt for w in RELATIONS):
        return "color:relation"
    if any(w in prompt for w in POSITIONS):
        return "color:position"
    return "color:plain"


def sample(args) -> None:
    shards = sorted(p for p in args.set.glob("shard-*") if (p / "items.jsonl").exists())
    if not shards:
        raise SystemExit(f"--set {args.set}: no shard-*/items.jsonl (a prepare_train.py output directory?)")
    items = [it for sh in shards for it in read_jsonl(sh / "items.jsonl")]
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for n, it in enumerate(items):
        if "image" not in it or it.get("kind") not in ("grounding", "vqa"):
            raise SystemExit(f"--set {args.set}: item {n} has no image or an unknown kind")
        groups[(it["image"], it["kind"])].append(it)
    images = sorted({it["image"] for it in items})[: args.images]
    if not (args.set / images[0]).exists():
        raise SystemExit(f"--set {args.set}: {images[0]} is missing (made with --no-images?)")
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    counts = collections.Counter()
    with open(args.out, "w", encoding="utf-8") as f:
        for image in images:
            for kind in ("grounding", "vqa"):
                pool = groups.get((image, kind), [])
                for it in rng.sample(pool, min(args.per_kind, len(pool))):
                    it = dict(it, image=os.path.relpath(args.set / it["image"], args.out.parent))
                    f.write(json.dumps(it) + "\n")
                    counts[kind] += 1
    print(f"[sample] {len(images)} images of {args.set}: {counts['grounding']} grounding + {counts['vqa']} VQA items "
          f"-> {args.out}")


def breakdown(args) -> None:
    items = read_jsonl(args.data)
    table = {}
    for pred_path in args.predictions:
        hits, total = collections.Counter(), collections.Counter()
        for item, p in predictions_of(pred_path, items, args.data, run=args.run):
            q = qtype_of(item)
            total[q] += 1
            hits[q] += bool(p.get("correct"))
        table[pred_path] = (hits, total)
    names = sorted({q for _, t in table.values() for q in t})
    print("| type | " + " | ".join(str(p) for p in args.predictions) + " |")
    print("|---|" + "---|" * len(args.predictions))
    for q in names + ["all"]:
        cells = []
        for hits, total in table.values():
            h, t = (sum(hits.values()), sum(total.values())) if q == "all" else (hits[q], total[q])
            cells.append(f"{h} / {t} ({h / t:.2f})" if t else "-")
        print(f"| {q} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="a nuwa eval file from a prepare_train set")
    s.add_argument("--set", type=Path, required=True, help="prepare_train.py output directory")
    s.add_argument("--images", type=int, default=100, help="the first N images (default 100)")
    s.add_argument("--per-kind", type=int, default=5, help="grounding and VQA items per image (default 5 each)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("breakdown", help="hits per question type of nuwa eval --predictions files")
    b.add_argument("--data", type=Path, required=True, help="the data file the predictions were made on")
    b.add_argument("--predictions", type=Path, nargs="+", required=True)
    b.add_argument("--run", help="one setting of a sweep's predictions (its `run` label, e.g. none or nuwa:64);\n"
                   "without it each file must hold a single run")
    args = p.parse_args(argv)
    if args.cmd == "sample" and (args.images < 1 or args.per_kind < 1):
        p.error("--images and --per-kind must be at least 1")
    sample(args) if args.cmd == "sample" else breakdown(args)


if __name__ == "__main__":
    main(sys.argv[1:])
