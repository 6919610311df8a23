"""PyTorch references and the onnxruntime replay of the runtime's pipeline.

`hf_reference` computes every golden from the Hugging Face model itself (vision tower with output_attentions,
projector, language model with output_attentions for the Stage-2 row, an explicit greedy loop with the HF cache).
`ort_pipeline` runs the exported graphs exactly as the Rust runtime will: vision -> projector -> embedding table
(memory-mapped per the manifest) -> head -> tail over the prompt with P = 0, then one token per step through head
and tail with the new KV appended to sequence-major buffers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------------------- HF side
@torch.no_grad()
def hf_vision(model, pixel_values: np.ndarray, feature_layer: int, metric_layer: int, sim_layers: int) -> dict:
    vt = model.model.vision_tower
    out = vt(torch.from_numpy(pixel_values), output_hidden_states=True, output_attentions=True)
    hs, att = out.hidden_states, out.attentions
    if att is None or att[metric_layer] is None:
        raise SystemExit("the HF vision tower returned no attentions (load it with attn_implementation='eager')")
    feats = hs[feature_layer][:, 1:]
    if getattr(model, "nuwa_vision_pos", None) is not None:  # export_llava.load_vision_pos
        feats = feats + model.nuwa_vision_pos
    return {
        "features": feats.numpy(),
        "cls_attention": att[metric_layer][:, :, 0, 1:].sum(dim=1).numpy(),
        "similarity": torch.stack(hs[-sim_layers:]).mean(0)[:, 1:].numpy(),
        "image_embeds": model.model.multi_modal_projector(feats).numpy(),
    }


@torch.no_grad()
def hf_attention_row(model, inputs_embeds: torch.Tensor, split: int) -> np.ndarray:
    """Head-mean softmax row of the last query at decoder layer split-1, from the HF language model (eager)."""
    lm = model.model.language_model
    out = lm(inputs_embeds=inputs_embeds, output_attentions=True, use_cache=False)
    if out.attentions is None or out.attentions[split - 1] is None:
        raise SystemExit("the HF language model returned no attentions (attn_implementation='eager' needed)")
    return out.attentions[split - 1][0, :, -1, :].float().mean(0, keepdim=True).numpy()


@torch.no_grad()
def hf_greedy(model, input_ids: list[int], pixel_values: np.ndarray, steps: int,
              inputs_embeds: torch.Tensor | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits that produced each of them ([steps, vocab]); step 0 is the prefill. With
    `inputs_embeds` (hf_inputs_embeds) the prefill takes those instead of running the tower on `pixel_values`: the
    path for a model whose image features get more than HF's LLaVA gives them (a vision position table)."""
    if inputs_embeds is not None:
        out = model(inputs_embeds=inputs_embeds, use_cache=True)
    else:
        out = model(input_ids=torch.tensor([input_ids]), pixel_values=torch.from_numpy(pixel_values), use_cache=True)
    cache, logits = out.past_key_values, out.logits[0, -1]
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits.float().numpy())
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
    return tokens, np.stack(all_logits)


@torch.no_grad()
def hf_inputs_embeds(model, input_ids: list[int], pixel_values: np.ndarray, image_embeds: np.ndarray) -> torch.Tensor:
    ids = torch.tensor([input_ids])
    emb = model.get_input_embeddings()(ids)
    mask = ids[0] == model.config.image_token_id
    emb[0, mask] = torch.from_numpy(image_embeds[0]).to(emb.dtype)
    return emb


# ---------------------------------------------------------------------------------------------------------- ORT side
def read_table(model_dir: Path, e: dict):
    """The manifest's embedding table as a [rows, cols] array-like (rows gathered with table[ids])."""
    if e["dtype"] == "q8_row":
        raw = np.memmap(model_dir / e["file"], dtype=np.uint8, mode="r", offset=e["offset"],
                        shape=(e["rows"], 4 + e["cols"]))
        return np.ascontiguousarray(raw[:, 4:]).view(np.int8) * np.ascontiguousarray(raw[:, :4]).view("<f4")
    dt = {"f16": "<f2", "f32": "<f4"}[e["dtype"]]
    return np.memmap(model_dir / e["file"], dtype=dt, mode="r", offset=e["offset"], shape=(e["rows"], e["cols"]))


class OrtModel:
    """The exported directory driven like the Rust runtime drives it."""

    def __init__(self, model_dir: Path, vision_file: str | None = None):
        import onnxruntime as ort

        self.dir = Path(model_dir)
        self.m = json.loads((self.dir / "manifest.json").read_text())
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.log_severity_level = 3
        mk = lambda f: ort.InferenceSession(str(self.dir / f), so, providers=["CPUExecutionProvider"])  # noqa: E731
        self.vision = mk(vision_file or self.m["vision"]["file"])
        self.projector = mk(self.m["projector"]["file"])
        self.head = mk(self.m["decoder"]["head"]["file"])
        self.middle = [mk(mid["file"]) for mid in self.m["decoder"].get("middle", [])]
        self.tail = mk(self.m["decoder"]["tail"]["file"])
        self.table = read_table(self.dir, self.m["embeddings"])
        self.lm_head = None  # the table as f32 [vocab, hidden], made on first use by a `final_hidden` tail
        d = self.m["decoder"]
        self.n, self.k = d["num_layers"], d["split_layer"]
        self.kvh, self.hd = d["num_key_value_heads"], d["head_dim"]

    def run_vision(self, pixel_values: np.ndarray) -> dict:
        v = self.m["vision"]
        f, c, s = self.vision.run([v["features_output"], v["cls_attention_output"], v["similarity_output"]],
                                  {v["input"]: pixel_values})
        return {"features": f, "cls_attention": c, "similarity": s}

    def project(self, features: np.ndarray) -> np.ndarray:
        p = self.m["projector"]
        return self.projector.run([p["output"]], {p["input"]: features})[0]

    def _step(self, embeds: np.ndarray, positions: np.ndarray, kv: list[np.ndarray]):
        """One pass through head, middle segments and tail; returns logits, the attention row at the split layer
        (from the segment ending there) and the KV with the new positions appended."""
        d = self.m["decoder"]
        h, t = d["head"], d["tail"]
        segs = [(self.head, h["inputs_embeds"], h["hidden_states"], h["attention_row"], 0,
                 d["middle"][0]["first_layer"] if d.get("middle") else self.k, h)]
        segs += [(sess, mid["hidden_states"], mid["output"], mid["attention_row"], mid["first_layer"],
                  mid["last_layer"], mid) for sess, mid in zip(self.middle, d.get("middle", []))]
        hidden, row, new = embeds, None, []
        for sess, in_name, out_name, row_name, first, last, spec in segs:
            feeds = {in_name: hidden, spec["position_ids"]: positions}
            for i in range(first, last):
                feeds[spec["past_key"] % i], feeds[spec["past_value"] % i] = kv[2 * i], kv[2 * i + 1]
            names = [out_name, row_name] + sum(([spec["new_key"] % i, spec["new_value"] % i]
                                                for i in range(first, last)), [])
            outs = sess.run(names, feeds)
            hidden, new = outs[0], new + outs[2:]
            if last == self.k:
                row = outs[1]
        feeds = {t["hidden_states"]: hidden, t["position_ids"]: positions}
        for i in range(self.k, self.n):
            feeds[t["past_key"] % i], feeds[t["past_value"] % i] = kv[2 * i], kv[2 * i + 1]
        out_name = t["final_hidden"] if "final_hidden" in t else t["logits"]
        names = [out_name] + sum(([t["new_key"] % i, t["new_value"] % i] for i in range(self.k, self.n)), [])
        outs = self.tail.run(names, feeds)
        new += outs[1:]
        kv = [np.concatenate([old, nw], axis=1) for old, nw in zip(kv, new)]  # append in sequence order
        logits = outs[0]
        if "final_hidden" in t:  # tied lm_head = the embedding table, as the runtime applies it
            if self.lm_head is None:
                self.lm_head = np.asarray(self.table[: d["vocab_size"]], dtype=np.float32)
            logits = (self.lm_head @ logits[0].astype(np.float32))[None]
        return logits, row, kv

    def generate(self, input_ids: list[int], pixel_values: np.ndarray, forced: list[int] | int) -> dict:
        """Prefill + len(forced)-1 decode steps, feeding `forced` tokens (teacher forcing, so logits are comparable
        step by step with the reference); returns logits per step, greedy argmaxes and prefill signals. An int
        `forced` = that many steps feeding back each step's own argmax (greedy decoding)."""
        vis = self.run_vision(pixel_values)
        img = self.project(vis["features"])
        ids = np.asarray(input_ids)
        emb = self.table[ids].astype(np.float32)
        mask = ids == self.m["tokenizer"]["image_token_id"]
        if mask.sum() != img.shape[1]:
            raise SystemExit(f"{mask.sum()} image tokens in the prompt but {img.shape[1]} image embeddings")
        emb[mask] = img[0]
        kv = [np.zeros((1, 0, self.kvh, self.hd), np.float32) for _ in range(2 * self.n)]
        logits, row, kv = self._step(emb[None], np.arange(len(ids), dtype=np.int64)[None], kv)
        all_logits, argmax = [logits[0]], [int(logits[0].argmax())]
        pos = len(ids)
        n_steps = forced if isinstance(forced, int) else len(forced)
        for k in range(n_steps - 1):
            tok = argmax[-1] if isinstance(forced, int) else forced[k]
            e = self.table[[tok]].astype(np.float32)[None]
            logits, _, kv = self._step(e, np.array([[pos]], np.int64), kv)
            all_logits.append(logits[0])
            argmax.append(int(logits[0].argmax()))
            pos += 1
        return {**vis, "image_embeds": img, "attention_row": row, "step_logits": np.stack(all_logits),
                "argmax": argmax}


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
