#!/usr/bin/env python3
"""Build the tiny committed test fixtures: random-weight LLaVA checkpoints from the real transformers classes,
exported with export_llava.py, plus goldens computed by the PyTorch model.

    .venv/bin/python onnx/make_fixtures.py

Writes models/tiny-llava-clip/ and models/tiny-llava-dinov2/ (each with golden/), examples/coco-000000000139.jpg,
and asserts with onnxruntime that splitting the decoder at every K in 1..N-1 reproduces the unsplit HF logits.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "onnx"))
import export_llava  # noqa: E402
from nuwa_export import export as ex  # noqa: E402
from nuwa_export import manifest as mf  # noqa: E402
from nuwa_export import verify as vf  # noqa: E402

COCO = Path("/work/shared/data/coco")
CAPTIONS = COCO / "derived/captions.jsonl"
GOLDEN_PHOTO = COCO / "coco_mini_obmutescence/val2017/000000000139.jpg"  # dining room, 640x426
EXAMPLE_NAME = "coco-000000000139.jpg"
CACHE = ROOT / ".cache/fixtures"  # checkpoints live here (git-ignored)
SPECIALS = ["<s>", "</s>", "<pad>", "<image>"]
PROMPT = "Describe the image."
STEPS = 16
MIN_MARGIN = 1e-2
IMAGE = 126  # 9x9 patches: an odd grid, and 81 tokens is no budget preset (64/128/192)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CHAT_TEMPLATE = mf.LLAVA15_CHAT_TEMPLATE

FIXTURES = [
    # id, tower, split, FastV cut (a middle segment [fastv, split)), similarity layers, tied, image policy
    dict(id="tiny-llava-clip", tower="clip", split=2, fastv=None, sim=3, tied=True, pad=True),
    dict(id="tiny-llava-dinov2", tower="dinov2", split=3, fastv=1, sim=3, tied=False, pad=False),
]


# ------------------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(vocab_size: int = 460):
    """Byte-level BPE trained on the COCO captions, wrapped as a PreTrainedTokenizerFast that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    captions = [c for line in CAPTIONS.read_text().splitlines() for c in json.loads(line)["captions"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(captions, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token=None, extra_special_tokens={"image_token": "<image>"})


# ---------------------------------------------------------------------------------------------------- checkpoint
def build_model(fx: dict, tokenizer, seed: int):
    from transformers import (CLIPVisionConfig, Dinov2Config, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    torch.manual_seed(seed)
    if fx["tower"] == "clip":
        vcfg = CLIPVisionConfig(image_size=IMAGE, patch_size=14, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=4, num_attention_heads=4, projection_dim=64, initializer_factor=4.0)
    else:
        # image_size 224 (16x16 position grid) while exporting at 126: exercises the baked pos-embed interpolation.
        vcfg = Dinov2Config(image_size=224, patch_size=14, hidden_size=64, mlp_ratio=2, num_hidden_layers=4,
                            num_attention_heads=4, initializer_range=0.2, layerscale_value=1.0)
    tcfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       initializer_range=0.15, tie_word_embeddings=fx["tied"], bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=(IMAGE // 14) ** 2, tie_word_embeddings=fx["tied"])
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("eager")  # goldens need the attention probabilities
    lang = model.model.language_model
    with torch.no_grad():
        # Real checkpoints ship fp16 weights; make the embedding table f16-representable so embed_tokens.f16.bin
        # is exact and the fixture's goldens hold for the runtime's table bit for bit.
        lang.embed_tokens.weight.copy_(lang.embed_tokens.weight.half().float())
    tied = model.lm_head.weight.data_ptr() == lang.embed_tokens.weight.data_ptr()
    assert tied == fx["tied"], f"tie_word_embeddings not honoured ({tied})"
    return model


def build_processor(fx: dict, tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    common = dict(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}, resample=3,
                  do_center_crop=True)
    if fx["pad"]:  # LLaVA-1.5: expand to square with the mean colour, resize (bicubic), (no-op) centre crop
        ip = LlavaImageProcessorPil(do_pad=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, **common)
    else:  # shortest edge to IMAGE then centre crop
        ip = LlavaImageProcessorPil(do_pad=False, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **common)
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1, image_token="<image>")


# ----------------------------------------------------------------------------------------------------------- images
def make_images() -> tuple[Path, Image.Image]:
    """examples/<coco photo> (non-square, ~40 KB JPEG) and the IMAGE x IMAGE golden PNG image (returned)."""
    photo = Image.open(GOLDEN_PHOTO).convert("RGB")
    ex_dir = ROOT / "examples"
    ex_dir.mkdir(exist_ok=True)
    example = ex_dir / EXAMPLE_NAME
    photo.resize((400, 266), Image.BICUBIC).save(example, quality=85)
    w, h = photo.size
    s = min(w, h)
    square = photo.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((IMAGE, IMAGE),
                                                                                                  Image.BICUBIC)
    return example, square


# -------------------------------------------------------------------------------------------------------- goldens
def greedy_ok(model, processor, square) -> tuple[bool, float, list[int]]:
    ids, pv = mf.processor_input_ids(processor, PROMPT, square)
    tokens, logits = vf.hf_greedy(model, ids, pv, STEPS)
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    eos = processor.tokenizer.eos_token_id
    return margin >= MIN_MARGIN and eos not in tokens, margin, tokens


def min_gap(x: np.ndarray) -> float:
    s = np.sort(np.asarray(x, np.float64).ravel())
    return float(np.diff(s).min())


def write_goldens(fx: dict, out: Path, model, processor, square: Image.Image, example: Path, manifest: dict) -> dict:
    g = out / "golden"
    if g.exists():
        shutil.rmtree(g)
    g.mkdir()
    square.save(g / "image.png")
    ids, pv = mf.processor_input_ids(processor, PROMPT, Image.open(g / "image.png").convert("RGB"))
    v = manifest["vision"]
    vis = vf.hf_vision(model, pv, v["feature_layer"], v["metric_layer"], v["similarity_layers"])
    tokens, step_logits = vf.hf_greedy(model, ids, pv, STEPS)
    emb = vf.hf_inputs_embeds(model, ids, pv, vis["image_embeds"])
    row = vf.hf_attention_row(model, emb, fx["split"])
    ex_pv = processor.image_processor(Image.open(example).convert("RGB"), return_tensors="np")["pixel_values"]
    arrays = {"pixel_values": pv, **vis, "attention_row": row, "prefill_logits": step_logits[0],
              "step_logits": step_logits, "preprocess_example": ex_pv.astype(np.float32)}
    for k, a in arrays.items():
        np.save(g / f"{k}.npy", np.ascontiguousarray(a, dtype=np.float32))
    img_tok = manifest["tokenizer"]["image_token_id"]
    span = [i for i, t in enumerate(ids) if t == img_tok]
    golden = {
        "prompt": PROMPT, "image": "image.png", "input_ids": ids,
        "image_span": [span[0], span[-1] + 1],
        "greedy_tokens": tokens, "greedy_text": processor.tokenizer.decode(tokens),
        "split_layer": fx["split"], "steps": STEPS,
        "min_top2_margin": float(np.diff(np.sort(step_logits, axis=1)[:, -2:], axis=1).min()),
        "cls_attention_min_gap": min_gap(vis["cls_attention"]),
        "attention_row_image_min_gap": min_gap(row[0, span[0]:span[-1] + 1]),
        "preprocess_example": {"image": f"examples/{EXAMPLE_NAME}", "file": "preprocess_example.npy",
                               "tolerance_max_abs": 0.1, "tolerance_mean_abs": 0.01},
        "tolerances": {"features": 1e-4, "cls_attention": 1e-5, "similarity": 1e-4, "image_embeds": 1e-4,
                       "attention_row": 1e-5, "logits": 1e-3, "pixel_values": 1e-5},
        "arrays": {k: f"{k}.npy" for k in arrays},
    }
    (g / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
    return golden


# -------------------------------------------------------------------------------------------------- split sweep
def split_sweep(fx: dict, ckpt: Path, model, processor, square) -> None:
    """Export the decoder at every K and check ORT logits against the unsplit HF model."""
    n = model.config.text_config.num_hidden_layers
    ids, pv = mf.processor_input_ids(processor, PROMPT, square)
    tokens, ref = vf.hf_greedy(model, ids, pv, STEPS)
    print(f"[sweep] {fx['id']}: K | max abs logit error over prefill + {STEPS - 1} decode steps")
    # Every split K, and every K with an extra FastV cut L < K (three segments).
    for k, cut in [(k, None) for k in range(1, n)] + [(k, l) for k in range(2, n) for l in range(1, k)]:
        tmp = CACHE / f"{fx['id']}-K{k}"
        extra = ["--fastv-layer", str(cut)] if cut else []
        export_llava.main(["--checkpoint", str(ckpt), "--out", str(tmp), "--split-layer", str(k), *extra,
                           "--similarity-layers", str(fx["sim"]), "--no-verify", "--verify-image",
                           str(CACHE / "square.png")])
        res = vf.OrtModel(tmp).generate(ids, pv, tokens)
        err = vf.max_abs(res["step_logits"], ref)
        print(f"[sweep] {fx['id']}: {k}{f' (FastV cut {cut})' if cut else ''} | {err:.3g}")
        assert err <= 1e-4 and res["argmax"] == tokens, f"split K={k} cut {cut}: error {err}"
        shutil.rmtree(tmp)


def build_fixture(fx: dict, tokenizer, square, example) -> None:
    processor = build_processor(fx, tokenizer)
    for seed in range(100):
        model = build_model(fx, tokenizer, seed)
        ok, margin, tokens = greedy_ok(model, processor, square)
        ids, pv = mf.processor_input_ids(processor, PROMPT, square)
        vis = vf.hf_vision(model, pv, -2, -2, fx["sim"])
        gap = min_gap(vis["cls_attention"])
        print(f"[fixture] {fx['id']} seed {seed}: min top-2 margin {margin:.4f}, cls gap {gap:.2e}, tokens {tokens}")
        if ok and gap >= 1e-6:
            break
    else:
        raise SystemExit(f"no seed gives robust greedy decoding for {fx['id']}")
    ckpt = CACHE / f"{fx['id']}-checkpoint"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    (ckpt / "nuwa_seed.txt").write_text(f"{seed}\n")
    out = ROOT / "models" / fx["id"]
    if out.exists():
        shutil.rmtree(out)
    cut = ["--fastv-layer", str(fx["fastv"])] if fx["fastv"] else []
    export_llava.main(["--checkpoint", str(ckpt), "--out", str(out), "--split-layer", str(fx["split"]), *cut,
                       "--similarity-layers", str(fx["sim"]), "--quantize-vision", "int8",
                       "--verify-image", str(CACHE / "square.png"), "--verify-steps", str(STEPS - 1)])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = f"onnx/make_fixtures.py (random init, seed {seed})"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # Reload from disk so goldens come from exactly the checkpoint that was exported.
    processor, model = export_llava.load_checkpoint(ckpt)
    if fx["tied"]:
        # The same tail without its lm_head (decoder.tail.final_hidden): tests/parity.rs swaps it in and checks that
        # the runtime applying the shared table itself reproduces the same goldens. Its weights stay in
        # decoder_tail.onnx.data, where the table also lives.
        ex.tail_to_final_hidden(out / "decoder_tail.onnx", out / "decoder_tail.final_hidden.onnx",
                                manifest["decoder"]["hidden_size"], share_data=True)
    golden = write_goldens(fx, out, model, processor, square, example, manifest)
    print(f"[fixture] {fx['id']}: greedy {golden['greedy_tokens']} -> {golden['greedy_text']!r}")
    split_sweep(fx, ckpt, model, processor, square)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[fixture] {fx['id']}: {total / 1024:.0f} KiB on disk")


def main():
    torch.set_num_threads(2)
    CACHE.mkdir(parents=True, exist_ok=True)
    example, square = make_images()
    square.save(CACHE / "square.png")
    tokenizer = train_tokenizer()
    print(f"[fixture] tokenizer: {len(tokenizer)} tokens, specials {[tokenizer.convert_tokens_to_ids(s) for s in SPECIALS]}")
    for fx in FIXTURES:
        build_fixture(fx, tokenizer, square, example)


if __name__ == "__main__":
    main()
