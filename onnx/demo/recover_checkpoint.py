"""A committed demo model (models/nuwa-demo) -> a train.py checkpoint, so training can go on from it.

  .venv/bin/python onnx/demo/recover_checkpoint.py --model models/nuwa-demo \
      --processor .cache/demo-train-big/processor --out .cache/demo-ckpt-from-model
  .venv/bin/python onnx/demo/train.py ... --init .cache/demo-ckpt-from-model/last.pt

The training checkpoints live in .cache/, which a fresh machine does not have; the shipped model is the only copy of
the trained weights that survives. Reading them back:
* projector.onnx (fp32): the two MatMul initializers are the Linear weights transposed, in graph order;
* decoder_{head,mid,tail}.int8.onnx: every Linear is a MatMulNBits node (8 bits, blocks along K, no zero-point
  input, so the zero point is 2^(bits-1)); in graph order each layer has q, k, v, o, gate, up, down; the parts hold
  layers [0, first middle layer), the middle ranges, [split_layer, num_layers); norms are named per part
  (`layers.<local>.input_layernorm.weight`), the final `norm.weight` is in the tail;
* the tied embedding / lm_head: the tail's MatMulNBits lm_head (blocks of 128, finer than the q8_row table's one scale
  per row), with the table's rows beyond it (none when the sizes agree); a tail with `final_hidden` (session 24
  on: the runtime applies the table itself) has no lm_head, and the q8_row table is the tied matrix;
* the vision graph's `feature_offset` [576, 384] is train.py's learned vision position table.

The int8 weights are what the runtime runs, so the recovered model is the shipped model, not the fp32 one it was
quantised from (the difference is the rounding, at most 0.4 % of the largest weight in its block of 128).
Training-only heads (patch readout, box readout, VQA readouts) are not part of the runtime model. They are small
(~17k parameters), so they are committed beside the recipe, one file per shipped model, tagged with its manifest id:

  .venv/bin/python onnx/demo/recover_checkpoint.py --save-heads .cache/demo-ckpt-y/last.pt --id nuwa-demo-y \
      --heads onnx/demo/heads/nuwa-demo.safetensors          # after exporting the model with --id nuwa-demo-y
  .venv/bin/python onnx/demo/recover_checkpoint.py --model models/nuwa-demo --heads onnx/demo/heads/nuwa-demo.safetensors

With --heads the recovered checkpoint carries them (train.py --init ... --init-aux takes them); the file's id must be
the model's. Without it they start afresh, which costs a phase its first few hundred steps (session 14: grounding
loss 0.35 -> 0.38 while fresh heads trained).

Check (always run): the recovered torch decoder against the three ONNX parts on random input embeddings, last-position
logits and the hidden state after the head part; fails above --tol (relative to the logits' scale).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402
from train import TRAINING_HEADS as HEADS, build  # noqa: E402  (HEADS: the training-only heads' keys)

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def initializers(path: Path) -> tuple[dict[str, np.ndarray], list]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}, list(m.graph.node)


def dequant_nbits(node, inits: dict[str, np.ndarray]) -> np.ndarray:
    """[N, K] float32 weight of one MatMulNBits node (torch Linear layout: out x in)."""
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) > 3 and node.input[3]:
        raise SystemExit(f"{node.name}: MatMulNBits with a zero-point input is not handled")
    bits, block, K, N = attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]
    if bits != 8:
        raise SystemExit(f"{node.name}: {bits}-bit weights are not handled (8 only)")
    q = inits[node.input[1]].astype(np.float32).reshape(N, -1, block)
    scales = inits[node.input[2]].astype(np.float32).reshape(N, -1, 1)
    w = ((q - 2 ** (bits - 1)) * scales).reshape(N, -1)[:, :K]
    return w


def part_layers(path: Path, first: int, count: int, sd: dict, lm_head: bool) -> tuple[dict, list]:
    """Fills `sd` with layers first..first+count-1 of one decoder part; returns the part's initializers and its
    MatMulNBits nodes after the layers' (the tail's lm_head)."""
    inits, nodes = initializers(path)
    lin = [n for n in nodes if n.op_type == "MatMulNBits"]
    if len(lin) != 7 * count + lm_head:
        raise SystemExit(f"{path}: {len(lin)} MatMulNBits nodes, {7 * count + lm_head} expected for {count} layers"
                         + (" and the lm_head" if lm_head else ""))
    for local in range(count):
        layer = first + local
        for j, name in enumerate(LINEARS):
            sd[f"model.layers.{layer}.{name}.weight"] = dequant_nbits(lin[7 * local + j], inits)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{layer}.{norm}.weight"] = inits[f"layers.{local}.{norm}.weight"]
    return inits, lin[7 * count:]


def recover(model_dir: Path) -> tuple[dict, dict, torch.Tensor | None, dict]:
    man = json.loads((model_dir / "manifest.json").read_text())
    dec = man["decoder"]
    L = dec["num_layers"]
    # projector
    inits, nodes = initializers(model_dir / man["projector"]["file"])
    mats = [inits[i] for n in nodes if n.op_type in ("MatMul", "Gemm") for i in n.input if i in inits
            and inits[i].ndim == 2]
    if len(mats) != 2:
        raise SystemExit(f"projector: {len(mats)} weight matrices, 2 expected")
    proj = {"linear_1.weight": mats[0].T, "linear_1.bias": inits["projector.linear_1.bias"],
            "linear_2.weight": mats[1].T, "linear_2.bias": inits["projector.linear_2.bias"]}
    # decoder parts
    sd: dict[str, np.ndarray] = {}
    mids = dec.get("middle", [])
    first_mid = mids[0]["first_layer"] if mids else dec["split_layer"]
    part_layers(model_dir / dec["head"]["file"], 0, first_mid, sd, False)
    for m in mids:
        part_layers(model_dir / m["file"], m["first_layer"], m["last_layer"] - m["first_layer"], sd, False)
    # A tail with `final_hidden` has no lm_head of its own (the runtime applies the table): the tied matrix is then the
    # q8 table alone; otherwise its int8 lm_head (block-128 scales, finer than the table's one per row) is used.
    graph_head = "logits" in dec["tail"]
    inits, heads = part_layers(model_dir / dec["tail"]["file"], dec["split_layer"], L - dec["split_layer"], sd,
                               graph_head)
    sd["model.norm.weight"] = inits["norm.weight"]
    emb = man["embeddings"]
    if emb["dtype"] != "q8_row":
        raise SystemExit(f"embeddings dtype {emb['dtype']}: only q8_row is handled")
    raw = np.fromfile(model_dir / emb["file"], dtype=np.uint8, offset=emb["offset"],
                      count=emb["rows"] * (4 + emb["cols"])).reshape(emb["rows"], 4 + emb["cols"])
    table = raw[:, 4:].view(np.int8).astype(np.float32) * raw[:, :4].copy().view(np.float32)
    if graph_head:
        lm_head = dequant_nbits(heads[0], inits)
        if lm_head.shape[0] > table.shape[0]:
            raise SystemExit(f"lm_head has {lm_head.shape[0]} rows, the embedding table {table.shape[0]}")
        table[:lm_head.shape[0]] = lm_head
    sd["model.embed_tokens.weight"] = table
    sd["lm_head.weight"] = table
    # vision position table (added to the tower's features inside the vision graph)
    vinits, _ = initializers(model_dir / man["vision"]["file"])
    vpos = torch.from_numpy(vinits["feature_offset"].copy()) if "feature_offset" in vinits else None
    as_t = lambda d: {k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in d.items()}  # noqa: E731
    return as_t(proj), as_t(sd), vpos, man


def save_heads(ckpt: Path, out: Path, model_id: str) -> None:
    """CKPT's training-only heads -> one safetensors file, keys `<head>.<param>`, metadata `model_id`."""
    from safetensors.torch import save_file

    if not ckpt.is_file():
        raise SystemExit(f"--save-heads {ckpt}: no such checkpoint")
    s = torch.load(ckpt, map_location="cpu", weights_only=False)
    flat = {f"{k}.{n}": t.detach().float().contiguous() for k in HEADS if s.get(k) is not None
            for n, t in s[k].items()}
    if not flat:
        raise SystemExit(f"{ckpt}: no training-only heads in it")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(out), metadata={"model_id": model_id, "step": str(s["state"]["step"])})
    print(f"[heads] {', '.join(k for k in HEADS if s.get(k) is not None)} "
          f"({sum(t.numel() for t in flat.values())} parameters) -> {out} (model {model_id})")


def load_heads(path: Path, model_id: str) -> dict:
    """The heads file for the model `model_id` -> {head: state dict}."""
    from safetensors import safe_open

    if not path.is_file():
        raise SystemExit(f"--heads {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("model_id") != model_id:
            raise SystemExit(f"--heads {path}: saved for model {meta.get('model_id')!r}, this model is {model_id!r}")
        heads: dict[str, dict] = {}
        for key in f.keys():
            head, _, name = key.partition(".")
            if head not in HEADS or not name:
                raise SystemExit(f"--heads {path}: unexpected tensor {key!r}")
            heads.setdefault(head, {})[name] = f.get_tensor(key)
    return heads


def check(lm, model_dir: Path, man: dict, tol: float) -> None:
    """Recovered torch decoder vs the ONNX parts on random embeddings (S positions, empty KV cache)."""
    dec = man["decoder"]
    S, kv, hd = 24, dec["num_key_value_heads"], dec["head_dim"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, S, dec["hidden_size"], generator=g) * 0.05
    pos = np.arange(S, dtype=np.int64)[None]
    with torch.no_grad():
        o = lm.model(inputs_embeds=x, position_ids=torch.from_numpy(pos), output_hidden_states=True)
        want_logits = lm.lm_head(o.last_hidden_state[:, -1]).numpy()
    parts = [(dec["head"]["file"], 0, "inputs_embeds", "hidden_states")]
    parts += [(m["file"], m["first_layer"], "hidden_states", m["output"]) for m in dec.get("middle", [])]
    tail_out = dec["tail"].get("logits") or dec["tail"]["final_hidden"]
    parts += [(dec["tail"]["file"], dec["split_layer"], "hidden_states", tail_out)]
    h = x.numpy()
    after_head = None
    for f, first, inp, out in parts:
        s = dc.ort_session(model_dir / f, 2)
        feed = {inp: h, "position_ids": pos}
        for i in s.get_inputs():
            if i.name.startswith("past_"):
                feed[i.name] = np.zeros((1, 0, kv, hd), np.float32)
        h = s.run([out], feed)[0]
        if after_head is None:
            after_head = h
    if "final_hidden" in dec["tail"]:  # the runtime's lm_head: the tied table (recovered into lm.lm_head)
        h = h @ lm.lm_head.weight.detach().numpy()[: dec["vocab_size"]].T
    n_head = dec["middle"][0]["first_layer"] if dec.get("middle") else dec["split_layer"]
    d_hidden = np.abs(after_head - o.hidden_states[n_head].numpy()).max() / np.abs(after_head).max()
    d_logits = np.abs(h - want_logits).max() / np.abs(want_logits).max()
    top_same = int(np.argmax(h)) == int(np.argmax(want_logits))
    print(f"[check] torch vs ONNX, {S} random positions: hidden after layer {n_head - 1} max rel {d_hidden:.4f}, "
          f"last logits max rel {d_logits:.4f}, same top token: {top_same}")
    if d_hidden > tol or d_logits > tol or not top_same:
        raise SystemExit(f"recovered decoder differs from {model_dir} beyond --tol {tol}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/nuwa-demo"))
    p.add_argument("--processor", type=Path, default=dc.CACHE / "demo-train-big" / "processor",
                   help="the processor dir prepare_train.py wrote (tokenizer + <image> + image processor); built "
                        "afresh (demo_common.build_processor, as prepare_train.py builds it) when missing")
    p.add_argument("--out", type=Path, default=dc.CACHE / "demo-ckpt-from-model")
    p.add_argument("--tol", type=float, default=0.05, help="max relative difference torch vs ONNX (int8 activations)")
    p.add_argument("--heads", type=Path, help="training-only heads (safetensors) to carry into the checkpoint; with "
                   "--save-heads, the file to write")
    p.add_argument("--save-heads", type=Path, metavar="CKPT",
                   help="write CKPT's training-only heads to --heads, tagged with --id, and exit")
    p.add_argument("--id", help="with --save-heads: the manifest id of the model exported from CKPT")
    args = p.parse_args(argv)
    if args.save_heads:
        if not args.heads or not args.id:
            p.error("--save-heads needs --heads (the file to write) and --id (the exported model's manifest id)")
        save_heads(args.save_heads, args.heads, args.id)
        return
    if not (args.model / "manifest.json").exists():
        raise SystemExit(f"{args.model / 'manifest.json'} is missing")
    if args.processor.exists():
        processor = dc.load_processor(args.processor)
    else:  # a fresh machine without prepare_train.py's features: the same processor, built where the checkpoint goes
        print(f"[recover] {args.processor} missing: building the processor (demo_common.build_processor)")
        processor = dc.build_processor()
        args.processor = args.out / "processor"
        processor.save_pretrained(str(args.processor))
    p_sd, lm_sd, vpos, man = recover(args.model)
    dec = man["decoder"]
    cfg, proj, lm = build(processor, num_key_value_heads=dec["num_key_value_heads"], num_hidden_layers=dec["num_layers"],
                          hidden_size=dec["hidden_size"], num_attention_heads=dec["num_attention_heads"],
                          intermediate_size=lm_sd["model.layers.0.mlp.gate_proj.weight"].shape[0])
    heads = load_heads(args.heads, man["id"]) if args.heads else {}
    if man["decoder"]["vocab_size"] != cfg.text_config.vocab_size:
        raise SystemExit(f"{args.model}: vocab {man['decoder']['vocab_size']}, the processor's "
                         f"{cfg.text_config.vocab_size}")
    proj.load_state_dict(p_sd, strict=True)
    lm.load_state_dict(lm_sd, strict=True)
    lm.tie_weights()
    lm.eval()
    check(lm, args.model, man, args.tol)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "processor").exists():
        shutil.copytree(args.processor, args.out / "processor")
    state = {"step": 0, "epoch": 0, "pos": 0, "samples": 0, "elapsed": 0.0, "total_steps": None}
    torch.save({"projector": proj.state_dict(), "language_model": lm.state_dict(), "vision_pos": vpos,
                **{k: None for k in HEADS}, **heads, "state": state,
                "recovered_from": f"{args.model} ({man['id']})", "config": cfg.to_dict()}, args.out / "last.pt")
    print(f"[recover] {man['id']} -> {args.out / 'last.pt'} (vision position table: "
          f"{'yes' if vpos is not None else 'none'}; training-only heads: {', '.join(heads) or 'none'})")


if __name__ == "__main__":
    main()
