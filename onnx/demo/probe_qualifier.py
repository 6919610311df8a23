"""Diagnostic: does a colour question with a position qualifier fail on where it looks or on what it reads? (issue 4,
session 20)

"What color is the circle at the bottom?" was right 47 of 81 times held out on phase y against 95 of 113 for the
other colour questions. For the colour and position-grounding items of the last `--images` images of a
prepare_train.py set, teacher-forced through a train.py checkpoint, this prints per kind of item (colour / position,
with or without a qualifier "at the bottom / top", "on the left / right"):

* the model's first answer token for colour questions (right or wrong),
* the head-mean attention mass of the answer position at layers 4 and 5 on the referent's patches (a colour
  question's referent: the named shapes in the answer's colour), split by right / wrong answers, and at layer 4 on
  the other shapes of the asked kind,
* for qualified items, the qualifier word's attention at `--phrase-layer` (heads 0 and `--qual-head`) on the
  referent, the answer's attention at `--copy-layer` (`--qual-head`) on the qualifier word, and (colour questions)
  whether the checkpoint's phrase readout at hidden_states 3 of the qualifier word names the answer's colour.

If wrong answers look at the referent about as much as right ones, the failure is in what is read, not where.

    .venv/bin/python onnx/demo/probe_qualifier.py --ckpt .cache/demo-ckpt-ac/last.pt --data .cache/demo-train-big4
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402
import make_data  # noqa: E402
import train as T  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="train.py last.pt")
    p.add_argument("--data", type=Path, required=True, help="prepare_train.py output with instance maps")
    p.add_argument("--images", type=int, default=240, help="the last N images of --data")
    p.add_argument("--phrase-layer", type=int, default=1)
    p.add_argument("--copy-layer", type=int, default=3)
    p.add_argument("--qual-head", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    proc = dc.load_processor(args.data / "processor")
    rule = dc.PromptRule(proc)
    data = T.Data([args.data], rule)
    if any(a is None for a in data.instances) or any(l is None for l in data.labels):
        raise SystemExit(f"{args.data}: some shard lacks instances.u8.npy / labels.u8.npy (prepare_train.py --relabel)")
    _, proj, lm, vp = T.load_for_eval(args.ckpt, proc)
    L, nh = len(lm.model.layers), lm.config.num_attention_heads
    if not (0 <= args.phrase_layer < L and 0 <= args.copy_layer < L and 5 < L and 0 <= args.qual_head < nh):
        raise SystemExit(f"the decoder has layers 0..{L - 1} (6 or more needed), heads 0..{nh - 1}")
    state = torch.load(args.ckpt, weights_only=False)
    readout = None
    if state.get("phrase_readout") is not None:
        w = state["phrase_readout"]["weight"]
        readout = torch.nn.Linear(w.shape[1], w.shape[0])
        readout.load_state_dict(state["phrase_readout"])
    colours = list(make_data.COLORS)
    prefix_ids = torch.tensor(data.prefix)
    image_mask = prefix_ids == rule.image_token_id
    img_keys = torch.nonzero(image_mask).squeeze(1)
    P = len(prefix_ids)
    layers = tuple(sorted({args.phrase_layer, args.copy_layer, 4, 5}))
    stats = collections.defaultdict(list)
    n = len(data.images)
    for start in range(max(0, n - args.images), n, 4):
        ids = list(range(start, min(start + 4, n)))
        b, extra = data.batch(ids, proc.tokenizer.pad_token_id, vqa_targets=True, phrase_targets=True)
        target_mask, quals = extra[1], extra[-1]
        owner, rows, cols = b[1], b[3], b[4]
        with torch.no_grad():
            logits, *_, g, _, mid = T.forward(proj, lm, prefix_ids, image_mask, b, attn_layers=layers,
                                              vision_pos=vp, hidden_layers=(3,))
        qual_at = {} if quals is None else {int(r): int(c) for r, c in zip(quals[0], quals[1])}
        for m, j in enumerate(data.image_items(ids)):
            qt = data.qtypes[j]
            if qt not in ("color", "position") or not bool(target_mask[m].any()):
                continue
            key = qt + (" qualified" if m in qual_at else "")
            first = int(torch.nonzero(rows == m).squeeze(1)[0])
            c = int(cols[first])  # the first answer position
            on = lambda layer, mask: float((g[layer][m, :, c, img_keys].mean(0) * mask).sum())  # noqa: E731
            verdict = ""
            if qt == "color":
                said = rule.tk.decode([int(logits[first].argmax())]).strip()
                right = said == data.vqa_answers[j]
                stats[f"{key}: answer right"].append(right)
                verdict = " (right)" if right else " (wrong)"
                img, local = data.images[ids[int(owner[m])]][:2]
                lab = torch.from_numpy(data.labels[img][local].astype(np.int64))
                others = (lab > 0) & ((lab - 1) % len(make_data.SHAPES) == data.items[j][5][1]) & ~target_mask[m]
                if bool(others.any()):
                    stats[f"{key}: layer 4 on the other shapes of the kind{verdict}"].append(on(4, others))
            for layer in (4, 5):
                stats[f"{key}: layer {layer} on the referent{verdict}"].append(on(layer, target_mask[m]))
            if m in qual_at:
                q = qual_at[m]
                for h in sorted({0, args.qual_head}):
                    stats[f"{key}: qualifier, layer {args.phrase_layer} head {h}, on the referent"].append(
                        float((g[args.phrase_layer][m, h, q, img_keys] * target_mask[m]).sum()))
                stats[f"{key}: answer, layer {args.copy_layer} head {args.qual_head}, on the qualifier"].append(
                    float(g[args.copy_layer][m, args.qual_head, c, P + q]))
                if qt == "color" and readout is not None:
                    h_q = mid[3][m, q]
                    z = readout(h_q * torch.rsqrt(h_q.pow(2).mean(-1) + 1e-6))
                    stats[f"{key}: phrase readout at the qualifier names the colour"].append(
                        colours[int(z[:len(colours)].argmax())] == data.vqa_answers[j])
    if not stats:
        raise SystemExit(f"no colour or position items with a referent in the last {args.images} images")
    for k in sorted(stats):
        print(f"{k:75s} {np.mean(stats[k]):.3f}  (n={len(stats[k])})")


if __name__ == "__main__":
    main()
