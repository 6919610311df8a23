"""Carry a train.py checkpoint's weights between machines in files of a bounded size.

  python onnx/demo/pack_checkpoint.py pack --ckpt OUT/last.pt --out DIR [--max-mb 15] [--matrices bf16|int8]
  python onnx/demo/pack_checkpoint.py unpack --dir DIR --out CKPT_DIR

A run on a borrowed GPU machine (onnx/demo/gpu_train.sh) can hand back only a few files of at most 16 MB each, 64 MB
in all, and a 384-wide decoder's checkpoint is ~140 MB in float32 before the optimiser state. `pack` keeps what the
export and the next phase need, at the precision the shipped model has anyway:
  * the tied embedding / lm_head table as int8 with one float32 scale per row, split by rows into embed-NN files (symmetric, max |w| / 127: what
    export_llava.py --embeddings q8 ships, so packing then exporting rounds the table once more at most by half a
    step);
  * every other tensor (projector, decoder layers, norms, the training-only heads, the vision position table) as
    bfloat16, which the int8 decoder export rounds far more coarsely; with `--matrices int8` every matrix as int8
    rows with a float32 scale each, as the table (half the size: what carries a checkpoint read back from the
    shipped int8 model to the machine, where bfloat16 would not fit beside the rest);
  * meta.json: the checkpoint's state (step, samples, elapsed time), args and model config.
The optimiser state and RNG streams are dropped: an unpacked checkpoint starts a new phase (train.py --init), it
cannot --resume. `unpack` writes CKPT_DIR/last.pt (float32) and CKPT_DIR/processor (from --processor) for assemble.py.

The features a run trained on include whatever the vision graph that computed them adds: the shipped tower adds the
shipped model's learned vision position table (`feature_offset`). `unpack --vision-offset-from THAT_GRAPH` makes the
table part of the checkpoint, so the export bakes the same offset into the new tower; without it the new model sees
features it was never trained on (measured: held-out grounding 0.26 / VQA 0.56 instead of the training fit).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402

EMBED = "language_model.model.embed_tokens.weight"
TIED = "language_model.lm_head.weight"
GROUPS = ("projector", "language_model", "aux", "box", "readout", "head_readout", "phrase_readout", "attn_readout")


def flatten(s: dict) -> dict[str, torch.Tensor]:
    flat = {f"{g}.{k}": v.detach().cpu() for g in GROUPS if s.get(g) is not None for k, v in s[g].items()}
    if s.get("vision_pos") is not None:
        flat["vision_pos"] = s["vision_pos"].detach().cpu()
    return flat


Q, SCALE = ":int8", ":scale"  # a matrix packed by --matrices int8: its rows and their scales, under these suffixes


def rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows of matrix `w` and one float32 scale a row (max |row| / 127)."""
    w = w.float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


def from_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 matrix of rows_int8's rows and scales."""
    return q.float() * scale[:, None]


def pack(ckpt: Path, out: Path, max_mb: float, matrices: str = "bf16") -> None:
    from safetensors.torch import save_file

    try:
        s = torch.load(ckpt, weights_only=False, map_location="cpu")
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"{ckpt}: not a readable train.py checkpoint ({e})") from None
    flat = flatten(s)
    if EMBED not in flat:
        raise SystemExit(f"{ckpt}: no {EMBED} (not a train.py checkpoint)")
    if TIED in flat and not torch.equal(flat[TIED], flat[EMBED]):
        raise SystemExit(f"{ckpt}: lm_head is not tied to the embedding table")
    flat.pop(TIED, None)
    q, scale = rows_int8(flat.pop(EMBED))
    limit, part, size = max_mb * 1e6, {}, 0
    rows = max(1, int(limit // (q.shape[1] + 4)))  # int8 row + its float32 scale
    files = {f"embed-{i // rows:02d}.safetensors": {"q": q[i:i + rows].contiguous(), "scale": scale[i:i + rows].contiguous()}
             for i in range(0, q.shape[0], rows)}
    for k in sorted(flat):
        if matrices == "int8" and flat[k].ndim == 2:
            q, scale = rows_int8(flat[k])
            tensors = {k + Q: q, k + SCALE: scale}
        else:
            tensors = {k: flat[k].to(torch.bfloat16).contiguous()}
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        if n > limit:
            raise SystemExit(f"{k}: {n / 1e6:.1f} MB alone is over --max-mb {max_mb}")
        if size + n > limit:
            files[f"weights-{len(files):02d}.safetensors"], part, size = part, {}, 0
        part.update(tensors)
        size += n
    if part:
        files[f"weights-{len(files):02d}.safetensors"] = part
    out.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, str(out / name))
        mb = (out / name).stat().st_size / 1e6
        if mb > max_mb * 1.01 + 0.1:
            raise SystemExit(f"{out / name}: {mb:.1f} MB, over --max-mb {max_mb}")
    meta = {"source": str(ckpt), "state": s["state"], "args": {k: str(v) for k, v in s.get("args", {}).items()},
            "config": s["config"], "files": sorted(files), "matrices": matrices}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"[pack] {ckpt} (step {s['state']['step']}) -> {out}: "
          + ", ".join(f"{n} {(out / n).stat().st_size / 1e6:.1f} MB" for n in sorted(files)))


def feature_offset(vision: Path) -> torch.Tensor | None:
    """The `feature_offset` initializer of an exported vision graph (export_llava.py bakes a checkpoint's learned
    vision position table into the tower's `features` output that way), or None if it has none."""
    import onnx
    from onnx import numpy_helper

    try:
        m = onnx.load(str(vision), load_external_data=False)
    except Exception as e:  # onnx raises several kinds on a bad file
        raise SystemExit(f"--vision-offset-from {vision}: not a readable ONNX graph ({e})") from None
    for init in m.graph.initializer:
        if init.name == "feature_offset":
            return torch.from_numpy(numpy_helper.to_array(init).copy()).float()
    return None


def unpack(src: Path, out: Path, processor: Path | None, vision: Path | None) -> None:
    from safetensors.torch import load_file

    if processor is None:  # what prepare_train.py wrote here, else gpu_carry.sh's copy, else made afresh below
        processor = next((p for p in (dc.CACHE / "demo-train-big" / "processor", dc.REPO / ".dev" / "processor")
                          if p.is_dir()), None)
    elif not (processor / "tokenizer.json").is_file():
        raise SystemExit(f"--processor {processor}: no tokenizer.json there")
    try:
        meta = json.loads((src / "meta.json").read_text())
        flat, parts = {}, []
        for name in meta["files"]:
            t = load_file(str(src / name))
            if name.startswith("embed-"):
                parts.append(from_int8(t["q"], t["scale"]))
            else:
                flat.update(t)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{src}: not a pack_checkpoint.py pack ({type(e).__name__}: {e})") from None
    if not parts:
        raise SystemExit(f"{src}: meta.json lists no embed-NN.safetensors")
    w = torch.cat(parts)  # files are listed sorted: embed-00, embed-01, ...
    for k in [k for k in flat if k.endswith(Q)]:  # --matrices int8
        name = k[:-len(Q)]
        if name + SCALE not in flat:
            raise SystemExit(f"{src}: {k} without its {name + SCALE}")
        flat[name] = from_int8(flat.pop(k), flat.pop(name + SCALE))
    s: dict = {g: None for g in GROUPS}
    for k, t in flat.items():
        g, _, rest = k.partition(".")
        if k == "vision_pos":
            s["vision_pos"] = t.float()
        elif g in GROUPS:
            s[g] = s[g] or {}
            s[g][rest] = t.float()
        else:
            raise SystemExit(f"{src}: unknown tensor {k}")
    s["language_model"]["model.embed_tokens.weight"] = w
    s["language_model"]["lm_head.weight"] = w
    s.setdefault("vision_pos", None)
    if vision is not None:
        offset = feature_offset(vision)
        if offset is not None and s["vision_pos"] is not None:
            raise SystemExit(f"{src} has a vision position table of its own and {vision} adds another")
        if offset is not None:
            s["vision_pos"] = offset
        print(f"[unpack] features came from {vision}: "
              + ("its feature_offset becomes the checkpoint's vision position table (export_llava.py bakes it back "
                 "into the tower)" if offset is not None else "no feature_offset, nothing to add"))
    s.update(state=meta["state"], args=meta["args"], config=meta["config"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(s, out / "last.pt")
    if not (out / "processor").exists():
        if processor is not None:
            shutil.copytree(processor, out / "processor")
        else:  # a fresh machine: the processor prepare_train.py builds (SmolLM2 tokenizer + <image>, 336 px pad)
            print("[unpack] no processor in .cache or .dev: building it (demo_common.build_processor)")
            dc.build_processor().save_pretrained(str(out / "processor"))
    print(f"[unpack] {src} -> {out / 'last.pt'} (step {meta['state']['step']}, {meta['state']['samples']} samples; "
          f"no optimiser state: continue with train.py --init)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--ckpt", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--max-mb", type=float, default=15.0)
    a.add_argument("--matrices", choices=["bf16", "int8"], default="bf16",
                   help="the matrices other than the embedding table: bfloat16, or int8 rows + a scale each (half "
                        "the size; for a checkpoint read back from an int8 model, whose weights are int8 anyway: "
                        "gpu_carry.sh make CKPT)")
    b = sub.add_parser("unpack")
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--processor", type=Path,
                   help="processor dir to copy into the checkpoint (default: .cache/demo-train-big/processor, else "
                        ".dev/processor, else built afresh)")
    b.add_argument("--vision-offset-from", type=Path, metavar="ONNX",
                   help="the vision graph that computed the training features (gpu_train.sh: the shipped "
                        "models/nuwa-demo/vision.int8.onnx of that commit); a position table it adds to `features` "
                        "is part of what the decoder was trained on, so the checkpoint takes it as its own")
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.ckpt, args.out, args.max_mb, args.matrices)
    else:
        unpack(args.dir, args.out, args.processor, args.vision_offset_from)


if __name__ == "__main__":
    main()
