"""Llama decoder split into a head (layers [0, K)) and a tail (layers [K, N) + final norm + lm_head).

Both are thin wrappers around the Hugging Face submodules (q/k/v/o projections, RMS norms, rotary embedding, MLP);
only the attention itself is written out, because the graph contract needs things a HF cache cannot express:

* explicit past KV tensors per layer in SEQUENCE-MAJOR layout [1, P, kv_heads, head_dim] (P may be 0);
* outputs hold ONLY the S new positions' keys (post-RoPE) and values, the runtime appends them in place;
* implicit mask: the S current positions see all P past positions and are causal among themselves;
* GQA: query heads are grouped by kv head inside the graph (equivalent to HF's repeat_kv, without the copies);
* head: `attention_row` [1, P+S] = softmax(q k^T / sqrt(d)) in fp32 at layer K-1, row of the LAST query, mean over
  heads (transformers 5 decoder layers discard attention weights, so it is recomputed here explicitly);
* tail: logits of the LAST position only, [1, vocab]; lm_head is applied with F.linear on a 2-D input so the
  exported weight keeps its [vocab, hidden] layout (the runtime can memory-map it as the embedding table when tied).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _DecoderStack(nn.Module):
    """Shared machinery: runs HF LlamaDecoderLayer pieces over [first, last) with explicit KV."""

    def __init__(self, language_model: nn.Module, first: int, last: int):
        super().__init__()
        cfg = language_model.config
        self.first, self.last = first, last
        self.layers = nn.ModuleList([language_model.layers[i] for i in range(first, last)])
        self.rotary_emb = language_model.rotary_emb
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin, past_k, past_v, want_row: bool):
        # Decode-speed layout (onnx/bench/README.md): shapes use constants (-1 for S) so the exported graph has no
        # Shape/Gather/Unsqueeze/Concat chains per reshape; GQA groups the query heads by kv head ([KV, S*rep, d])
        # instead of repeating keys/values `rep` times (no Tile of the whole cache); the sequence-major cache is
        # flattened with a free Reshape (not an index, which exports as a copying Gather) and transposed once.
        # Head h = g * rep + r uses kv head g, HF's repeat_kv order. (Splitting scores/values into past and new
        # blocks to skip the Concat crashes ORT 1.31's optimised graph with SIGFPE at P = 0, so the Concat stays.)
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        rep = nh // nkv
        q = attn.q_proj(x).view(1, -1, nh, hd)  # [1, S, H, d]
        k = attn.k_proj(x).view(1, -1, nkv, hd)  # [1, S, KV, d] (sequence-major, as stored)
        v = attn.v_proj(x).view(1, -1, nkv, hd)
        c, sn = cos.unsqueeze(2), sin.unsqueeze(2)  # [1, S, 1, d]
        q = q * c + _rotate_half(q, hd // 2) * sn
        k = k * c + _rotate_half(k, hd // 2) * sn  # post-RoPE new keys, returned as is
        qg = q.view(-1, nkv, rep, hd).transpose(0, 1).reshape(nkv, -1, hd)  # [KV, S*rep, d], rows (s, r)
        keys = torch.cat([past_k, k], dim=1).view(-1, nkv, hd).permute(1, 2, 0)  # [KV, d, P+S]
        vals = torch.cat([past_v, v], dim=1).view(-1, nkv, hd).transpose(0, 1)  # [KV, P+S, d]
        t = keys.shape[2]
        scores = torch.matmul(qg, keys) * attn.scaling  # [KV, S*rep, P+S]
        # Implicit mask: query i (absolute P+i) sees key j iff j <= P+i.
        qi = torch.arange(k.shape[1], device=x.device) + (t - k.shape[1])
        allowed = (torch.arange(t, device=x.device).unsqueeze(0) <= qi.unsqueeze(1)).unsqueeze(1)  # [S, 1, P+S]
        scores = scores.view(nkv, -1, rep, t).masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.reshape(nkv, -1, t).float(), dim=-1).to(q.dtype)  # [KV, S*rep, P+S]
        out = torch.matmul(probs, vals)  # [KV, S*rep, d]
        out = out.view(nkv, -1, rep, hd).transpose(0, 1).reshape(1, -1, nh * hd)  # [1, S, H*d]
        row = None
        if want_row:  # last query's row, mean over all heads: [1, P+S]
            t = probs.shape[-1]
            row = probs.float().view(nkv, -1, rep, t)[:, -1].reshape(nh, t).mean(dim=0, keepdim=True)
        return attn.o_proj(out), k, v, row

    def run(self, h: torch.Tensor, position_ids: torch.Tensor, past: list[torch.Tensor], row_layer: int | None):
        cos, sin = self.rotary_emb(h, position_ids)
        new_kv, row = [], None
        for j, layer in enumerate(self.layers):
            gi = self.first + j
            residual = h
            x = layer.input_layernorm(h)
            a, nk, nv, r = self._attention(layer.self_attn, x, cos, sin, past[2 * j], past[2 * j + 1], gi == row_layer)
            if r is not None:
                row = r
            h = residual + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new_kv += [nk, nv]
        return h, new_kv, row


class DecoderHead(_DecoderStack):
    """(inputs_embeds, position_ids, past_key.i, past_value.i ...) ->
    (hidden_states, attention_row, new_key.i, new_value.i ...) for layers [first, last): the head when first == 0,
    a middle segment (input hidden states from the previous segment) otherwise. attention_row is at layer last-1."""

    def __init__(self, language_model: nn.Module, last: int, first: int = 0):
        super().__init__(language_model, first, last)

    def forward(self, inputs_embeds, position_ids, *past):
        h, new_kv, row = self.run(inputs_embeds, position_ids, list(past), self.last - 1)
        return (h, row, *new_kv)


class DecoderTail(_DecoderStack):
    """(hidden_states, position_ids, past_key.i, past_value.i ...) -> (logits[last], new_key.i, new_value.i ...)
    for layers [K, N) + final norm + lm_head."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear, split_layer: int):
        super().__init__(language_model, split_layer, language_model.config.num_hidden_layers)
        self.norm = language_model.norm
        self.lm_head = lm_head

    def forward(self, hidden_states, position_ids, *past):
        h, new_kv, _ = self.run(hidden_states, position_ids, list(past), None)
        last = self.norm(h[:, -1, :])  # [1, hidden] (2-D so lm_head exports as Gemm over [vocab, hidden])
        logits = F.linear(last, self.lm_head.weight, self.lm_head.bias)
        return (logits, *new_kv)


def io_names(first: int, last: int, head: bool) -> tuple[list[str], list[str]]:
    """ONNX input/output names, `%d` = global layer index (matches the manifest templates). A middle segment
    (head=True, first > 0) reads `hidden_states` and writes `hidden_states_out` (a graph cannot reuse a name)."""
    kv_in, kv_out = [], []
    for i in range(first, last):
        kv_in += [f"past_key.{i}", f"past_value.{i}"]
        kv_out += [f"new_key.{i}", f"new_value.{i}"]
    if head and first > 0:
        return ["hidden_states", "position_ids", *kv_in], ["hidden_states_out", "attention_row", *kv_out]
    if head:
        return ["inputs_embeds", "position_ids", *kv_in], ["hidden_states", "attention_row", *kv_out]
    return ["hidden_states", "position_ids", *kv_in], ["logits", *kv_out]
