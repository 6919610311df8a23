#!/usr/bin/env python3
"""PyTorch reference decode speed: HF LlamaForCausalLM (the LLaVA checkpoint's language model + tied lm_head),
DynamicCache, greedy, same protocol as `nuwa bench` (prefill `context` text tokens with ids (i*7919+13) % vocab,
then time `steps` decode steps, median ms/token).

    .venv/bin/python onnx/bench/torch_decode.py --checkpoint .cache/smol-llava --contexts 64,1024 --steps 32 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def load_lm(path: str, attn: str):
    from transformers import LlavaForConditionalGeneration, LlamaForCausalLM

    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tcfg = llava.config.text_config
    tcfg._attn_implementation = attn
    lm = LlamaForCausalLM(tcfg).eval()
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.weight = lm.model.embed_tokens.weight if tcfg.tie_word_embeddings else llava.lm_head.weight
    del llava
    return lm


@torch.inference_mode()
def bench(lm, context: int, steps: int, warmup: int) -> dict:
    from transformers import DynamicCache

    vocab = lm.config.vocab_size
    ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(context)]])
    runs = []
    for _ in range(2):  # first pass = warm-up (allocator, kernels); second is timed
        cache = DynamicCache(config=lm.config)
        t = time.perf_counter()
        out = lm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_ms = (time.perf_counter() - t) * 1e3
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for step in range(warmup + steps):
            t = time.perf_counter()
            out = lm(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            dt = (time.perf_counter() - t) * 1e3
            if step >= warmup:
                times.append(dt)
        runs.append((prefill_ms, times))
    prefill_ms, times = runs[-1]
    return {"context": context, "steps": steps, "prefill_ms": round(prefill_ms, 2),
            "median_ms_per_token": round(statistics.median(times), 3),
            "mean_ms_per_token": round(statistics.mean(times), 3), "min_ms_per_token": round(min(times), 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=".cache/smol-llava")
    p.add_argument("--contexts", default="64,1024")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_lm(a.checkpoint, a.attn)
    res = []
    for c in [int(x) for x in a.contexts.split(",")]:
        r = bench(lm, c, a.steps, a.warmup)
        r["load_avg_1m"] = os.getloadavg()[0]
        res.append(r)
        if not a.json:
            print(f"torch {a.attn} threads={a.threads} context {c:5d}: median {r['median_ms_per_token']:.2f} ms/token"
                  f" (mean {r['mean_ms_per_token']:.2f}, min {r['min_ms_per_token']:.2f}; prefill {r['prefill_ms']:.0f} ms;"
                  f" load {r['load_avg_1m']:.2f})")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
