#!/usr/bin/env python3
"""Accuracy of quantised decoder graphs against the fp32 export: teacher-forced decode over a real text (one
token per step through head + tail, exactly the runtime's decode path), mean KL(fp32 || quant) of the next-token
distributions and top-1 agreement.

    .venv/bin/python onnx/bench/quant_kl.py --ref .cache/models/smol-llava-fp32 .cache/models/smol-llava-int8 ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_decode import Half, session  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nuwa_export.verify import read_table  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. In the kitchen there is a wooden table with four chairs, "
        "a bowl of fruit and a vase of flowers next to the window. A man is standing near the refrigerator and "
        "looking at his phone while the kettle boils.")


def logits_for(model: Path, ids: list[int], table: np.ndarray) -> np.ndarray:
    man = json.loads((model / "manifest.json").read_text())
    d = man["decoder"]
    K, N = d["split_layer"], d["num_layers"]
    head = Half(session(model / d["head"]["file"], 2, None, "all", ""), range(0, K), d["num_key_value_heads"],
                d["head_dim"], len(ids) + 1)
    tail = Half(session(model / d["tail"]["file"], 2, None, "all", ""), range(K, N), d["num_key_value_heads"],
                d["head_dim"], len(ids) + 1)
    lm_head = None
    if "final_hidden" in d["tail"]:  # tied lm_head applied by the runtime: this model's own embedding table
        lm_head = np.asarray(read_table(model, man["embeddings"])[: d["vocab_size"]], np.float32)
    out = []
    for i, t in enumerate(ids):
        x = table[t][None, None].astype(np.float32)
        p = np.array([[i]], np.int64)
        o, _ = head.run(x, p)
        o2, _ = tail.run(o["hidden_states"], p)
        if lm_head is not None:
            out.append(lm_head @ o2[d["tail"]["final_hidden"]][0])
        else:
            out.append(o2["logits"][0])
    return np.stack(out)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True, type=Path)
    p.add_argument("models", nargs="+", type=Path)
    a = p.parse_args()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(a.ref / "tokenizer.json"))
    ids = tok.encode(TEXT).ids
    man = json.loads((a.ref / "manifest.json").read_text())
    e = man["embeddings"]
    dt = {"f32": "<f4", "f16": "<f2"}[e["dtype"]]
    table = np.fromfile(a.ref / e["file"], dtype=dt, count=e["rows"] * e["cols"], offset=e["offset"]).reshape(
        e["rows"], e["cols"]).astype(np.float32)
    ref = log_softmax(logits_for(a.ref, ids, table))
    for m in a.models:
        q = log_softmax(logits_for(m, ids, table))
        kl = (np.exp(ref) * (ref - q)).sum(-1)
        top1 = (ref.argmax(-1) == q.argmax(-1)).mean()
        print(f"{m.name}: {len(ids)} tokens, mean KL {kl.mean():.4f} (max {kl.max():.4f}), top-1 agreement {top1:.3f}")


if __name__ == "__main__":
    main()
