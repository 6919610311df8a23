"""Diagnostic: where does a checkpoint's answer look on the held-out set, before any coordinate is given?

  .venv/bin/python onnx/demo/probe_attention.py --ckpt .cache/demo-ckpt-k/last.pt --images 100

Not part of the model. For the grounding items of the first --images held-out images (data/heldout), the decoder
(train.py's checkpoint, PyTorch) runs the whole prompt with the true answer teacher-forced, and the head-mean
attention of the first --positions answer positions (default 4: the positions predicting a box's " [", "0", "." and
first digit, whose context holds no coordinate yet) at --layers is split into the mass on the target shape's
patches and the mass on the other shapes' patches (patch centre inside the shape's box, in the padded square the
processor makes). Printed per expression type and layer. With --positions 0 every answer position counts: later box
positions see the digits already given, so they can find the target without reading the expression.

Vision features come from the raw tower graph prepare_train.py used (.cache/dinov2-336/vision.int8.onnx) plus the
checkpoint's vision position table, the same input the model trained on.

With --phrase LAYER HEAD it also prints, for every shape word of the prompts, the mass that head puts on the shapes
its noun phrase names (" red square": the red squares) and on the other shapes; with --copy LAYER HEAD, the mass
the first answer positions put, in that head, on the item's head noun (its first shape word). These are the two
hops train.py's --phrase-attn and --copy-attn supervise.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402
import make_data  # noqa: E402
import train as T  # noqa: E402

HELDOUT = dc.REPO / "data" / "heldout"


def box_patches(bbox, width: int, height: int, grid: int) -> torch.Tensor:
    """[grid*grid] bool: patches whose centre lies in `bbox` (original pixels) after padding to a square."""
    return torch.from_numpy(make_data.cell_geometry(make_data.norm_box(bbox, width, height), grid)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="train.py checkpoint (last.pt)")
    p.add_argument("--processor", type=Path, default=dc.CACHE / "demo-train-big3" / "processor")
    p.add_argument("--vision", type=Path, default=dc.VISION_336 / "vision.int8.onnx")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--positions", type=int, default=4, help="first N answer positions (0: all)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 5])
    p.add_argument("--phrase", type=int, nargs=2, metavar=("LAYER", "HEAD"))
    p.add_argument("--copy", type=int, nargs=2, metavar=("LAYER", "HEAD"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.images < 1 or args.positions < 0:
        p.error("--images must be >= 1 and --positions >= 0")
    torch.set_num_threads(args.threads)
    for f in (args.ckpt, args.vision, args.processor):
        if not f.exists():
            raise SystemExit(f"{f} missing (see onnx/demo/README.md)")
    proc = dc.load_processor(args.processor)
    rule = dc.PromptRule(proc)
    cfg, proj, lm, pos = T.load_for_eval(args.ckpt, proc)
    n_layers, n_heads = cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads
    for name, hop in (("--phrase", args.phrase), ("--copy", args.copy)):
        if hop and not (0 <= hop[0] < n_layers and 0 <= hop[1] < n_heads):
            p.error(f"{name} {hop[0]} {hop[1]}: the decoder has layers 0..{n_layers - 1} and heads 0..{n_heads - 1}")
    bad = [l for l in args.layers if not 0 <= l < n_layers]
    if bad:
        p.error(f"--layers {bad}: the decoder has layers 0..{n_layers - 1}")
    sess = dc.ort_session(args.vision, args.threads)
    grid = int(round(dc.N_IMAGE_TOKENS ** 0.5))
    items = [json.loads(line) for line in (HELDOUT / "heldout.jsonl").read_text().splitlines()]
    scenes = {s_["image"]: s_ for s_ in map(json.loads, (HELDOUT / "heldout.scenes.jsonl").read_text().splitlines())}
    by_img = collections.defaultdict(list)
    for it in items:
        if it["kind"] == "grounding":
            by_img[it["image"]].append(it)
    shape_words = {T.word_id(rule, w): k for k, name in enumerate(make_data.SHAPES)
                   for w in (name, make_data.PLURAL[name])}
    colour_words = {T.word_id(rule, name): c for c, name in enumerate(make_data.COLORS)}
    shape_index = {name: k for k, name in enumerate(make_data.SHAPES)}
    colour_index = {name: c for c, name in enumerate(make_data.COLORS)}
    grab = tuple(sorted(set(args.layers) | {hop[0] for hop in (args.phrase, args.copy) if hop}))
    acc = collections.defaultdict(lambda: np.zeros(3))
    for rel in sorted(by_img)[:args.images]:
        sc = scenes[rel]
        img = Image.open(HELDOUT / rel).convert("RGB")
        pv = proc.image_processor(images=img, return_tensors="np")["pixel_values"].astype(np.float32)
        feats = torch.from_numpy(sess.run(["features"], {"pixel_values": pv})[0][0])
        masks = [box_patches(x["bbox"], sc["width"], sc["height"], grid) for x in sc["shapes"]]
        for it in by_img[rel]:
            ids, ans = rule.ids(it["prompt"]), rule.answer_ids(it["answer"])
            img_pos = torch.tensor([i for i, t in enumerate(ids) if t == rule.image_token_id])
            x = torch.tensor(ids + ans[:-1])
            with torch.no_grad():
                e = lm.model.embed_tokens(x).clone()
                e[img_pos] = proj(feats if pos is None else feats + pos)
                with T.attention_probs(lm, grab) as probs:
                    lm.model(inputs_embeds=e[None], position_ids=torch.arange(len(x))[None])
            n = args.positions or len(ans)
            q = torch.arange(len(ids) - 1, len(ids) - 1 + n)
            target = masks[it["target"]]
            other = torch.zeros_like(target)
            for k, m in enumerate(masks):
                if k != it["target"]:
                    other |= m & ~target
            for layer in args.layers:
                pm = probs[layer][0].mean(0)[q][:, img_pos]
                acc[(it["qtype"], layer)] += [pm[:, target].sum(1).mean().item(), pm[:, other].sum(1).mean().item(), 1]
            nouns = [t for t, tok in enumerate(ids) if tok in shape_words]
            if args.phrase:
                for t in nouns:
                    said_colour = colour_words.get(ids[t - 1])  # " red square": the colour just before the noun
                    named = torch.zeros_like(target)
                    for sh, m in zip(sc["shapes"], masks):
                        if (shape_index[sh["kind"]] == shape_words[ids[t]]
                                and said_colour in (None, colour_index[sh["color"]])):
                            named |= m
                    if bool(named.any()):
                        rest = torch.zeros_like(target)
                        for m in masks:
                            rest |= m & ~named
                        pw = probs[args.phrase[0]][0, args.phrase[1], t][img_pos]
                        acc[("phrase", it["qtype"])] += [pw[named].sum().item(), pw[rest].sum().item(), 1]
            if args.copy and nouns:
                pc = probs[args.copy[0]][0, args.copy[1]][q, nouns[0]]
                acc[("copy", it["qtype"])] += [pc.mean().item(), 0.0, 1]
    print(f"{args.ckpt}: {args.images} held-out images, first {args.positions or 'all'} answer positions")
    for key, (t, o, n) in sorted(acc.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if key[0] == "phrase":
            print(f"phrase    {key[1]:9s} layer {args.phrase[0]} head {args.phrase[1]}: shape words on their phrase's "
                  f"shapes {t / n:.3f}, on the other shapes {o / n:.3f} ({int(n)} words)")
        elif key[0] == "copy":
            print(f"copy      {key[1]:9s} layer {args.copy[0]} head {args.copy[1]}: answer positions on the head noun "
                  f"{t / n:.3f} ({int(n)} items)")
        else:
            print(f"{key[0]:9s} layer {key[1]}: attention on the target {t / n:.3f}, on the other shapes {o / n:.3f} "
                  f"({int(n)} items)")


if __name__ == "__main__":
    main()
