"""Seeded training / held-out data for the demo VLM: coloured shapes drawn on real COCO photographs.

  .venv/bin/python onnx/demo/make_data.py --split train   --n 20000 --seed 1 --out data/train
  .venv/bin/python onnx/demo/make_data.py --split heldout --n 300   --seed 7 --out data/heldout

Backgrounds: COCO train2017 photos for --split train, val2017 photos ONLY for --split heldout (every
coco_*/<split>/ folder under /work/shared/data/coco or $NUWA_COCO, deduplicated by file name, sorted), visited in a seeded
permutation (image i uses perm[i % count], so every photo is used before any repeats). A background keeps its own
size and aspect ratio (train may mirror it horizontally). On each background 2-4 shapes (circle, square, triangle,
star) in 8 colours, circumscribed diameter 18-40 % of the shorter side, are drawn with PIL; overlaps are allowed but
every shape keeps at least 65 % of its area visible, so every referent stays visible.

Writes OUT/images/NNNNNN.jpg, OUT/<split>.jsonl (one item a line; image paths relative to the jsonl) and
OUT/<split>.scenes.jsonl (the shapes of every image, for debugging). Items:

  grounding {"image", "kind": "grounding", "prompt", "bbox": [x1, y1, x2, y2] (original pixels), "answer",
             "expr", "qtype"}
    prompt = LLaVA-1.5's RefCOCO prompt "Please provide the bounding box coordinate of the region this sentence
    describes: <expr>."; answer = the box normalised to the PADDED SQUARE model input (LLaVA-1.5 expand2square,
    centred: the shorter side is offset by floor((long - short) / 2), matching manifest resize "pad"), 2 decimals,
    "[0.12, 0.34, 0.56, 0.78]". Expressions (only emitted when they have exactly one referent):
      attr      "the red circle" / "the circle" (unique colour+shape, or unique shape)
      superl    "the largest triangle" / "the smallest star" (>= 2 of that shape, area ratio >= 1.6)
      position  "the yellow star at the bottom" / "the circle on the left" (>= 2 candidates, the target's centre is
                the extreme one by >= 15 % of the image side)
      relation  "the square left of the blue star" / "... above ..." (anchor uniquely named; exactly one shape of
                that kind lies entirely on that side of the anchor's box)
  vqa       {"image", "kind": "vqa", "prompt", "answer", "qtype"}
      exist     "Is there a red circle in the image?" yes/no, exactly balanced (even images ask a present pair, odd
                images an absent one; half of the negatives are adversarial: the colour or the shape is present)
      color     "What color is the largest triangle?" -> "red" (any unambiguous expression without a colour)
      count     "How many stars are there in the image?" -> "2" (digits; 0 allowed)
    each VQA prompt gets LLaVA's suffix " Answer the question using a single word or phrase." with probability 0.5.

Deterministic: image i depends only on (seed, split, i) (its own numpy Generator), so any prefix of a run equals a
shorter run, and --start lets a run be resumed or split across processes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# the shared COCO photos; NUWA_COCO points elsewhere on a machine without ../shared (gpu_train.sh carries a copy)
COCO = Path(os.environ.get("NUWA_COCO", "/work/shared/data/coco"))
SHAPES = ["circle", "square", "triangle", "star"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLORS = {  # name -> RGB (jittered per shape)
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 80, 225), "yellow": (245, 215, 30),
    "purple": (135, 55, 190), "orange": (250, 140, 20), "pink": (245, 120, 190), "white": (245, 245, 245),
}
REC_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."
SUFFIX = " Answer the question using a single word or phrase."
SPLIT_CODE = {"train": 1, "heldout": 2}
MIN_VISIBLE = 0.65


@dataclass
class Shape:
    kind: str
    color: str
    cx: float
    cy: float
    r: float  # circumradius / half side
    rot: float
    poly: list | None = None  # vertices (polygon shapes)
    bbox: tuple = (0, 0, 0, 0)  # geometric, original pixels
    area: float = 0.0  # visible pixel count

    def to_json(self) -> dict:
        return {"kind": self.kind, "color": self.color, "bbox": [round(v, 1) for v in self.bbox],
                "visible_area": int(self.area)}


def backgrounds(split: str) -> list[Path]:
    """Every COCO photo of the split under COCO/coco_*/<split>/, deduplicated by file name (first folder in sorted
    order wins), sorted by name: 160 train2017 / 235 val2017 photos in the shared data."""
    want = "train2017" if split == "train" else "val2017"
    seen: dict[str, Path] = {}
    for p in sorted(COCO.glob(f"coco_*/{want}/*.jpg")):
        seen.setdefault(p.name, p)
    paths = [seen[k] for k in sorted(seen)]
    if not paths:
        raise SystemExit(f"no {want} backgrounds under {COCO}")
    return paths


SHAPES_PER_IMAGE = (2, 4)
# Circumscribed diameter as a fraction of the image's shorter side. After LLaVA's pad-to-square and the 336 px
# resize a 4:3 photo's shape spans 3-7 patches of the 24x24 grid: large enough that Acc@0.5 is decided by finding
# the right shape, not by sub-patch precision on a 1.5-patch target (the 9-35 % of the first data sets).
SIZE_RANGE = (0.18, 0.40)
# Probability that a shape after the first repeats a kind already in the scene (else a uniformly drawn kind, which
# may also repeat one). 0.4 made every data set up to big3 and the held-out set; training sets with more scenes of
# 3-4 shapes of one kind (counts of 3 and 4, "the circle at the bottom" among several circles) raise it.
REPEAT_KIND = 0.4


def make_shape(rng: np.random.Generator, kind: str, color: str, w: int, h: int,
               size_range: tuple[float, float] = SIZE_RANGE) -> Shape:
    short = min(w, h)
    r = float(rng.uniform(size_range[0] / 2, size_range[1] / 2)) * short
    cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
    rot = float(rng.uniform(0, 2 * math.pi)) if kind in ("triangle", "star") else 0.0
    s = Shape(kind, color, cx, cy, r, rot)
    if kind == "circle":
        s.bbox = (cx - r, cy - r, cx + r, cy + r)
    else:
        if kind == "square":
            pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        elif kind == "triangle":
            pts = [(cx + r * math.sin(rot + k * 2 * math.pi / 3), cy - r * math.cos(rot + k * 2 * math.pi / 3))
                   for k in range(3)]
        else:  # five-pointed star, inner radius 0.45 r
            pts = []
            for k in range(10):
                rr = r if k % 2 == 0 else 0.45 * r
                a = rot + k * math.pi / 5
                pts.append((cx + rr * math.sin(a), cy - rr * math.cos(a)))
        s.poly = pts
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        s.bbox = (min(xs), min(ys), max(xs), max(ys))
    return s


def shape_mask(s: Shape, w: int, h: int) -> np.ndarray:
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if s.kind == "circle":
        d.ellipse(s.bbox, fill=255)
    else:
        d.polygon(s.poly, fill=255)
    return np.asarray(m) > 0


def place_shapes(rng: np.random.Generator, w: int, h: int, shapes_range: tuple[int, int] = SHAPES_PER_IMAGE,
                 size_range: tuple[float, float] = SIZE_RANGE, repeat_kind: float = REPEAT_KIND) -> list[Shape]:
    n = int(rng.integers(shapes_range[0], shapes_range[1] + 1))
    shapes: list[Shape] = []
    masks: list[np.ndarray] = []
    # Bias towards repeats of a kind / colour so that superlative, positional and relational expressions arise.
    for _ in range(n):
        for _try in range(30):
            if not shapes or rng.random() < 1 - repeat_kind:
                kind = str(rng.choice(SHAPES))
            else:  # repeat a kind already present
                kind = shapes[int(rng.integers(len(shapes)))].kind
            if not shapes or rng.random() < 0.75:
                color = str(rng.choice(list(COLORS)))
            else:  # repeat a colour already present
                color = shapes[int(rng.integers(len(shapes)))].color
            s = make_shape(rng, kind, color, w, h, size_range)
            m = shape_mask(s, w, h)
            full = [int(x.sum()) for x in masks]
            cover = m.copy()
            ok = True
            # every earlier shape must keep >= MIN_VISIBLE of its area after this one is drawn on top
            later = np.zeros_like(m)
            for j in range(len(masks) - 1, -1, -1):
                vis = masks[j] & ~(later | cover)
                if vis.sum() < MIN_VISIBLE * full[j]:
                    ok = False
                    break
                later |= masks[j]
            if ok and m.sum() > 0:
                shapes.append(s)
                masks.append(m)
                break
    occl = np.zeros((h, w), bool)
    for j in range(len(shapes) - 1, -1, -1):
        shapes[j].area = float((masks[j] & ~occl).sum())
        occl |= masks[j]
    return shapes


def draw(img: Image.Image, shapes: list[Shape], rng: np.random.Generator) -> None:
    d = ImageDraw.Draw(img)
    for s in shapes:
        base = np.array(COLORS[s.color], float)
        fill = tuple(int(v) for v in np.clip(base + rng.uniform(-12, 12, 3), 0, 255))
        outline = (20, 20, 20) if s.color != "white" or rng.random() < 0.7 else (90, 90, 90)
        width = max(1, int(round(s.r / 18)))
        if s.kind == "circle":
            d.ellipse(s.bbox, fill=fill, outline=outline, width=width)
        else:
            d.polygon(s.poly, fill=fill, outline=outline, width=width)


def norm_box(b, w: int, h: int) -> list[float]:
    """Original-pixel box -> [0,1] coordinates of the padded square (expand2square, centred, floor offset)."""
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    x1, y1, x2, y2 = b
    return [min(max(v, 0.0), 1.0) for v in ((x1 + ox) / side, (y1 + oy) / side, (x2 + ox) / side, (y2 + oy) / side)]


def cell_geometry(box: list[float], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """For a [0,1] box of the padded square: (mask [grid*grid], raster order, of the cells whose centre lies in the
    box; distance of each cell centre to the box, in cells, 0 inside)."""
    c = (np.arange(grid) + 0.5) / grid
    x1, y1, x2, y2 = box
    inside = ((c[:, None] >= y1) & (c[:, None] <= y2) & (c[None, :] >= x1) & (c[None, :] <= x2)).reshape(-1)
    dx = np.maximum(np.maximum(x1 - c, c - x2), 0)[None, :]
    dy = np.maximum(np.maximum(y1 - c, c - y2), 0)[:, None]
    return inside, (np.sqrt(dx ** 2 + dy ** 2) * grid).reshape(-1)


def fmt_box(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in v) + "]"


def center(s: Shape):
    x1, y1, x2, y2 = s.bbox
    return (x1 + x2) / 2, (y1 + y2) / 2


def referring_expressions(shapes: list[Shape], w: int, h: int) -> list[tuple[str, str, int, bool]]:
    """All unambiguous (qtype, expression, target index, has_colour) for this scene."""
    out = []
    by_kind = {k: [i for i, s in enumerate(shapes) if s.kind == k] for k in SHAPES}
    by_kc: dict = {}
    for i, s in enumerate(shapes):
        by_kc.setdefault((s.color, s.kind), []).append(i)

    def name(i: int) -> tuple[str, bool] | None:
        """Shortest unique attribute name of shape i."""
        s = shapes[i]
        if len(by_kind[s.kind]) == 1:
            return f"the {s.kind}", False
        if len(by_kc[(s.color, s.kind)]) == 1:
            return f"the {s.color} {s.kind}", True
        return None

    for i, s in enumerate(shapes):
        if len(by_kc[(s.color, s.kind)]) == 1:
            out.append(("attr", f"the {s.color} {s.kind}", i, True))
        if len(by_kind[s.kind]) == 1:
            out.append(("attr", f"the {s.kind}", i, False))
    for k, idx in by_kind.items():
        if len(idx) >= 2:
            areas = sorted(((shapes[i].area, i) for i in idx), reverse=True)
            if areas[0][0] >= 1.6 * areas[1][0]:
                out.append(("superl", f"the largest {k}", areas[0][1], False))
            if areas[-2][0] >= 1.6 * areas[-1][0]:
                out.append(("superl", f"the smallest {k}", areas[-1][1], False))
    # position among candidates of the same kind (optionally the same colour too)
    groups = [(f"{k}", idx, False) for k, idx in by_kind.items()] + \
             [(f"{c} {k}", idx, True) for (c, k), idx in by_kc.items()]
    for label, idx, has_c in groups:
        if len(idx) < 2:
            continue
        for word, axis, sign, side in (("at the bottom", 1, 1, h), ("at the top", 1, -1, h),
                                       ("on the left", 0, -1, w), ("on the right", 0, 1, w)):
            vals = sorted(((sign * center(shapes[i])[axis], i) for i in idx), reverse=True)
            if vals[0][0] - vals[1][0] >= 0.15 * side:
                out.append(("position", f"the {label} {word}", vals[0][1], has_c))
    # relations: "the <kind> <rel> <anchor name>"
    rels = (("left of", lambda t, a: t.bbox[2] < a.bbox[0]), ("right of", lambda t, a: t.bbox[0] > a.bbox[2]),
            ("above", lambda t, a: t.bbox[3] < a.bbox[1]), ("below", lambda t, a: t.bbox[1] > a.bbox[3]))
    for a in range(len(shapes)):
        an = name(a)
        if an is None:
            continue
        for k in SHAPES:
            cands = [i for i in by_kind[k] if i != a]
            if len(cands) < 2 and not (len(cands) == 1 and len(by_kind[k]) >= 2):
                continue  # only when the relation is needed to pick among >= 2 shapes of that kind
            for word, test in rels:
                hits = [i for i in cands if test(shapes[i], shapes[a])]
                if len(hits) == 1:
                    out.append(("relation", f"the {k} {word} {an[0]}", hits[0], an[1]))
    return out


def with_suffix(rng, q: str) -> str:
    return q + SUFFIX if rng.random() < 0.5 else q


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_items(rng: np.random.Generator, i: int, shapes: list[Shape], w: int, h: int, rel_image: str,
               n_ground: int, vqa_rounds: int = 1) -> list[dict]:
    items = []
    exprs = referring_expressions(shapes, w, h)
    # grounding: prefer variety of expression types (uniform over types present, then over expressions)
    types = sorted({e[0] for e in exprs})
    used, targets = set(), set()
    while len(used) < n_ground and types:
        t = types[int(rng.integers(len(types)))]
        pool = [e for e in exprs if e[0] == t and e[1] not in used]
        if not pool:
            types.remove(t)
            continue
        fresh = [e for e in pool if e[2] not in targets]  # prefer a shape not asked about yet
        pool = fresh or pool
        qt, expr, tgt, _ = pool[int(rng.integers(len(pool)))]
        used.add(expr)
        targets.add(tgt)
        s = shapes[tgt]
        bbox = [round(v, 1) for v in s.bbox]
        items.append({"image": rel_image, "kind": "grounding", "prompt": REC_PROMPT.format(expr),
                      "bbox": bbox, "answer": fmt_box(norm_box(s.bbox, w, h)), "expr": expr, "qtype": qt,
                      "target": int(tgt)})
    asked: set[str] = set()

    def ask(q: str, answer: str, qtype: str) -> None:
        if q not in asked:
            asked.add(q)
            items.append({"image": rel_image, "kind": "vqa", "prompt": with_suffix(rng, q), "answer": answer,
                          "qtype": qtype})

    present = sorted({(s.color, s.kind) for s in shapes})
    colours, kinds = {c for c, _ in present}, {k for _, k in present}
    absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    adversarial = [(c, k) for c, k in absent if c in colours or k in kinds]
    cands = [e for e in exprs if not e[3]]
    kinds_present = sorted(kinds)
    for r in range(vqa_rounds):
        # existence, balanced: round r of image i asks about a present (colour, shape) when i + r is even, an absent
        # one otherwise (half of the negatives adversarial: the colour or the shape is present)
        if (i + r) % 2 == 0:
            c, k = present[int(rng.integers(len(present)))]
            ans = "yes"
        else:
            pool = adversarial if adversarial and rng.random() < 0.5 else absent
            c, k = pool[int(rng.integers(len(pool)))]
            ans = "no"
        ask(f"Is there {article(c)} {c} {k} in the image?", ans, "exist")
        # colour of a shape named without its colour
        if cands:
            _, expr, tgt, _ = cands[int(rng.integers(len(cands)))]
            ask(f"What color is {expr}?", shapes[tgt].color, "color")
        # count of a kind (present kinds 85 % of the time)
        k = str(rng.choice(kinds_present)) if rng.random() < 0.85 else str(rng.choice(SHAPES))
        ask(f"How many {PLURAL[k]} are there in the image?", str(sum(1 for s in shapes if s.kind == k)), "count")
    return items


PATCH_LABELS = 1 + len(COLORS) * len(SHAPES)  # 0 = background, 1 + colour_index * 4 + shape_index


def patch_labels(shapes: list[Shape], instances: np.ndarray) -> np.ndarray:
    """Per-patch scene labels from patch_instances' map: 0 = background, else 1 + colour_index * 4 + shape_index of
    the shape covering the patch. Training-only auxiliary targets (train.py --aux)."""
    cols = list(COLORS)
    lut = np.array([0] + [1 + cols.index(s.color) * len(SHAPES) + SHAPES.index(s.kind) for s in shapes], np.uint8)
    return lut[instances]


def patch_instances(shapes: list[Shape], w: int, h: int, size: int = 336, patch: int = 14) -> np.ndarray:
    """[(size/patch)^2] uint8 over the padded square model input (expand2square, centred, as norm_box), in raster
    order: 1 + the index of the visible shape covering the largest share of the patch if that share is >= 1/3,
    else 0 (background)."""
    lab = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(lab)
    for i, s in enumerate(shapes):  # drawing order = occlusion order, as draw()
        if s.kind == "circle":
            d.ellipse(s.bbox, fill=i + 1)
        else:
            d.polygon(s.poly, fill=i + 1)
    side = max(w, h)
    sq = Image.new("L", (side, side), 0)
    sq.paste(lab, ((side - w) // 2, (side - h) // 2))
    a = np.asarray(sq.resize((size, size), Image.NEAREST))
    g = size // patch
    blocks = a.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    counts = np.stack([(blocks == v).sum(1) for v in range(len(shapes) + 1)], 1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    return np.where(counts.max(1) * 3 >= patch * patch, best, 0).astype(np.uint8)


def generate_one(split: str, seed: int, i: int, bgs: list[Path], perm: np.ndarray, n_ground: int = 2,
                 vqa_rounds: int = 1, shapes_range: tuple[int, int] = SHAPES_PER_IMAGE,
                 size_range: tuple[float, float] = SIZE_RANGE, repeat_kind: float = REPEAT_KIND):
    """Image i of (seed, split): (PIL image, items, scene record, shapes). The image and its shapes depend only on
    (seed, split, i); the items also on n_ground and vqa_rounds."""
    rng = np.random.default_rng([seed, SPLIT_CODE[split], i])
    bg = bgs[perm[i % len(bgs)]]
    img = Image.open(bg).convert("RGB")
    if split == "train" and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = img.size
    shapes = place_shapes(rng, w, h, shapes_range, size_range, repeat_kind)
    draw(img, shapes, rng)
    rel = f"images/{i:06d}.jpg"
    items = make_items(rng, i, shapes, w, h, rel, n_ground, vqa_rounds)
    scene = {"image": rel, "background": str(bg.relative_to(COCO)), "width": w, "height": h,
             "shapes": [s.to_json() for s in shapes]}
    return img, items, scene, shapes


def background_order(split: str, seed: int) -> tuple[list[Path], np.ndarray]:
    bgs = backgrounds(split)
    return bgs, np.random.default_rng([seed, SPLIT_CODE[split]]).permutation(len(bgs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", choices=["train", "heldout"], required=True)
    p.add_argument("--n", type=int, required=True, help="number of images (each yields ~2 grounding + 3 VQA items)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--start", type=int, default=0, help="first image index (resume / shard); appends to the jsonl")
    p.add_argument("--grounding-per-image", type=int, default=2)
    p.add_argument("--vqa-rounds", type=int, default=1, help="rounds of exist / colour / count questions per image")
    p.add_argument("--quality", type=int, default=92, help="JPEG quality")
    args = p.parse_args()
    bgs, perm = background_order(args.split, args.seed)
    out: Path = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    mode = "a" if args.start > 0 else "w"
    jl = open(out / f"{args.split}.jsonl", mode)
    sc = open(out / f"{args.split}.scenes.jsonl", mode)
    counts: dict = {}
    for i in range(args.start, args.n):
        img, items, scene, _ = generate_one(args.split, args.seed, i, bgs, perm, args.grounding_per_image,
                                           args.vqa_rounds)
        rel = scene["image"]
        img.save(out / rel, quality=args.quality)
        for it in items:
            jl.write(json.dumps(it) + "\n")
            key = (it["kind"], it["qtype"], it["answer"] if it["qtype"] == "exist" else "")
            counts[key] = counts.get(key, 0) + 1
        sc.write(json.dumps(scene) + "\n")
        if (i + 1) % 200 == 0:
            print(f"[data] {i + 1}/{args.n}", flush=True)
    jl.close()
    sc.close()
    n_g = sum(v for k, v in counts.items() if k[0] == "grounding")
    n_v = sum(v for k, v in counts.items() if k[0] == "vqa")
    print(f"[data] {args.split}: images {args.start}..{args.n}, {n_g} grounding + {n_v} vqa items -> {out}")
    for k in sorted(counts):
        print(f"  {'/'.join(x for x in k if x)}: {counts[k]}")


if __name__ == "__main__":
    main()
