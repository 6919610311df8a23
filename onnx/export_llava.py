#!/usr/bin/env python3
"""Export a Hugging Face LlavaForConditionalGeneration checkpoint to nuwa's model directory (docs/model-format.md).

    python onnx/export_llava.py --checkpoint HF_DIR --out models/<id> [--split-layer K] [--similarity-layers 9]
        [--quantize-vision int8] [--quantize-decoder int8|int4] [--verify-image IMG] [--no-verify]

Writes manifest.json, vision.onnx, projector.onnx, decoder_head.onnx, decoder_tail.onnx (+ .onnx.data where
needed), the embedding table (embed_tokens.f16.bin, or a pointer into decoder_tail.onnx.data when lm_head is tied
and kept fp32) and tokenizer.json; then replays the graphs with onnxruntime against the PyTorch model and fails if
the fp32 logits differ by more than 1e-3. See onnx/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nuwa_export import export as ex  # noqa: E402
from nuwa_export import manifest as mf  # noqa: E402
from nuwa_export import verify as vf  # noqa: E402
from nuwa_export.vision import VISION_POS_FILE, VisionWrapper  # noqa: E402

DEFAULT_IMAGE_DIR = Path("/work/shared/data/coco/coco_mini_obmutescence/val2017")
LOGIT_TOL = 1e-3
# Vision and Stage-2 outputs of the fp32 graphs against PyTorch, relative to the reference's largest magnitude:
# accumulation order gives ~1e-6 of it; a wrong graph (a scaled layer feeding only `similarity`) gives ~0.3.
SIGNAL_REL_TOL = 1e-3
BIG = 1 << 30  # graphs above this many weight bytes get external data (protobuf is limited to 2 GiB)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="local HF checkpoint dir (model + processor files)")
    p.add_argument("--out", required=True, type=Path, help="output dir, e.g. models/llava-1.5-7b")
    p.add_argument("--id", help="manifest id (default: the --out dir name)")
    p.add_argument("--split-layer", type=int, help="decoder head/tail split K (default N/2)")
    p.add_argument("--fastv-layer", type=int, help="also cut the decoder at L < K (head [0,L), middle [L,K)) so FastV "
                                                   "prunes at its own early layer (its paper: 2)")
    p.add_argument("--similarity-layers", type=int, default=9, help="trailing vision hidden_states averaged (9)")
    p.add_argument("--metric-layer", type=int, default=-2, help="HF attentions index of the CLS metric (-2)")
    p.add_argument("--quantize-vision", choices=["int8"], help="also write vision.int8.onnx and load it")
    p.add_argument("--quantize-decoder", choices=["int8", "int4"], help="MatMulNBits weight-only decoder")
    p.add_argument("--lm-head", choices=["graph", "table"], default="graph",
                   help="table: a tied lm_head is not exported; the tail outputs its final hidden state and the runtime "
                        "multiplies by the embedding table (stored once, not twice). Needs --quantize-decoder")
    p.add_argument("--embeddings", choices=["f16", "q8"], default="f16",
                   help="dtype of a separately written embedding table: f16, or q8 (int8, one f32 scale per row)")
    p.add_argument("--ship-quantized-only", action="store_true",
                   help="after verification, delete the fp32 graphs that quantised ones replace (and the manifest's "
                        "vision.fp32_file), leaving only what the runtime loads")
    p.add_argument("--verify-image", type=Path, help="image for verification (default: a COCO photo)")
    p.add_argument("--verify-steps", type=int, default=4, help="greedy decode steps verified after the prefill")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check (saves memory)")
    return p.parse_args(argv)


def load_checkpoint(path: Path):
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: {path} is not a Hugging Face checkpoint directory (no config.json)")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(path))
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.nuwa_vision_pos = load_vision_pos(path, model)
    return processor, model


def load_vision_pos(path: Path, model) -> torch.Tensor | None:
    """The optional learned vision position table of a checkpoint dir: float32 [grid tokens, vision hidden], added
    to the selected tower features before the projector (the demo model has one, LLaVA checkpoints do not). The
    exporter bakes it into vision.onnx's `features` output, so the runtime needs nothing extra."""
    f = path / VISION_POS_FILE
    if not f.is_file():
        return None
    try:
        table = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {f}: not a readable .npy array ({e})")
    hidden = model.config.vision_config.hidden_size
    if table.dtype != np.float32 or table.ndim != 2 or table.shape[1] != hidden:
        raise SystemExit(f"error: {f}: expected float32 [grid tokens, {hidden}], got {table.dtype} "
                         f"{list(table.shape)}")  # the row count is checked against the image size in export_model
    if not np.isfinite(table).all():
        raise SystemExit(f"error: {f}: contains NaN or infinity")
    return torch.from_numpy(table)


def preflight(args) -> None:
    """Every check that needs only the checkpoint's config and the flags, before minutes of loading and export:
    a bad flag must not cost a full export, nor leave a directory behind."""
    ckpt = args.checkpoint
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"error: {ckpt} is not a Hugging Face checkpoint directory (no config.json)")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(ckpt))
    tcfg, vcfg = getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)
    if tcfg is None or vcfg is None:
        raise SystemExit(f"error: {ckpt} is not a LLaVA checkpoint (no text_config / vision_config)")
    if not isinstance(cfg.vision_feature_layer, int):
        raise SystemExit("multi-layer vision_feature_layer is not supported by the manifest")
    if cfg.vision_feature_select_strategy != "default":
        raise SystemExit("only vision_feature_select_strategy='default' (CLS dropped) is supported")
    if tcfg.model_type != "llama":
        raise SystemExit(f"decoder model_type {tcfg.model_type!r} is not supported (Llama only)")
    n_layers = tcfg.num_hidden_layers
    split = args.split_layer if args.split_layer is not None else n_layers // 2
    if not 1 <= split < n_layers:
        raise SystemExit(f"--split-layer must be in 1..{n_layers - 1}")
    if args.fastv_layer is not None and not 1 <= args.fastv_layer < split:
        raise SystemExit(f"--fastv-layer must be in 1..{split - 1} (below --split-layer {split})")
    if args.lm_head == "table" and not args.quantize_decoder:
        raise SystemExit("--lm-head table needs --quantize-decoder (an fp32 tied tail already shares its table)")
    v_layers = getattr(vcfg, "num_hidden_layers", None)
    if v_layers is not None:
        if not -v_layers <= args.metric_layer < v_layers:
            raise SystemExit(f"--metric-layer must be in -{v_layers}..{v_layers - 1} for a {v_layers}-layer tower, "
                             f"got {args.metric_layer}")
        if not 1 <= args.similarity_layers <= v_layers + 1:
            raise SystemExit(f"--similarity-layers must be in 1..{v_layers + 1}, got {args.similarity_layers}")
    if args.verify_steps < 0:
        raise SystemExit(f"--verify-steps must be at least 0, got {args.verify_steps}")
    if args.verify_image is not None:
        from PIL import Image

        try:
            with Image.open(args.verify_image) as im:
                im.verify()
        except (OSError, SyntaxError) as e:
            raise SystemExit(f"error: --verify-image {args.verify_image}: cannot be read as an image ({e})")
    out = args.out
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise SystemExit(f"error: --out {out} is a non-empty directory without a manifest.json: not a model directory, "
                         "so it is not replaced")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot create {parent} ({e})")
    if not os.access(parent, os.W_OK):
        raise SystemExit(f"error: --out {out}: {parent} is not writable")


def verify_image(arg: Path | None):
    from PIL import Image

    if arg is not None:
        return Image.open(arg).convert("RGB"), arg.name
    photos = sorted(DEFAULT_IMAGE_DIR.glob("*.jpg")) if DEFAULT_IMAGE_DIR.is_dir() else []
    if photos:
        return Image.open(photos[0]).convert("RGB"), photos[0].name
    g = np.linspace(0, 255, 200 * 160 * 3).reshape(160, 200, 3).astype(np.uint8)  # synthetic fallback
    return Image.fromarray(g), "synthetic-gradient"


def export_model(args) -> dict:
    """Export every graph and write manifest.json; returns the manifest."""
    import transformers

    processor, model = load_checkpoint(args.checkpoint)
    cfg = model.config
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.text_config
    n_layers = tcfg.num_hidden_layers
    split = args.split_layer if args.split_layer is not None else n_layers // 2  # ranges checked by preflight
    fastv = args.fastv_layer

    image = mf.image_section(processor.image_processor)
    H, W = image["height"], image["width"]
    lang = model.model.language_model
    lm_head = model.lm_head

    # -- vision + projector ------------------------------------------------------------------------------------------
    pos = model.nuwa_vision_pos
    n_patches = (H // cfg.vision_config.patch_size) * (W // cfg.vision_config.patch_size)
    if pos is not None and pos.shape[0] != n_patches:
        raise SystemExit(f"error: {args.checkpoint / VISION_POS_FILE} has {pos.shape[0]} rows, the {H}x{W} input "
                         f"gives {n_patches} patches")
    vw = VisionWrapper(model.model.vision_tower, H, W, cfg.vision_feature_layer, args.metric_layer,
                       args.similarity_layers, feature_offset=model.nuwa_vision_pos)
    info = vw.info
    vis_bytes = sum(p.numel() * 4 for p in model.model.vision_tower.parameters())
    print(f"[export] vision tower ({info.kind}, {info.num_layers} layers) -> vision.onnx")
    ex.export_vision(vw, H, W, out / "vision.onnx", external=vis_bytes > BIG)
    print("[export] projector -> projector.onnx")
    ex.export_projector(model.model.multi_modal_projector, info.hidden_size, out / "projector.onnx", external=False)

    # -- decoder ---------------------------------------------------------------------------------------------------
    table = lang.embed_tokens.weight.detach().numpy()
    tied = lm_head.weight.data_ptr() == lang.embed_tokens.weight.data_ptr() or \
        torch.equal(lm_head.weight, lang.embed_tokens.weight)
    dec_bytes = sum(p.numel() * 4 for p in lang.parameters()) // 2
    cuts = f"[0,{fastv}), middle [{fastv},{split})" if fastv else f"[0,{split})"
    print(f"[export] decoder head {cuts} and tail [{split},{n_layers}) (tied lm_head: {tied})")
    for stale in ("decoder_mid.onnx", "decoder_mid.onnx.data"):
        (out / stale).unlink(missing_ok=True)
    ex.export_decoder(lang, lm_head, split, out / "decoder_head.onnx", out / "decoder_tail.onnx",
                      external_head=dec_bytes > BIG, external_tail=tied or dec_bytes > BIG,
                      fastv_layer=fastv, middle_path=out / "decoder_mid.onnx" if fastv else None)
    for f in out.glob("embed_tokens.*.bin"):
        f.unlink()
    head_file, tail_file = "decoder_head.onnx", "decoder_tail.onnx"
    mid_file = "decoder_mid.onnx" if fastv else None
    quant: dict = {}
    if args.quantize_decoder:
        bits = 8 if args.quantize_decoder == "int8" else 4
        keep = [] if bits == 8 else _lm_head_nodes(out / "decoder_tail.onnx")
        for src in ("decoder_head", "decoder_mid", "decoder_tail") if fastv else ("decoder_head", "decoder_tail"):
            ex.quantize_decoder_nbits(out / f"{src}.onnx", out / f"{src}.{args.quantize_decoder}.onnx", bits,
                                      keep if src == "decoder_tail" else [])
        head_file, tail_file = f"decoder_head.{args.quantize_decoder}.onnx", f"decoder_tail.{args.quantize_decoder}.onnx"
        mid_file = f"decoder_mid.{args.quantize_decoder}.onnx" if fastv else None
        quant["decoder"] = {"method": f"MatMulNBits {bits}-bit weight-only, block 128, symmetric, "
                                      f"accuracy_level {ex.NBITS_ACCURACY_LEVEL}",
                            "lm_head_fp32": bits == 4}
    table_head = args.lm_head == "table"
    if table_head and not tied:
        raise SystemExit("--lm-head table needs lm_head tied to the token embedding (tie_word_embeddings)")
    if table_head:
        dropped = ex.tail_to_final_hidden(out / tail_file, out / tail_file, tcfg.hidden_size)
        print(f"[export] lm_head cut from {tail_file} (dropped {', '.join(dropped)}): the runtime applies the table")
        quant["decoder"]["lm_head"] = f"the {args.embeddings} embedding table, applied by the runtime"
    embeddings = ex.find_shared_embedding(out / tail_file, table) if tied and not table_head else None
    if embeddings is None and args.embeddings == "q8":
        embeddings = ex.write_q8_table(table, out / "embed_tokens.q8.bin")
    elif embeddings is None:
        embeddings = ex.write_f16_table(table, out / "embed_tokens.f16.bin")
    else:
        print(f"[export] embedding table shared with lm_head inside {embeddings['file']} @ {embeddings['offset']}")

    # -- tokenizer + prompt ------------------------------------------------------------------------------------------
    tok = processor.tokenizer
    src_tok = args.checkpoint / "tokenizer.json"
    if src_tok.exists():
        shutil.copyfile(src_tok, out / "tokenizer.json")
    else:
        tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    mf.compact_json(out / "tokenizer.json")  # no indentation: SmolLM2's 3.5 MB file becomes 1.6 MB
    image_token = getattr(processor, "image_token", None) or "<image>"
    image_token_id = cfg.image_token_id
    if tok.convert_tokens_to_ids(image_token) != image_token_id:
        raise SystemExit(f"image token {image_token!r} is not id {image_token_id} in the tokenizer")
    tok_section = mf.tokenizer_section(tok, image_token, image_token_id)
    prompt = mf.derive_prompt(processor, image_token)
    grid_h, grid_w = H // info.patch_size, W // info.patch_size
    img, _ = verify_image(args.verify_image)
    mf.check_prompt_rule(processor, str(out / "tokenizer.json"), prompt, tok_section, grid_h * grid_w, img)
    print(f"[export] prompt template {prompt['template']!r} add_bos={prompt['add_bos']} (matches LlavaProcessor)")

    hd = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    manifest = {
        "format_version": 1,
        "id": args.id or out.name,
        "architecture": "llava",
        "source": {"checkpoint": str(args.checkpoint), "transformers": transformers.__version__,
                   "exported_by": "onnx/export_llava.py",
                   **({"vision_position_table": f"{VISION_POS_FILE} {list(model.nuwa_vision_pos.shape)}, added to "
                                                "`features` inside the vision graph"}
                      if model.nuwa_vision_pos is not None else {})},
        "image": image,
        "vision": {
            "file": "vision.onnx", "fp32_file": "vision.onnx", "input": "pixel_values",
            "features_output": "features", "cls_attention_output": "cls_attention", "similarity_output": "similarity",
            "patch_size": info.patch_size, "grid_h": grid_h, "grid_w": grid_w, "hidden_size": info.hidden_size,
            "num_layers": info.num_layers, "has_cls": info.has_cls, "feature_layer": cfg.vision_feature_layer,
            "metric_layer": args.metric_layer, "similarity_layers": args.similarity_layers,
        },
        "projector": {"file": "projector.onnx", "input": "image_features", "output": "image_embeds"},
        "embeddings": {k: v for k, v in embeddings.items() if k != "shared_with"},
        "decoder": {
            "num_layers": n_layers, "split_layer": split, "hidden_size": tcfg.hidden_size,
            "num_attention_heads": tcfg.num_attention_heads, "num_key_value_heads": tcfg.num_key_value_heads,
            "head_dim": hd, "vocab_size": tcfg.vocab_size, "max_position_embeddings": tcfg.max_position_embeddings,
            "kv_dtype": "f32",
            "head": {"file": head_file, "inputs_embeds": "inputs_embeds", "position_ids": "position_ids",
                     "past_key": "past_key.%d", "past_value": "past_value.%d", "hidden_states": "hidden_states",
                     "new_key": "new_key.%d", "new_value": "new_value.%d", "attention_row": "attention_row"},
            "middle": [{"file": mid_file, "first_layer": fastv, "last_layer": split, "hidden_states": "hidden_states",
                        "position_ids": "position_ids", "past_key": "past_key.%d", "past_value": "past_value.%d",
                        "output": "hidden_states_out", "new_key": "new_key.%d", "new_value": "new_value.%d",
                        "attention_row": "attention_row"}] if fastv else [],
            "tail": {"file": tail_file, "hidden_states": "hidden_states", "position_ids": "position_ids",
                     "past_key": "past_key.%d", "past_value": "past_value.%d",
                     **({"final_hidden": "final_hidden"} if table_head else {"logits": "logits"}),
                     "new_key": "new_key.%d", "new_value": "new_value.%d"},
        },
        "tokenizer": tok_section,
        "prompt": prompt,
        "box_format": {"kind": "normalized_xyxy", "decimals": 2},
        "pruning": {"stage2_layer": split, "fastv_layer": fastv or split},
    }
    if args.quantize_vision:
        ex.quantize_vision_int8(out / "vision.onnx", out / "vision.int8.onnx")
        manifest["vision"]["file"] = "vision.int8.onnx"
        quant["vision"] = {"file": "vision.int8.onnx",
                           "method": "onnxruntime quantize_dynamic, per-channel QInt8 weights"}
    if quant:
        manifest["quantization"] = quant
    write_manifest(out, manifest)
    return manifest


def _lm_head_nodes(tail: Path) -> list[str]:
    """Names of the nodes that consume the lm_head weight (kept fp32 under 4-bit quantisation)."""
    import onnx

    m = onnx.load(str(tail), load_external_data=False)
    return [n.name for n in m.graph.node if any("lm_head" in i for i in n.input)]


def write_manifest(out: Path, manifest: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def vision_quant_report(ortm_fp32: vf.OrtModel, out: Path, manifest: dict, pixel_values: np.ndarray, name: str):
    """Accuracy cost of vision.int8.onnx vs vision.onnx on a real image, recorded into the manifest."""
    q = vf.OrtModel(out, vision_file=manifest["vision"]["file"])
    a, b = ortm_fp32.run_vision(pixel_values), q.run_vision(pixel_values)
    rep = {"image": name}
    for k in ("features", "cls_attention", "similarity"):
        rep[k] = {"cosine": round(vf.cosine(a[k], b[k]), 6), "max_abs": float(f"{vf.max_abs(a[k], b[k]):.4g}"),
                  "ref_max_abs": float(f"{np.abs(a[k]).max():.4g}")}
        print(f"[quant] vision int8 {k}: cosine {rep[k]['cosine']:.6f} max_abs {rep[k]['max_abs']:.4g}"
              f" (fp32 |max| {rep[k]['ref_max_abs']:.4g})")
    manifest["quantization"]["vision"]["accuracy_vs_fp32"] = rep
    write_manifest(out, manifest)


def verify(args, manifest: dict) -> dict:
    """Replay the graphs with onnxruntime against the PyTorch model; fail above LOGIT_TOL (fp32)."""
    processor, model = load_checkpoint(args.checkpoint)
    img, name = verify_image(args.verify_image)
    text = "What is in the image?"
    input_ids, pixel_values = mf.processor_input_ids(processor, text, img)
    v = manifest["vision"]
    ref = vf.hf_vision(model, pixel_values, v["feature_layer"], v["metric_layer"], v["similarity_layers"])
    steps = 1 + args.verify_steps
    emb = vf.hf_inputs_embeds(model, input_ids, pixel_values, ref["image_embeds"])
    tokens, ref_logits = vf.hf_greedy(model, input_ids, pixel_values, steps,
                                      inputs_embeds=emb if model.nuwa_vision_pos is not None else None)
    ref_row = vf.hf_attention_row(model, emb, manifest["decoder"]["split_layer"])
    fp32 = vf.OrtModel(args.out, vision_file=v["fp32_file"])
    ort = fp32.generate(input_ids, pixel_values, tokens)
    # Decoder-only fp32 check runs on the fp32 graphs; quantised decoders are reported, not gated.
    errs = {k: vf.max_abs(ort[k], ref[k]) for k in ("features", "cls_attention", "similarity", "image_embeds")}
    errs["attention_row"] = vf.max_abs(ort["attention_row"], ref_row)
    errs["logits"] = vf.max_abs(ort["step_logits"], ref_logits)
    print(f"[verify] image {name}, {len(input_ids)} prompt tokens, {steps} logit steps (prefill + decode)")
    for k, e in errs.items():
        print(f"[verify] max abs error {k:14s} {e:.3g}")
    # Compared up to the first EOS: what follows it is never generated, and after it a near-tie between two junk
    # tokens can flip under quantisation.
    eos = processor.tokenizer.eos_token_id

    def until_eos(ids):
        return ids[:ids.index(eos) + 1] if eos in ids else ids

    if until_eos(ort["argmax"]) != until_eos(tokens):
        raise SystemExit(f"greedy tokens differ: ORT {ort['argmax']} vs HF {tokens}")
    if manifest["decoder"]["head"]["file"] == "decoder_head.onnx" and errs["logits"] > LOGIT_TOL:
        raise SystemExit(f"fp32 logits differ by {errs['logits']:.3g} > {LOGIT_TOL}")
    # The Stage-1 signals and the Stage-2 row feed pruning, not the greedy tokens: a wrong one passes the token
    # check, so each is gated on its own (the tower and projector always run fp32 here; the row only when the
    # decoder head is fp32, as for the logits).
    refs = {k: ref[k] for k in ("features", "cls_attention", "similarity", "image_embeds")}
    if manifest["decoder"]["head"]["file"] == "decoder_head.onnx":
        refs["attention_row"] = ref_row
    for k, r in refs.items():
        tol = SIGNAL_REL_TOL * max(1.0, float(np.abs(np.asarray(r)).max()))
        if errs[k] > tol:
            raise SystemExit(f"fp32 {k} differs from PyTorch by {errs[k]:.3g} > {tol:.3g} "
                             f"({SIGNAL_REL_TOL} of its largest magnitude)")
    if manifest.get("quantization", {}).get("vision"):
        vision_quant_report(fp32, args.out, manifest, pixel_values, name)
    print(f"[verify] OK: greedy tokens {until_eos(tokens)} identical (up to EOS)")
    return errs


def main(argv=None):
    args = parse_args(argv)
    preflight(args)
    torch.manual_seed(0)
    # Everything is written to a staging directory beside --out, verified there, and only then swapped in: a
    # failed or interrupted export leaves --out as it was (before, a failure left the old manifest and tower next
    # to the new decoder, which the runtime loaded and ran), and files of an earlier model cannot linger.
    args.id = args.id or args.out.name
    # Resolved, so that an --out that is a symlink has its target replaced (not the link, by a directory beside it).
    final = args.out.resolve()
    staging = final.parent / f".{final.name}.export-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    args.out = staging
    try:
        manifest = export_model(args)
        for f in sorted(staging.iterdir()):
            if f.is_file():
                print(f"[export] {f.name:28s} {f.stat().st_size:>12,d} bytes")
        if not args.no_verify:
            verify(args, manifest)
        if args.ship_quantized_only:
            ship_quantized_only(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"[export] failed: {final} left unchanged", file=sys.stderr)
        raise
    finally:
        args.out = final
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"[export] wrote {final}")


def ship_quantized_only(out: Path, manifest: dict) -> None:
    """Remove every graph (and external data) the manifest no longer names: the fp32 originals of quantised graphs."""
    if manifest["vision"].get("fp32_file") != manifest["vision"]["file"]:
        manifest["vision"].pop("fp32_file", None)
    d = manifest["decoder"]
    keep = {manifest["vision"]["file"], manifest["projector"]["file"], d["head"]["file"], d["tail"]["file"],
            *(m["file"] for m in d.get("middle", []))}
    keep |= {k + ".data" for k in keep}
    for f in sorted(out.glob("*.onnx")) + sorted(out.glob("*.onnx.data")):
        if f.name not in keep:
            print(f"[export] --ship-quantized-only: removing {f.name} ({f.stat().st_size:,d} bytes)")
            f.unlink()
    write_manifest(out, manifest)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"[export] shipped model: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
