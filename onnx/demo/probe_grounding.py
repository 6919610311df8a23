"""Diagnostic: can a small, purpose-built reader ground expressions from the cached DINOv2 features at all?

  .venv/bin/python onnx/demo/probe_grounding.py --data .cache/demo-train --minutes 5

Not part of the model. It separates "the features / data do not allow grounding" from "the from-scratch LLM decoder
has not learned it yet": a 2-step cross-attention reader (expression -> GRU -> query; query attends over the 576
projected patch features + a learned position embedding; a second query, conditioned on the first read, attends
again; an MLP turns the read features and the attention-weighted patch centres into a box) trained on the cached
features of prepare_train.py, scored by Acc@0.5 (IoU of the predicted box with the target, both normalised to the
padded square) on the last shard (images never trained on).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402


def load(root: Path):
    items, feats = [], []
    for k in range(10 ** 6):
        d = root / f"shard-{k:04d}"
        if not (d / "DONE").exists():
            break
        feats.append(np.load(d / "features.f16.npy", mmap_mode="r"))
        for line in (d / "items.jsonl").read_text().splitlines():
            it = json.loads(line)
            if it["kind"] == "grounding":
                box = [float(v) for v in re.findall(r"[0-9.]+", it["answer"])]
                items.append((k, it["local"], it["expr"], box, it["qtype"]))
    return items, feats


class Reader(nn.Module):
    def __init__(self, vocab: int, d: int = 128, grid: int = 24):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.gru = nn.GRU(d, d, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(384)
        self.img = nn.Linear(384, d)
        self.pos = nn.Parameter(torch.randn(grid * grid, d) * 0.02)
        self.q1 = nn.Linear(2 * d, d)
        self.q2 = nn.Linear(3 * d, d)
        r = torch.arange(grid * grid)
        self.register_buffer("xy", torch.stack([(r % grid + 0.5) / grid, (r // grid + 0.5) / grid], 1))
        self.head = nn.Sequential(nn.Linear(2 * d + 2 * d + 4, 256), nn.GELU(), nn.Linear(256, 4))

    def forward(self, feats, tok, lens):
        x = self.emb(tok)
        packed = nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        t = torch.cat([h[0], h[1]], -1)  # [B, 2d]
        k = self.img(self.norm(feats)) + self.pos  # [B, 576, d]
        a1 = torch.softmax(torch.einsum("bd,bnd->bn", self.q1(t), k) / k.shape[-1] ** 0.5, -1)
        r1 = torch.einsum("bn,bnd->bd", a1, k)
        a2 = torch.softmax(torch.einsum("bd,bnd->bn", self.q2(torch.cat([t, r1], -1)), k) / k.shape[-1] ** 0.5, -1)
        r2 = torch.einsum("bn,bnd->bd", a2, k)
        c1, c2 = a1 @ self.xy, a2 @ self.xy
        return torch.sigmoid(self.head(torch.cat([t, r1, r2, c1, c2], -1)))


def iou(a, b):
    x1, y1 = torch.maximum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1])
    x2, y2 = torch.minimum(a[:, 2], b[:, 2]), torch.minimum(a[:, 3], b[:, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda z: (z[:, 2] - z[:, 0]).clamp(min=0) * (z[:, 3] - z[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=dc.CACHE / "demo-train")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    items, feats = load(args.data)
    tk = dc.PromptRule(dc.load_processor(args.data / "processor")).tk
    words = [tk.encode(" " + it[2], add_special_tokens=False).ids for it in items]
    vocab = {t: i + 1 for i, t in enumerate(sorted({t for w in words for t in w}))}
    words = [[vocab[t] for t in w] for w in words]
    last = max(it[0] for it in items)
    train = [i for i, it in enumerate(items) if it[0] != last]
    val = [i for i, it in enumerate(items) if it[0] == last]
    print(f"[probe] {len(train)} train / {len(val)} validation grounding items (validation = shard {last}), "
          f"{len(vocab)} word pieces")
    model = Reader(len(vocab) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)

    def batch(ids):
        f = torch.from_numpy(np.stack([feats[items[i][0]][items[i][1]] for i in ids]).astype(np.float32))
        lens = torch.tensor([len(words[i]) for i in ids])
        tok = torch.zeros(len(ids), int(lens.max()), dtype=torch.long)
        for j, i in enumerate(ids):
            tok[j, :len(words[i])] = torch.tensor(words[i])
        return f, tok, lens, torch.tensor([items[i][3] for i in ids])

    def evaluate():
        model.eval()
        hits, by = [], {}
        with torch.no_grad():
            for s in range(0, len(val), 256):
                ids = val[s:s + 256]
                f, tok, lens, y = batch(ids)
                ok = (iou(model(f, tok, lens), y) >= 0.5).tolist()
                hits += ok
                for i, h in zip(ids, ok):
                    by.setdefault(items[i][4], []).append(h)
        model.train()
        return float(np.mean(hits)), {k: round(float(np.mean(v)), 3) for k, v in sorted(by.items())}

    rng = np.random.default_rng(0)
    t0, step, seen = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < args.minutes * 60:
        ids = rng.choice(train, args.batch, replace=False).tolist()
        f, tok, lens, y = batch(ids)
        pred = model(f, tok, lens)
        loss = F.l1_loss(pred, y) + (1 - iou(pred, y)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        seen += len(ids)
        if step % 100 == 0:
            acc, by = evaluate()
            print(f"[probe] step {step}, {seen} items, {(time.perf_counter() - t0) / 60:.1f} min: loss "
                  f"{loss.item():.3f}, validation Acc@0.5 {acc:.3f} {by}", flush=True)
    acc, by = evaluate()
    print(f"[probe] done: {step} steps, {seen} items: validation Acc@0.5 {acc:.3f} {by}")


if __name__ == "__main__":
    main()
