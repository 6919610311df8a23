#!/usr/bin/env python3
"""Store a tied lm_head once: convert an exported model directory whose quantised decoder tail carries lm_head as
its own weight (manifest `decoder.tail.logits`) to the `decoder.tail.final_hidden` form, where the tail ends at the
final norm and the runtime multiplies by the embedding table it already memory-maps (docs/model-format.md).

    .venv/bin/python onnx/share_lm_head.py models/nuwa-demo [--image examples/shapes-tennis.jpg] [--steps 24]

What export_llava.py --lm-head table does at export time, for a directory that was exported without it (no
checkpoint needed; the export venv, as its onnxruntime replay imports torch). The conversion is made on a copy of
the directory and checked before anything in the original is replaced: the same prompt (one image, a grounding question) runs through the old directory greedily and
through the new one teacher-forced on the old tokens, both with onnxruntime as the Rust runtime drives the graphs;
it fails (and changes nothing) unless the logits agree to within the two lm_head quantisations' difference (cosine
>= 0.999 at every step) and every greedy token whose reference top-2 margin exceeds the largest logit difference is
the same. A tail that is not tied to the table fails the cosine check by far.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nuwa_export import export as ex  # noqa: E402
from nuwa_export import manifest as mf  # noqa: E402
from nuwa_export import verify as vf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: the red circle."
MIN_COSINE = 0.999


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="model directory (manifest.json with decoder.tail.logits)")
    p.add_argument("--image", type=Path, default=ROOT / "examples" / "shapes-tennis.jpg", help="image of the check")
    p.add_argument("--prompt", default=PROMPT, help="user text of the check")
    p.add_argument("--steps", type=int, default=24, help="logit steps compared (prefill + decode)")
    return p.parse_args(argv)


def pixel_values(image: Path, spec: dict) -> np.ndarray:
    """The manifest's preprocessing (docs/model-format.md, PIL's filters): the check needs the same input for both
    directories and a realistic one, not the runtime's exact pixels."""
    from PIL import Image

    img = Image.open(image).convert("RGB")
    w, h = img.size
    W, H = spec["width"], spec["height"]
    filt = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[spec["interpolation"]]
    if spec["resize"] == "pad":
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(spec["pad_color"]))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square.resize((W, H), filt)
    elif spec["resize"] == "crop":
        s = max(W / w, H / h)
        rw, rh = max(W, round(w * s)), max(H, round(h * s))
        img = img.resize((rw, rh), filt)
        left, top = (rw - W) // 2, (rh - H) // 2
        img = img.crop((left, top, left + W, top + H))
    elif spec["resize"] == "stretch":
        img = img.resize((W, H), filt)
    else:
        raise SystemExit(f"image.resize {spec['resize']!r} is not a policy of docs/model-format.md")
    x = np.asarray(img, np.float32) * spec["rescale"]
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def refuse(model: Path) -> None:
    """Stops on a directory the conversion does not apply to (before anything is copied)."""
    mpath = model / "manifest.json"
    m = json.loads(mpath.read_text())
    tail, emb = m["decoder"]["tail"], m["embeddings"]
    if "logits" not in tail:
        raise SystemExit(f"{mpath}: decoder.tail has no `logits` (already converted?)")
    if emb["file"] == tail["file"] + ".data":
        raise SystemExit(f"{mpath}: the embedding table already lives in the tail's weights (stored once)")


def convert(work: Path) -> list[str]:
    """Cut the lm_head off `work`'s tail graph in place and rewrite its manifest."""
    mpath = work / "manifest.json"
    m = json.loads(mpath.read_text())
    tail, emb = m["decoder"]["tail"], m["embeddings"]
    dropped = ex.tail_to_final_hidden(work / tail["file"], work / tail["file"], m["decoder"]["hidden_size"],
                                      logits=tail["logits"])
    new_tail = {}
    for k, v in tail.items():  # keep the manifest's key order, `final_hidden` where `logits` was
        if k == "logits":
            new_tail["final_hidden"] = "final_hidden"
        else:
            new_tail[k] = v
    m["decoder"]["tail"] = new_tail
    q = m.setdefault("quantization", {}).setdefault("decoder", {})
    q["lm_head"] = f"the {emb['dtype']} embedding table, applied by the runtime (onnx/share_lm_head.py)"
    mpath.write_text(json.dumps(m, indent=2) + "\n")
    return dropped


def check(old_dir: Path, new_dir: Path, image: Path, text: str, steps: int) -> dict:
    m = json.loads((old_dir / "manifest.json").read_text())
    v = m["vision"]
    ids = mf.runtime_input_ids(str(old_dir / m["tokenizer"]["file"]), m["prompt"], m["tokenizer"], v["grid_h"] * v["grid_w"],
                               text)
    pv = pixel_values(image, m["image"])
    old = vf.OrtModel(old_dir)
    ref = old.generate(ids, pv, steps)  # greedy
    forced = ref["argmax"]
    del old
    got = vf.OrtModel(new_dir).generate(ids, pv, forced)
    a, b = ref["step_logits"].astype(np.float64), got["step_logits"].astype(np.float64)
    err = float(np.abs(a - b).max())
    cos = [vf.cosine(x, y) for x, y in zip(a, b)]
    top2 = np.sort(a, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    changed = [i for i, (x, y) in enumerate(zip(ref["argmax"], got["argmax"])) if x != y]
    decisive = [i for i in changed if margin[i] > err]
    return {"steps": steps, "max_abs": err, "logit_range": float(np.abs(a).max()), "min_cosine": min(cos),
            "tokens_changed": changed, "changed_with_margin": decisive, "tokens": ref["argmax"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    src: Path = args.model.resolve()
    if not (src / "manifest.json").is_file():
        raise SystemExit(f"{src} has no manifest.json")
    if not args.image.is_file():
        raise SystemExit(f"--image {args.image} not found")
    refuse(src)
    with tempfile.TemporaryDirectory(prefix="share-lm-head-", dir=src.parent) as tmp:
        work = Path(tmp) / src.name
        shutil.copytree(src, work)
        before = sum(f.stat().st_size for f in src.iterdir() if f.is_file())
        dropped = convert(work)
        after = sum(f.stat().st_size for f in work.iterdir() if f.is_file())
        print(f"[share] dropped {', '.join(dropped)}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
        r = check(src, work, args.image, args.prompt, args.steps)
        print(f"[share] {r['steps']} steps: max |logit diff| {r['max_abs']:.4g} (logits reach {r['logit_range']:.3g}), "
              f"min cosine {r['min_cosine']:.6f}, greedy tokens changed at steps {r['tokens_changed']}")
        if r["min_cosine"] < MIN_COSINE:
            raise SystemExit(f"[share] FAILED: logits cosine {r['min_cosine']:.6f} < {MIN_COSINE}: the tail's lm_head "
                             f"is not the embedding table (untied?); {src} is unchanged")
        if r["changed_with_margin"]:
            raise SystemExit(f"[share] FAILED: greedy tokens changed at steps {r['changed_with_margin']} where the "
                             f"reference top-2 margin exceeds the largest logit difference; {src} is unchanged")
        m = json.loads((work / "manifest.json").read_text())
        tail = m["decoder"]["tail"]["file"]
        for name in (tail, tail + ".data", "manifest.json"):
            if (work / name).exists():
                shutil.copyfile(work / name, src / name)
    print(f"[share] {src}: decoder.tail.final_hidden, lm_head = {m['embeddings']['file']}")


if __name__ == "__main__":
    main()
