#!/usr/bin/env python3
"""ONNX Runtime's own time for the decode graphs, from Python: the same protocol as `nuwa bench` (prefill `context`
positions, then `steps` greedy decode steps; past KV in preallocated sequence-major buffers [1, cap, kv, d], fed as
contiguous views; only the new positions come back and are written in place). Reports the median time of one head
run, one tail run and head+tail per context. Optional ORT profiling (--profile DIR) writes the per-op JSON traces
and prints the top ops by total time over the timed steps.

    .venv/bin/python onnx/bench/ort_decode.py --model .cache/models/smol-llava-fp32 --contexts 64,1024 --steps 32
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


SPIN = True


def session(path: Path, threads: int, profile: str | None, opt: str, tag: str, optimized_out: str | None = None):
    so = ort.SessionOptions()
    if not SPIN:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[opt]
    if optimized_out:
        so.optimized_model_filepath = optimized_out
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile) / tag)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Half:
    def __init__(self, sess, layers, kvh, hd, cap):
        self.s = sess
        self.layers = list(layers)
        self.in_names = [i.name for i in sess.get_inputs()]
        self.out_names = [o.name for o in sess.get_outputs()]
        self.k = {l: np.zeros((1, cap, kvh, hd), np.float32) for l in self.layers}
        self.v = {l: np.zeros((1, cap, kvh, hd), np.float32) for l in self.layers}
        self.n = 0

    def run(self, x, pos):
        feeds = {self.in_names[0]: x, self.in_names[1]: pos}
        for l in self.layers:
            feeds[f"past_key.{l}"] = self.k[l][:, :self.n]
            feeds[f"past_value.{l}"] = self.v[l][:, :self.n]
        t = time.perf_counter()
        outs = dict(zip(self.out_names, self.s.run(None, feeds)))
        dt = (time.perf_counter() - t) * 1e3
        s = x.shape[1]
        for l in self.layers:
            self.k[l][:, self.n:self.n + s] = outs[f"new_key.{l}"]
            self.v[l][:, self.n:self.n + s] = outs[f"new_value.{l}"]
        self.n += s
        return outs, dt


def bench(model: Path, man: dict, context: int, steps: int, threads: int, profile, opt: str, warmup: int):
    d = man["decoder"]
    K, N = d["split_layer"], d["num_layers"]
    cap = context + steps + warmup
    tag = f"ctx{context}"
    hs = session(model / d["head"]["file"], threads, profile, opt, f"head-{tag}")
    ts = session(model / d["tail"]["file"], threads, profile, opt, f"tail-{tag}")
    head = Half(hs, range(0, K), d["num_key_value_heads"], d["head_dim"], cap)
    tail = Half(ts, range(K, N), d["num_key_value_heads"], d["head_dim"], cap)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, context, d["hidden_size"])) * 0.02).astype(np.float32)
    pos = np.arange(context, dtype=np.int64)[None]
    o, _ = head.run(x, pos)
    o2, _ = tail.run(o["hidden_states"], pos)
    th, tt = [], []
    for step in range(warmup + steps):
        x = (rng.standard_normal((1, 1, d["hidden_size"])) * 0.02).astype(np.float32)
        p = np.array([[context + step]], np.int64)
        o, a = head.run(x, p)
        o2, b = tail.run(o["hidden_states"], p)
        if step >= warmup:
            th.append(a)
            tt.append(b)
    files = []
    if profile:
        files = [hs.end_profiling(), ts.end_profiling()]
    both = [a + b for a, b in zip(th, tt)]
    return {"context": context, "head_ms": statistics.median(th), "tail_ms": statistics.median(tt),
            "head_plus_tail_ms": statistics.median(both), "min_ms": min(both), "profiles": files}


def top_ops(files, n=15, skip_first=0):
    by_op = collections.Counter()
    count = collections.Counter()
    total = 0.0
    for f in files:
        ev = json.load(open(f))
        runs = [e for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"]
        # skip the prefill run (first model_run) of each session
        start = runs[0]["ts"] + runs[0]["dur"] if runs else 0
        for e in ev:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > start:
                op = e["args"].get("op_name", "?")
                by_op[op] += e["dur"]
                count[op] += 1
                total += e["dur"]
    return total, [(op, us, count[op]) for op, us in by_op.most_common(n)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--contexts", default="64,1024")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--opt", default="all", choices=["all", "extended", "basic", "none"])
    p.add_argument("--profile", help="directory for ORT profiles; prints the top ops")
    p.add_argument("--no-spin", action="store_true", help="session.intra_op.allow_spinning = 0")
    a = p.parse_args()
    global SPIN
    SPIN = not a.no_spin
    man = json.loads((a.model / "manifest.json").read_text())
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    for c in [int(x) for x in a.contexts.split(",")]:
        r = bench(a.model, man, c, a.steps, a.threads, a.profile, a.opt, a.warmup)
        print(f"ort-python {a.model.name} threads={a.threads}{' no-spin' if a.no_spin else ''} context {c:5d}: head {r['head_ms']:.2f} + tail "
              f"{r['tail_ms']:.2f} -> median head+tail {r['head_plus_tail_ms']:.2f} ms (min {r['min_ms']:.2f}; "
              f"load {os.getloadavg()[0]:.2f})")
        if a.profile:
            total, ops = top_ops(r["profiles"])
            steps = a.steps + a.warmup
            print(f"  profile: kernel time per step {total / steps / 1e3:.2f} ms")
            for op, us, cnt in ops:
                print(f"  {op:24s} {us / steps / 1e3:7.3f} ms/step  {100 * us / total:5.1f}%  ({cnt // steps} nodes)")


if __name__ == "__main__":
    main()
