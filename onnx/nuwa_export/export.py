"""torch -> ONNX for each graph of the model directory, plus the embedding table and quantisation.

The TorchScript-based exporter (dynamo=False) is used: on these thin wrappers it produces small, clean graphs with
named dynamic axes, in a few seconds, and handles the zero-length past (P = 0) without specialising on it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .decoder import DecoderHead, DecoderTail, io_names
from .vision import ProjectorWrapper, VisionWrapper

OPSET = 17
NBITS_ACCURACY_LEVEL = 4  # MatMulNBits: int8 compute (see quantize_decoder_nbits)


def _save(model, path: Path, external: bool) -> None:
    """Writes `model` to `path`, weights in `<path>.data` when `external` (replacing any old one), and checks it."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict, external: bool) -> None:
    """Export with the legacy exporter, then re-save (optionally with all weights in `<file>.data`)."""
    module.eval()
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(tmp), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    model = onnx.load(str(tmp), load_external_data=True)
    for f in tmp.parent.glob(tmp.name + "*"):
        f.unlink()
    _save(model, path, external)


def export_vision(wrapper: VisionWrapper, height: int, width: int, path: Path, external: bool) -> None:
    x = torch.zeros(1, 3, height, width)
    _export(wrapper, (x,), path, ["pixel_values"], ["features", "cls_attention", "similarity"], {}, external)


def export_projector(projector: torch.nn.Module, vision_hidden: int, path: Path, external: bool) -> None:
    x = torch.zeros(1, 7, vision_hidden)
    _export(ProjectorWrapper(projector), (x,), path, ["image_features"], ["image_embeds"],
            {"image_features": {1: "M"}, "image_embeds": {1: "M"}}, external)


def _decoder_sample(cfg, n_layers: int, s: int = 3, p: int = 2):
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h = torch.randn(1, s, cfg.hidden_size)
    pos = torch.arange(p, p + s).unsqueeze(0)
    past = [torch.randn(1, p, cfg.num_key_value_heads, hd) for _ in range(2 * n_layers)]
    return h, pos, past


def _decoder_axes(inputs: list[str], outputs: list[str]) -> dict:
    axes = {}
    for n in inputs:
        axes[n] = {1: "P"} if n.startswith("past_") else {1: "S"}
    for n in outputs:
        if n.startswith("new_") or n in ("hidden_states", "hidden_states_out"):
            axes[n] = {1: "S"}
        elif n == "attention_row":
            axes[n] = {1: "T"}
    return axes


def _lm_head_as_gemm(path: Path, weight: np.ndarray, external: bool) -> None:
    """The exporter constant-folds lm_head's weight into a transposed [hidden, vocab] MatMul initializer. Rewrite
    that node as Gemm(x, W, transB=1) over the original [vocab, hidden] weight named `lm_head.weight`, so the table
    is stored row-major [vocab, hidden] (shareable with the token embedding when tied)."""
    model = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    wt = weight.T
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if tuple(init.dims) != wt.shape or not np.array_equal(numpy_helper.to_array(init), wt):
            continue
        model.graph.initializer.remove(init)
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight, np.float32),
                                                               "lm_head.weight"))
        node.op_type = "Gemm"
        node.input[1] = "lm_head.weight"
        node.attribute.append(onnx.helper.make_attribute("transB", 1))
        break
    else:
        raise RuntimeError("lm_head MatMul not found in the tail graph")
    _save(model, path, external)


def export_decoder(language_model, lm_head, split: int, head_path: Path, tail_path: Path,
                   external_head: bool, external_tail: bool, fastv_layer: int | None = None,
                   middle_path: Path | None = None) -> None:
    """Head [0, K) and tail [K, N); with `fastv_layer` L (1 <= L < K) the head is cut again into [0, L) and a
    middle segment [L, K) at `middle_path`, so FastV can prune at its own early layer and Nüwa at K."""
    cfg = language_model.config
    n = cfg.num_hidden_layers
    first_cut = fastv_layer if fastv_layer else split
    segments = [(0, first_cut, head_path)]
    if fastv_layer:
        if middle_path is None or not 1 <= fastv_layer < split:
            raise ValueError(f"fastv_layer {fastv_layer} needs a middle path and must lie in [1, {split})")
        segments.append((fastv_layer, split, middle_path))
    for first, last, path in segments:
        seg = DecoderHead(language_model, last, first=first)
        h, pos, past = _decoder_sample(cfg, last - first)
        ins, outs = io_names(first, last, head=True)
        _export(seg, (h, pos, *past), path, ins, outs, _decoder_axes(ins, outs), external_head)
    tail = DecoderTail(language_model, lm_head, split)
    h, pos, past = _decoder_sample(cfg, n - split)
    ins, outs = io_names(split, n, head=False)
    _export(tail, (h, pos, *past), tail_path, ins, outs, _decoder_axes(ins, outs), external_tail)
    if lm_head.bias is None:
        _lm_head_as_gemm(tail_path, lm_head.weight.detach().numpy(), external_tail)


def find_shared_embedding(tail_path: Path, table: np.ndarray) -> dict | None:
    """If the tail keeps an fp32 initializer byte-identical to the [vocab, hidden] embedding table in its external
    data file, return the manifest `embeddings` entry pointing at it (file, byte offset, f32); else None."""
    model = onnx.load(str(tail_path), load_external_data=False)
    for init in model.graph.initializer:
        if tuple(init.dims) != table.shape or init.data_type != onnx.TensorProto.FLOAT:
            continue
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in init.external_data}
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
        data_file = tail_path.parent / ext["location"]
        raw = np.fromfile(data_file, dtype="<f4", count=length // 4, offset=offset)
        if raw.size == table.size and np.array_equal(raw.reshape(table.shape), table.astype(np.float32)):
            return {"file": ext["location"], "offset": offset, "dtype": "f32",
                    "rows": int(table.shape[0]), "cols": int(table.shape[1]), "shared_with": init.name}
    return None


def write_f16_table(table: np.ndarray, path: Path) -> dict:
    table.astype("<f2").tofile(path)
    return {"file": path.name, "offset": 0, "dtype": "f16", "rows": int(table.shape[0]), "cols": int(table.shape[1])}


def write_q8_table(table: np.ndarray, path: Path) -> dict:
    """Row-scaled symmetric int8 (manifest dtype "q8_row"): per row a little-endian f32 scale max|row| / 127, then
    the row's values / scale rounded to int8. A quarter of the f32 table, half of f16."""
    t = table.astype(np.float32)
    scale = np.abs(t).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(t / scale[:, None]), -127, 127).astype(np.int8)
    rows = np.empty((t.shape[0], 4 + t.shape[1]), np.uint8)
    rows[:, :4] = scale.astype("<f4")[:, None].view(np.uint8)
    rows[:, 4:] = q.view(np.uint8)
    rows.tofile(path)
    return {"file": path.name, "offset": 0, "dtype": "q8_row", "rows": int(t.shape[0]), "cols": int(t.shape[1])}


def quantize_vision_int8(src: Path, dst: Path) -> None:
    """Dynamic (weight int8 per-channel, activations quantised at run time) quantisation of the vision graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)


def _lm_head_gemm_to_matmul(model: onnx.ModelProto, keep_fp32: list[str]) -> None:
    """The quantiser only handles MatMul: turn the tail's Gemm(x, lm_head.weight, transB=1) back into a MatMul over
    the [hidden, vocab] transpose so lm_head is quantised too (unless it is in keep_fp32). lm_head is the largest
    single weight (vocab x hidden: 113 MB fp32 on SmolLM2) and its fp32 GEMV was ~20% of an int8 decode step; the
    embedding table then goes to embed_tokens.f16.bin, as the quantised tail no longer holds it in fp32."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gemm" or node.name in keep_fp32 or node.input[1] != "lm_head.weight":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB") != 1 or attrs.get("transA", 0) or len(node.input) > 2:
            continue
        w = numpy_helper.to_array(inits["lm_head.weight"])
        model.graph.initializer.remove(inits["lm_head.weight"])
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "lm_head.weight_t"))
        node.op_type = "MatMul"
        node.input[1] = "lm_head.weight_t"
        del node.attribute[:]


def quantize_decoder_nbits(src: Path, dst: Path, bits: int, keep_fp32: list[str]) -> None:
    """Weight-only MatMulNBits quantisation (block 128, symmetric). Nodes in keep_fp32 are excluded.

    accuracy_level 4 (activations quantised to int8 per block at run time, int8 dot products): MLAS's fast CPU
    path. Without it (level 0 = fp32 compute) ONNX Runtime 1.31 runs 8-bit weights ~20x slower than this on x86
    (SmolLM2-135M decode: 270 vs 13.5 ms/token in MatMulNBits, single thread); the accuracy cost is small
    (teacher-forced mean KL vs fp32 0.013 instead of 0.003, onnx/bench/README.md)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(src), load_external_data=True)
    _lm_head_gemm_to_matmul(model, keep_fp32)
    cfg = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, bits=bits, accuracy_level=NBITS_ACCURACY_LEVEL)
    q = MatMulNBitsQuantizer(model, block_size=128, is_symmetric=True, accuracy_level=NBITS_ACCURACY_LEVEL,
                             nodes_to_exclude=keep_fp32, algo_config=cfg)
    q.process()
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.unlink()
    q.model.save_model_to_file(str(dst), use_external_data_format=True)


def tail_to_final_hidden(src: Path, dst: Path, hidden: int, logits: str = "logits", output: str = "final_hidden",
                         share_data: bool = False) -> list[str]:
    """Cut a tail graph's lm_head off: the graph then ends at the final norm and outputs `output` f32 [1, hidden]
    (manifest `decoder.tail.final_hidden`), and the runtime applies the tied embedding table itself. The table is
    then stored once: a quantised tail otherwise carries lm_head as its own vocab x hidden int8 copy (12.6 MB of the
    256-wide demo model's 60.7). Works on any lm_head op (Gemm, MatMul, MatMulNBits) whose first input is the normed
    hidden state. Returns the initializers dropped with it.

    `share_data`: keep the remaining weights where they are (external references into src's .data file, which must
    sit beside dst): for a tail whose .data also holds the embedding table the manifest points into. Otherwise the
    graph and its remaining weights are rewritten (dst.data; src may equal dst)."""
    model = onnx.load(str(src), load_external_data=not share_data)
    g = model.graph
    heads = [n for n in g.node if logits in n.output]
    if len(heads) != 1 or heads[0].op_type not in ("Gemm", "MatMul", "MatMulNBits"):
        raise SystemExit(f"{src}: no single Gemm/MatMul/MatMulNBits node produces {logits!r}")
    head = heads[0]
    x = head.input[0]
    g.node.remove(head)
    g.node.append(onnx.helper.make_node("Identity", [x], [output], name="/final_hidden"))
    i = [o.name for o in g.output].index(logits)
    g.output.remove(g.output[i])
    g.output.insert(i, onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [1, hidden]))
    used = {name for n in g.node for name in n.input}
    dropped = [t.name for t in g.initializer if t.name not in used]
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    if share_data:
        if src.resolve().parent != dst.resolve().parent:
            raise SystemExit("share_data needs dst beside src (the weights stay in src's .data file)")
        onnx.save_model(model, str(dst))
    else:
        data = dst.with_name(dst.name + ".data")
        if data.exists():
            data.unlink()
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    onnx.checker.check_model(str(dst))
    return dropped


def file_size(path: Path) -> int:
    return os.path.getsize(path) if path.exists() else 0
