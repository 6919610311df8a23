"""Diagnostic: where does a VQA question lose its answer? (issue 4, sessions 6 and 11)

For the `--qtype` questions (colour, existence or count) of the last `--images` training images of a
prepare_train.py set, teacher-forced through a train.py checkpoint, this fits linear probes (70 % of the items to
fit, 30 % to score) for the answer (the colour; yes / no; the number) on

* the hidden state of the answer position after every decoder layer (hidden_states[0..L]),
* the hidden state of the question's head noun (its first shape word, where --phrase-attn gathers the shapes the
  phrase names and --copy-attn reads from) at the same depth, and
* for colour questions, the mean hidden state of the shape's own image tokens at the same depth,

and prints the model's own answer accuracy, the head-mean attention mass of the answer position on the shape at
`--attn-layers` (colour questions), and with `--phrase L H` / `--copy L H` the two hops: the head noun's attention
on BOS (the sink of a phrase naming nothing, --phrase-sink) split by answer, and the answer position's attention on
the head noun. If the head noun carries the answer at a depth where the answer position reads it and the answer
position still does not, the value path of the read-out hop is what drops it.

    .venv/bin/python onnx/demo/probe_vqa.py --ckpt .cache/demo-ckpt-h/last.pt --data .cache/demo-train-big2
    .venv/bin/python onnx/demo/probe_vqa.py --ckpt .cache/demo-ckpt-q/last.pt --data .cache/demo-train-big3 \
        --qtype exist --phrase 1 0 --copy 3 0
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


def probe(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic regression (Adam, 400 full-batch steps, standardised inputs)."""
    torch.manual_seed(seed)
    k = int(len(y) * 0.7)
    x = (x - x[:k].mean(0)) / (x[:k].std(0) + 1e-6)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    head = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(400):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(xt[:k]), yt[:k]).backward()
        opt.step()
    with torch.no_grad():
        return (head(xt[k:]).argmax(-1) == yt[k:]).float().mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="train.py last.pt")
    p.add_argument("--data", type=Path, required=True, help="prepare_train.py output with instance maps")
    p.add_argument("--images", type=int, default=320, help="the last N images of the set (multiple of 4)")
    p.add_argument("--qtype", choices=["color", "exist", "count"], default="color")
    p.add_argument("--attn-layers", type=int, nargs="+", default=[1, 2, 4, 5])
    p.add_argument("--phrase", type=int, nargs=2, metavar=("LAYER", "HEAD"), help="the phrase hop to measure")
    p.add_argument("--copy", type=int, nargs=2, metavar=("LAYER", "HEAD"), help="the read-out hop to measure")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    proc = dc.load_processor(args.data / "processor")
    rule = dc.PromptRule(proc)
    data = T.Data([args.data], rule, kinds=("vqa",))
    _, proj, lm, vp = T.load_for_eval(args.ckpt, proc)
    L, nh = len(lm.model.layers), lm.config.num_attention_heads
    for name in ("phrase", "copy"):
        v = getattr(args, name)
        if v is not None and not (0 <= v[0] < L and 0 <= v[1] < nh):
            raise SystemExit(f"--{name} {v[0]} {v[1]}: the decoder has layers 0..{L - 1}, heads 0..{nh - 1}")
    bad = [l for l in args.attn_layers if not 0 <= l < L]
    if bad:
        raise SystemExit(f"--attn-layers {bad}: the decoder has layers 0..{L - 1}")
    prefix_ids = torch.tensor(data.prefix)
    image_mask = prefix_ids == rule.image_token_id
    img_keys = torch.nonzero(image_mask).squeeze(1)
    P = len(prefix_ids)
    grab = set(args.attn_layers) | {hop[0] for hop in (args.phrase, args.copy) if hop}
    classes: list[str] = []
    answer_pos, head_pos, shape_tok = (collections.defaultdict(list) for _ in range(3))
    y, said, mass = [], [], collections.defaultdict(list)
    sink = collections.defaultdict(list)  # answer -> the head noun's phrase-hop attention on BOS
    copy = []  # the answer position's read-out-hop attention on the head noun
    n = len(data.images) - len(data.images) % 4
    for start in range(max(0, n - args.images), n, 4):
        ids = list(range(start, start + 4))
        b, (_, target_mask, *_) = data.batch(ids, proc.tokenizer.pad_token_id, vqa_targets=True)
        feats, owner, tok, rows, cols, *_ = b
        with torch.no_grad():
            pre, _ = T.image_prefix(proj, lm, prefix_ids, image_mask, feats, vp)
            out = lm.model(inputs_embeds=pre, position_ids=torch.arange(P).unsqueeze(0).expand(len(ids), -1),
                           use_cache=True, output_hidden_states=True)
            cache = out.past_key_values
            cache.batch_select_indices(owner)
            with T.attention_probs(lm, tuple(sorted(grab))) as grabbed:
                suf = lm.model(inputs_embeds=lm.model.embed_tokens(tok), past_key_values=cache,
                               output_hidden_states=True,
                               position_ids=(P + torch.arange(tok.shape[1])).unsqueeze(0).expand(tok.shape[0], -1))
        items = [j for i in ids for j in data.images[i][2]]
        for m, j in enumerate(items):
            _, ans, _, _, _, vsel, spoken = data.items[j]
            if data.qtypes[j] != args.qtype:
                continue
            word = rule.tk.decode(ans[:1]).strip()
            heads = [t for t, what, _ in spoken if what == "shape"]
            if not heads:
                continue
            h = min(heads)
            colour_shape = args.qtype == "color" and vsel is not None and bool(target_mask[m].any())
            if args.qtype == "color" and not colour_shape:
                continue
            c = int(cols[torch.nonzero(rows == m).squeeze(1)[0]])
            if word not in classes:
                classes.append(word)
            y.append(classes.index(word))
            said.append(rule.tk.decode([int(lm.lm_head(suf.last_hidden_state[m, c]).argmax())]).strip())
            if colour_shape:
                for layer in args.attn_layers:
                    mass[layer].append(float((grabbed[layer][m].mean(0)[c, img_keys] * target_mask[m]).sum()))
            if args.phrase:
                sink[word].append(float(grabbed[args.phrase[0]][m, args.phrase[1], h, 0]))
            if args.copy:
                copy.append(float(grabbed[args.copy[0]][m, args.copy[1], c, P + h]))
            for l in range(L + 1):
                answer_pos[l].append(suf.hidden_states[l][m, c].numpy())
                head_pos[l].append(suf.hidden_states[l][m, h].numpy())
                if colour_shape:
                    shape_tok[l].append(out.hidden_states[l][owner[m]][image_mask][target_mask[m]].mean(0).numpy())
    y = np.array(y)
    if len(y) < 50:
        raise SystemExit(f"only {len(y)} {args.qtype} questions: give more --images")
    counts = collections.Counter(classes[i] for i in y)
    print(f"{len(y)} {args.qtype} questions; answer distribution {dict(counts)} (majority "
          f"{max(counts.values()) / len(y):.3f})")
    print(f"model's answer: accuracy {np.mean([s == classes[i] for s, i in zip(said, y)]):.3f}, "
          f"said {dict(collections.Counter(said).most_common(5))}")
    if mass:
        print("head-mean attention of the answer position on the shape: "
              + ", ".join(f"layer {l} {np.mean(v):.2f}" for l, v in sorted(mass.items())))
    if sink:
        print(f"phrase hop (layer {args.phrase[0]} head {args.phrase[1]}) of the head noun on BOS, by answer: "
              + ", ".join(f"{w} {np.mean(v):.2f}" for w, v in sorted(sink.items())))
    if copy:
        print(f"read-out hop (layer {args.copy[0]} head {args.copy[1]}) of the answer on the head noun: "
              f"{np.mean(copy):.2f}")
    print(f"linear probe for the answer (held-out accuracy; {len(classes)} classes):")
    for l in range(L + 1):
        print(f"  hidden_states[{l}]: answer position {probe(np.array(answer_pos[l]), y, len(classes)):.3f}   "
              f"head noun {probe(np.array(head_pos[l]), y, len(classes)):.3f}"
              + (f"   the shape's image tokens {probe(np.array(shape_tok[l]), y, len(classes)):.3f}"
                 if shape_tok else ""))


if __name__ == "__main__":
    main()
