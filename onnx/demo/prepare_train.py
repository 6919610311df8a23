"""Training data + cached vision features for the demo VLM, in resumable shards.

  .venv/bin/python onnx/demo/prepare_train.py --n 6000 --seed 1 --out .cache/demo-train

For every training image i in [0, n) (make_data.generate_one(split="train", seed, i): the same seeded generator
as onnx/demo/make_data.py, train2017 backgrounds at their own size / aspect ratio, --grounding-per-image grounding
items (default 4, as many unambiguous expressions as exist) + exist / colour / count VQA items) this writes the JPEG
and runs the EXPORTED vision tower (default .cache/dinov2-336/vision.int8.onnx, the graph the runtime loads:
export_llava.py --quantize-vision int8 writes the identical quantize_dynamic graph) on it, keeping `features`
[576, 384] (hidden_states[-2], CLS dropped) as float16.

Preprocessing: the JPEG is read back from disk (so the decoder sees the same bytes the runtime would) and turned
into pixel_values by transformers' LlavaImageProcessorPil configured exactly as the checkpoint's
preprocessor_config.json (policy `pad`: expand2square with int(mean*255), bicubic 336, rescale, DINOv2 mean/std).
That processor is the reference the exporter verifies the runtime's own resize against (manifest `image` section).

Layout of --out:
  meta.json                      n, seed, shard size, vision graph (size + sha256), preprocessing, grounding/img
  processor/                     the LlavaProcessor (SmolLM2 tokenizer + <image>, chat template, image processor)
  images/NNNNNN.jpg              the training images (--no-images to skip keeping them)
  shard-KKKK/items.jsonl         items of images [K*S, (K+1)*S), with "index" (global image index) and "local"
  shard-KKKK/features.f16.npy    [S, 576, 384] float16 (np.load(..., mmap_mode="r"))
  shard-KKKK/labels.u8.npy       [S, 576] uint8 per-patch scene labels (make_data.patch_labels: background or
                                 colour x shape), the auxiliary targets of train.py
  shard-KKKK/instances.u8.npy    [S, 576] uint8 per-patch shape instance (make_data.patch_instances: 0 or 1 + the
                                 index of the shape; grounding items name theirs in "target")
  shard-KKKK/DONE                written last; shards with DONE are skipped on a re-run (resumable; a killed shard
                                 is redone from its start)

--relabel rewrites items.jsonl and labels.u8.npy of the finished shards for new --grounding-per-image /
--vqa-rounds without running the tower again (the images and shapes do not depend on them; the first image of every
shard is regenerated and compared byte for byte with the kept JPEG to prove it).

Extraction time is dominated by the tower: ~90-500 ms/image on this 2-core VM depending on load (int8).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402
import make_data  # noqa: E402


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def parse_range(flag: str, text: str, conv, lo, hi, what: str):
    """`MIN-MAX` (or one value) of `conv` numbers with lo <= MIN <= MAX <= hi, or exit naming `flag`."""
    a, _, b = text.partition("-")
    try:
        r = (conv(a), conv(b or a))
    except ValueError:
        r = None
    if r is None or not lo <= r[0] <= r[1] <= hi:
        raise SystemExit(f"{flag} {text}: want MIN-MAX {what}, {lo} <= MIN <= MAX <= {hi}")
    return r


def shapes_range(text: str) -> tuple[int, int]:
    return parse_range("--shapes", text, int, 1, 6, "shapes per image")


def size_range(text: str) -> tuple[float, float]:
    lo, hi = parse_range("--sizes", text, float, 2, 90, "percent of the shorter side")
    return lo / 100, hi / 100


def generate(args, i: int, lo: int, bgs, perm):
    """Image i of the set: (PIL image, its items with shard fields, patch labels, patch instances)."""
    img, its, scene, shapes = make_data.generate_one("train", args.seed, i, bgs, perm, args.grounding_per_image,
                                                     args.vqa_rounds, shapes_range(args.shapes),
                                                     size_range(args.sizes), args.repeat_kind)
    inst = make_data.patch_instances(shapes, scene["width"], scene["height"])
    items = [{**it, "index": i, "local": i - lo, "width": scene["width"], "height": scene["height"]} for it in its]
    return img, scene, items, make_data.patch_labels(shapes, inst), inst


def relabel(out: Path, meta: dict, args, bgs, perm) -> None:
    S, t0, n_items = args.shard_size, time.perf_counter(), 0
    for k in range(10 ** 6):
        d = out / f"shard-{k:04d}"
        if not (d / "DONE").exists():
            break
        lo = k * S
        hi = lo + len(np.load(d / "features.f16.npy", mmap_mode="r"))
        items, labels = [], np.zeros((hi - lo, dc.N_IMAGE_TOKENS), np.uint8)
        inst = np.zeros_like(labels)
        for i in range(lo, hi):
            img, scene, its, labels[i - lo], inst[i - lo] = generate(args, i, lo, bgs, perm)
            if i == lo and (out / scene["image"]).exists():
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=args.quality)
                if buf.getvalue() != (out / scene["image"]).read_bytes():
                    raise SystemExit(f"{out / scene['image']}: the generator no longer reproduces this image; "
                                     "relabelling would mismatch the cached features")
            items += its
        (d / "items.jsonl.tmp").write_text("".join(json.dumps(it) + "\n" for it in items))
        os.replace(d / "items.jsonl.tmp", d / "items.jsonl")
        np.save(d / "labels.u8.npy", labels)
        np.save(d / "instances.u8.npy", inst)
        n_items += len(items)
        print(f"[relabel] shard {k}: images {lo}..{hi}, {len(items)} items, {time.perf_counter() - t0:.0f} s",
              flush=True)
    meta_path = out / "meta.json"
    m = json.loads(meta_path.read_text())
    m["grounding_per_image"], m["vqa_rounds"] = args.grounding_per_image, args.vqa_rounds
    meta_path.write_text(json.dumps(m, indent=2) + "\n")
    print(f"[relabel] {n_items} items in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, required=True, help="number of training images")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=dc.CACHE / "demo-train")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--grounding-per-image", type=int, default=12)
    p.add_argument("--vqa-rounds", type=int, default=2)
    lo, hi = make_data.SHAPES_PER_IMAGE
    p.add_argument("--shapes", default=f"{lo}-{hi}", help="shapes per image, MIN-MAX (1-2: an easy curriculum set)")
    lo, hi = make_data.SIZE_RANGE
    p.add_argument("--sizes", default=f"{lo * 100:g}-{hi * 100:g}",
                   help="shape diameter, MIN-MAX percent of the image's shorter side")
    p.add_argument("--repeat-kind", type=float, default=make_data.REPEAT_KIND,
                   help="probability that a shape after the first repeats a kind already present (more scenes with "
                        "3-4 shapes of one kind: counts of 3-4, positional qualifiers among shapes of a kind)")
    p.add_argument("--relabel", action="store_true", help="rewrite items + labels of finished shards (no tower run)")
    p.add_argument("--vision", type=Path, default=dc.VISION_336 / "vision.int8.onnx")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quality", type=int, default=92, help="JPEG quality (make_data.py default)")
    p.add_argument("--no-images", action="store_true", help="do not keep the JPEGs (features only)")
    args = p.parse_args()
    if not 0 <= args.repeat_kind <= 1:
        raise SystemExit(f"--repeat-kind {args.repeat_kind}: want a probability in [0, 1]")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.vision.exists():
        raise SystemExit(f"{args.vision} missing: run onnx/demo/export_vision.py (see onnx/demo/README.md)")

    meta_path = out / "meta.json"
    meta = {"split": "train", "seed": args.seed, "shard_size": args.shard_size,
            "grounding_per_image": args.grounding_per_image, "vqa_rounds": args.vqa_rounds, "quality": args.quality,
            "shapes": args.shapes, "sizes": args.sizes, "repeat_kind": args.repeat_kind,
            "vision": {"file": str(args.vision), "bytes": args.vision.stat().st_size, "sha256": sha256(args.vision),
                       "output": "features", "dtype": "float16"},
            "preprocessing": "LlavaImageProcessorPil (demo_common.build_processor): pad 336 bicubic, DINOv2 mean/std"}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        for k in ("seed", "shard_size", "grounding_per_image", "vqa_rounds", "quality", "shapes", "sizes",
                  "repeat_kind"):
            if args.relabel and k in ("grounding_per_image", "vqa_rounds"):
                continue
            # keys an older meta.json lacks: the values those sets were made with
            was = old.get(k, {"vqa_rounds": 1, "shapes": "2-6", "sizes": "9-35",
                              "repeat_kind": make_data.REPEAT_KIND}.get(k))
            if was != meta[k]:
                raise SystemExit(f"{out} was prepared with {k}={was} (now {meta[k]}): use another --out")
        if old["vision"]["sha256"] != meta["vision"]["sha256"]:
            raise SystemExit(f"{out} was extracted with another vision graph ({old['vision']['file']})")
    meta["n"] = max(args.n, json.loads(meta_path.read_text())["n"] if meta_path.exists() else 0)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    if (out / "processor" / "tokenizer.json").exists():
        processor = dc.load_processor(out / "processor")
    else:
        processor = dc.build_processor()
        processor.save_pretrained(str(out / "processor"))
    ip = processor.image_processor
    sess = dc.ort_session(args.vision, args.threads)
    bgs, perm = make_data.background_order("train", args.seed)
    (out / "images").mkdir(exist_ok=True)
    S = args.shard_size
    if args.relabel:
        relabel(out, meta, args, bgs, perm)
        return

    n_shards = (args.n + S - 1) // S
    t_all, n_done, t_vision = time.perf_counter(), 0, 0.0
    for k in range(n_shards):
        d = out / f"shard-{k:04d}"
        lo, hi = k * S, min((k + 1) * S, args.n)
        if (d / "DONE").exists() and (d / "DONE").read_text().strip() == f"images {lo}..{hi}":
            continue  # done (a last shard done with a smaller --n is redone to its new size)
        d.mkdir(exist_ok=True)
        (d / "DONE").unlink(missing_ok=True)
        feats = np.lib.format.open_memmap(d / "features.f16.npy.tmp", mode="w+", dtype=np.float16,
                                          shape=(hi - lo, dc.N_IMAGE_TOKENS, 384))
        items = []
        labels = np.zeros((hi - lo, dc.N_IMAGE_TOKENS), np.uint8)
        inst = np.zeros_like(labels)
        t_shard = time.perf_counter()
        for i in range(lo, hi):
            img, scene, its, labels[i - lo], inst[i - lo] = generate(args, i, lo, bgs, perm)
            items += its
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=args.quality)
            data = buf.getvalue()
            if not args.no_images:
                (out / scene["image"]).write_bytes(data)
            img = Image.open(io.BytesIO(data)).convert("RGB")
            pv = ip(images=img, return_tensors="np")["pixel_values"].astype(np.float32)
            t = time.perf_counter()
            f = sess.run(["features"], {"pixel_values": pv})[0]
            t_vision += time.perf_counter() - t
            feats[i - lo] = f[0].astype(np.float16)
            n_done += 1
        feats.flush()
        del feats
        os.replace(d / "features.f16.npy.tmp", d / "features.f16.npy")
        (d / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
        np.save(d / "labels.u8.npy", labels)
        np.save(d / "instances.u8.npy", inst)
        (d / "DONE").write_text(f"images {lo}..{hi}\n")
        dt = time.perf_counter() - t_shard
        el = time.perf_counter() - t_all
        print(f"[prepare] shard {k + 1}/{n_shards} images {lo}..{hi}: {len(items)} items, {dt:.1f} s "
              f"({1e3 * dt / (hi - lo):.0f} ms/image total, vision {1e3 * t_vision / n_done:.0f} ms/image mean); "
              f"load {os.getloadavg()[0]:.1f}; ETA {(n_shards - k - 1) * el / max(1, n_done) * S / 60:.1f} min",
              flush=True)
    done = sorted(out.glob("shard-*/DONE"))[:n_shards]
    print(f"[prepare] {len(done)}/{n_shards} shards done in {out}"
          + (f"; this run: {n_done} images, vision {1e3 * t_vision / n_done:.0f} ms/image, total "
             f"{1e3 * (time.perf_counter() - t_all) / n_done:.0f} ms/image" if n_done else ""))


if __name__ == "__main__":
    main()
