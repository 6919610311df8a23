"""Diagnostic: where does a colour question lose the colour? (issue 4, session 6)

For the colour questions of the last `--images` training images of a prepare_train.py set, teacher-forced through a
train.py checkpoint, this fits linear probes (70 % of the items to fit, 30 % to score) for the asked-about shape's
colour on

* the hidden state of the answer position after every decoder layer (hidden_states[0..L]), and
* the mean hidden state of the shape's own image tokens at the same depth,

and prints the model's own answer accuracy and the head-mean attention mass of the answer position on the shape at
`--attn-layers`. If the image tokens carry the colour at a depth where the answer position attends to them and the
answer position still does not, the value path of those layers is what drops it.

    .venv/bin/python onnx/demo/probe_vqa.py --ckpt .cache/demo-ckpt-h/last.pt --data .cache/demo-train-big2
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
    p.add_argument("--attn-layers", type=int, nargs="+", default=[1, 2, 4, 5])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    proc = dc.load_processor(args.data / "processor")
    rule = dc.PromptRule(proc)
    data = T.Data([args.data], rule)
    _, proj, lm = T.build(proc)
    s = torch.load(args.ckpt, weights_only=False)
    T.load_weights(s, proj, lm)
    vp = s.get("vision_pos")
    proj.eval()
    lm.eval()
    prefix_ids = torch.tensor(data.prefix)
    image_mask = prefix_ids == rule.image_token_id
    img_keys = torch.nonzero(image_mask).squeeze(1)
    P, L = len(prefix_ids), len(lm.model.layers)
    colours = list(make_data.COLORS)
    answer_pos, shape_tok = collections.defaultdict(list), collections.defaultdict(list)
    y, said, mass = [], [], collections.defaultdict(list)
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
            with T.attention_probs(lm, tuple(args.attn_layers)) as grabbed:
                suf = lm.model(inputs_embeds=lm.model.embed_tokens(tok), past_key_values=cache,
                               output_hidden_states=True,
                               position_ids=(P + torch.arange(tok.shape[1])).unsqueeze(0).expand(tok.shape[0], -1))
        items = [j for i in ids for j in data.images[i][2]]
        for m, j in enumerate(items):
            _, ans, kind, _, _, vsel, _ = data.items[j]
            word = rule.tk.decode(ans[:1]).strip()
            if kind == "grounding" or vsel is None or word not in colours or not bool(target_mask[m].any()):
                continue
            c = int(cols[torch.nonzero(rows == m).squeeze(1)[0]])
            y.append(colours.index(word))
            said.append(rule.tk.decode([int(lm.lm_head(suf.last_hidden_state[m, c]).argmax())]).strip())
            for layer, pr in grabbed.items():
                mass[layer].append(float((pr[m].mean(0)[c, img_keys] * target_mask[m]).sum()))
            for l in range(L + 1):
                answer_pos[l].append(suf.hidden_states[l][m, c].numpy())
                shape_tok[l].append(out.hidden_states[l][owner[m]][image_mask][target_mask[m]].mean(0).numpy())
    y = np.array(y)
    if len(y) < 50:
        raise SystemExit(f"only {len(y)} colour questions: give more --images")
    print(f"{len(y)} colour questions; answer distribution {dict(collections.Counter(colours[i] for i in y))}")
    print(f"model's answer: accuracy {np.mean([s == colours[i] for s, i in zip(said, y)]):.3f}, "
          f"said {dict(collections.Counter(said).most_common(4))}")
    print("head-mean attention of the answer position on the shape: "
          + ", ".join(f"layer {l} {np.mean(v):.2f}" for l, v in sorted(mass.items())))
    print(f"linear probe for the colour (held-out accuracy; chance {1 / len(colours):.3f}):")
    for l in range(L + 1):
        print(f"  hidden_states[{l}]: answer position {probe(np.array(answer_pos[l]), y, len(colours)):.3f}   "
              f"the shape's image tokens {probe(np.array(shape_tok[l]), y, len(colours)):.3f}")


if __name__ == "__main__":
    main()
