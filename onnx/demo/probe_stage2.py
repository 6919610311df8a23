"""Diagnostic: is Stage 2's grounding loss a matter of WHICH 16 tokens it keeps, or of the tail layers needing more
than the target's own tokens to write a box?

  .venv/bin/python onnx/demo/recover_checkpoint.py --model models/nuwa-demo --out .cache/demo-ckpt-from-t
  .venv/bin/python onnx/demo/probe_stage2.py --ckpt .cache/demo-ckpt-from-t/last.pt --keep 16

Not part of the model. For the held-out grounding items, the checkpoint's decoder runs split exactly as the runtime
runs it with `--keep1 576 --keep2 N` (onnx/nuwa_export/decoder.py's DecoderHead / DecoderTail, PyTorch, greedy):
layers [0, K) see the whole prompt, the split layer's attention row (last prompt token, head mean, layer K-1) is
taken from the prefill, and layers [K, L) see the text plus only the image positions a SELECTION keeps, at their
original positions; decoding continues through both parts. Every selection is scored on the same items:

* `none`: every image token (the unpruned model);
* `signal`: Nüwa Stage 2, the top-N image positions of the attention row (ties to the lower index), the runtime's;
* `target+signal`: the target's cells first (highest row value first), the rest by the row: a selection that
  always has the target, and otherwise Stage 2's context;
* `target+near`: the target's cells first, then the cells nearest the target's box: the target and what borders
  it, no distant shape;
* `target-only`: the target's cells alone (however many: can be more or fewer than N);
* `signal-notarget`: the top-N of the row among the cells off the target (what the box is written from when Stage 2
  misses the target entirely);
* `random`: N random image positions (seeded per --seed, item and selection);
* `shapes-only`, `photo-only`, `all-but-target` (N does not apply): every cell of every shape in the scene; every
  cell of the photo (not the padding); every cell but the target's;
* `target+background`: the target's cells plus N random cells (seeded likewise) of the photo that lie on no shape.

A target cell is a patch whose centre lies in the target's box in the padded square (the eval's target-cell
count). A hit is IoU >= 0.5 between the predicted box and the target box, both in the padded square's [0, 1]
coordinates. Vision features come from the raw tower graph (.cache/dinov2-336/vision.int8.onnx) plus the
checkpoint's vision position table, as in training; the recovered decoder is the shipped int8 weights in fp32.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402
import make_data  # noqa: E402
import train as T  # noqa: E402
from make_data import cell_geometry  # noqa: E402
from probe_grounding import iou  # noqa: E402
from nuwa_export.decoder import DecoderHead, DecoderTail  # noqa: E402

HELDOUT = dc.REPO / "data" / "heldout"
SELECTIONS = ("none", "signal", "target+signal", "target+near", "target-only", "signal-notarget", "random",
              "shapes-only", "photo-only", "all-but-target", "target+background")
BOX = re.compile(r"\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]")


def select(name: str, row: np.ndarray, inside: np.ndarray, dist: np.ndarray, keep: int,
           rng: np.random.Generator, shapes: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """Sorted image-token indices (0..575) the tail layers keep under selection `name` (`inside`, `shapes`,
    `photo`: cell masks of the target, of every shape, of the photo)."""
    n = row.shape[0]
    by_row = np.lexsort((np.arange(n), -row))  # row value descending, ties to the lower index
    if name == "none":
        return np.arange(n)
    if name == "signal":
        pick = by_row[:keep]
    elif name == "target+signal":
        pick = np.concatenate([by_row[inside[by_row]], by_row[~inside[by_row]]])[:keep]
    elif name == "target+near":
        pick = np.concatenate([by_row[inside[by_row]], np.lexsort((np.arange(n), dist))])
        pick = pick[np.sort(np.unique(pick, return_index=True)[1])][:keep]
    elif name == "target-only":
        pick = np.flatnonzero(inside) if inside.any() else np.argsort(dist, kind="stable")[:1]
    elif name == "signal-notarget":
        pick = by_row[~inside[by_row]][:keep]
    elif name == "random":
        pick = rng.choice(n, size=keep, replace=False)
    elif name in ("shapes-only", "photo-only", "all-but-target"):
        pick = np.flatnonzero({"shapes-only": shapes, "photo-only": photo, "all-but-target": ~inside}[name])
    elif name == "target+background":
        bg = np.flatnonzero(photo & ~shapes)
        pick = np.concatenate([np.flatnonzero(inside), rng.choice(bg, size=min(keep, bg.size), replace=False)])
    else:
        raise ValueError(name)
    return np.sort(pick)


class SplitDecoder:
    """The runtime's two-part decode (head over every position, tail over the kept ones) with explicit KV."""

    def __init__(self, lm, split: int):
        cfg = lm.config
        self.head = DecoderHead(lm.model, split).eval()
        self.tail = DecoderTail(lm.model, lm.lm_head, split).eval()
        self.embed = lm.model.embed_tokens
        self.split, self.n_layers = split, cfg.num_hidden_layers
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.empty = torch.zeros(1, 0, cfg.num_key_value_heads, hd)

    @staticmethod
    def _append(past, new):
        return [torch.cat([p, n], dim=1) for p, n in zip(past, new)]

    def prefill_head(self, embeds: torch.Tensor):
        L = embeds.shape[1]
        h, row, *kv = self.head(embeds, torch.arange(L)[None], *[self.empty] * (2 * self.split))
        return h, row[0], kv

    def generate(self, h: torch.Tensor, head_kv, keep_pos: torch.Tensor, eos: int, max_new: int) -> list[int]:
        """Tail prefill over positions `keep_pos` of the head's output, then greedy decoding through both parts."""
        out = self.tail(h[:, keep_pos], keep_pos[None], *[self.empty] * (2 * (self.n_layers - self.split)))
        logits, tail_kv = out[0], list(out[1:])
        pos, toks = h.shape[1], []
        for _ in range(max_new):
            t = int(logits[0].argmax())
            if t == eos:
                break
            toks.append(t)
            p = torch.tensor([[pos]])
            h1, _row, *nkv = self.head(self.embed(torch.tensor([[t]])), p, *head_kv)
            head_kv = self._append(head_kv, nkv)
            o = self.tail(h1, p, *tail_kv)
            logits, tail_kv = o[0], self._append(tail_kv, list(o[1:]))
            pos += 1
        return toks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="train.py checkpoint (e.g. recover_checkpoint.py's)")
    p.add_argument("--processor", type=Path,
                   help="processor dir (default: the one beside --ckpt, as recover_checkpoint.py writes it)")
    p.add_argument("--vision", type=Path, default=dc.VISION_336 / "vision.int8.onnx")
    p.add_argument("--split", type=int, default=3, help="first tail layer (the shipped model's split_layer)")
    p.add_argument("--keep", type=int, default=16, help="image tokens the tail keeps (Stage 2 at budget 64: 16)")
    p.add_argument("--selections", nargs="+", default=list(SELECTIONS[:7]), choices=SELECTIONS)
    p.add_argument("--items", type=int, default=0, help="first N grounding items (0: all)")
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write per-item results here (JSON lines)")
    args = p.parse_args()
    args.processor = args.processor or args.ckpt.parent / "processor"
    for f in (args.ckpt, args.vision, args.processor):
        if not f.exists():
            raise SystemExit(f"{f} missing (see onnx/demo/README.md)")
    if args.keep < 1 or args.max_new < 1 or args.items < 0 or args.seed < 0:
        p.error("--keep and --max-new must be >= 1, --items and --seed >= 0")
    torch.set_num_threads(args.threads)
    proc = dc.load_processor(args.processor)
    rule = dc.PromptRule(proc)
    cfg, proj, lm, vpos = T.load_for_eval(args.ckpt, proc)
    if not 1 <= args.split < cfg.text_config.num_hidden_layers:
        p.error(f"--split {args.split}: the decoder has layers 0..{cfg.text_config.num_hidden_layers - 1}")
    dec = SplitDecoder(lm, args.split)
    sess = dc.ort_session(args.vision, args.threads)
    grid = int(round(dc.N_IMAGE_TOKENS ** 0.5))
    items = [json.loads(line) for line in (HELDOUT / "heldout.jsonl").read_text().splitlines()]
    items = [it for it in items if it["kind"] == "grounding"]
    if args.items:
        items = items[:args.items]
    scenes = {x["image"]: x for x in map(json.loads, (HELDOUT / "heldout.scenes.jsonl").read_text().splitlines())}
    stats = collections.defaultdict(lambda: np.zeros(4))  # hits, iou sum, target cells kept, items
    mix = collections.defaultdict(lambda: np.zeros(4))  # kept tokens on the target, other shapes, photo, padding
    sink = args.json.open("w") if args.json else None
    image, t0 = None, time.time()
    for k, it in enumerate(items):
        sc = scenes[it["image"]]
        w, h = sc["width"], sc["height"]
        if it["image"] != image:  # items come grouped by image: the tower and the scene's cell masks once per image
            image = it["image"]
            pv = proc.image_processor(images=Image.open(HELDOUT / image).convert("RGB"),
                                      return_tensors="np")["pixel_values"].astype(np.float32)
            feats = torch.from_numpy(sess.run(["features"], {"pixel_values": pv})[0][0])
            shapes = np.zeros(grid * grid, dtype=bool)
            for x in sc["shapes"]:
                shapes |= cell_geometry(make_data.norm_box(x["bbox"], w, h), grid)[0]
            photo = cell_geometry(make_data.norm_box([0, 0, w, h], w, h), grid)[0]
        target = make_data.norm_box(it["bbox"], w, h)
        inside, dist = cell_geometry(target, grid)
        ids = rule.ids(it["prompt"])
        img_pos = np.array([i for i, t in enumerate(ids) if t == rule.image_token_id])
        text_pos = np.array([i for i, t in enumerate(ids) if t != rule.image_token_id])
        with torch.no_grad():
            e = lm.model.embed_tokens(torch.tensor(ids)).clone()
            e[torch.from_numpy(img_pos)] = proj(feats if vpos is None else feats + vpos)
            h, row, head_kv = dec.prefill_head(e[None])
            row_img = row[torch.from_numpy(img_pos)].numpy()
            rec = {"i": k, "qtype": it["qtype"], "target_cells": int(inside.sum())}
            for name in args.selections:
                rng = np.random.default_rng([args.seed, k, SELECTIONS.index(name)])  # same draws in any --selections
                kept = select(name, row_img, inside, dist, args.keep, rng, shapes, photo)
                keep_pos = torch.from_numpy(np.sort(np.concatenate([text_pos, img_pos[kept]])))
                text = rule.tk.decode(dec.generate(h, head_kv, keep_pos, rule.eos_id, args.max_new))
                m = BOX.search(text)
                v = float(iou(torch.tensor([[float(x) for x in m.groups()]]), torch.tensor([target]))) if m else 0.0
                for key in (name, (name, it["qtype"])):
                    stats[key] += [v >= 0.5, v, inside[kept].sum() / max(1, inside.sum()), 1]
                parts = [inside[kept].sum(), (shapes & ~inside)[kept].sum(), (photo & ~shapes)[kept].sum(),
                         (~photo & ~shapes)[kept].sum()]
                mix[name] += parts
                rec[name] = {"iou": round(v, 4), "answer": text.strip(), "kept_on": [int(x) for x in parts]}
        if sink:
            sink.write(json.dumps(rec) + "\n")
        if (k + 1) % 50 == 0:
            print(f"  {k + 1}/{len(items)} items, {time.time() - t0:.0f} s", file=sys.stderr)
    print(f"{args.ckpt}: {len(items)} held-out grounding items, split at layer {args.split}, "
          f"tail keeps {args.keep} of {dc.N_IMAGE_TOKENS} image tokens")
    print(f"{'selection':16s} {'hits':>5s} {'acc':>6s} {'mean IoU':>8s} {'target cells kept':>17s} "
          f"{'kept on target / other shapes / photo / padding':>47s}  by type (hits/items)")
    qtypes = sorted({it["qtype"] for it in items})
    for name in args.selections:
        h_, v_, c_, n_ = stats[name]
        types = "  ".join(f"{qt} {int(stats[(name, qt)][0])}/{int(stats[(name, qt)][3])}" for qt in qtypes)
        on = " / ".join(f"{x / n_:.1f}" for x in mix[name])
        print(f"{name:16s} {int(h_):5d} {h_ / n_:6.3f} {v_ / n_:8.3f} {c_ / n_:17.0%} {on:>47s}  {types}")
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
