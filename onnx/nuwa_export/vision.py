"""Vision-tower wrapper exported as `vision.onnx`.

The wrapper runs the Hugging Face tower's own submodules explicitly (embeddings, pre-norm, each encoder layer) so
that it can emit, in one pass, the three Stage-1 signals of docs/model-format.md:

  features       hidden_states[feature_layer] with the CLS token dropped        [1, N, C]
  cls_attention  sum over heads of the CLS query row of the attention
                 probabilities inside layer `metric_layer` (HF attentions index),
                 patch columns only                                              [1, N]
  similarity     mean of the last `similarity_layers` hidden_states entries,
                 CLS dropped, not normalised                                     [1, N, C]

HF conventions: hidden_states has L+1 entries (index 0 = embeddings output after any pre-norm, index i = output of
layer i); attentions has L entries (index i = probabilities inside 0-based layer i).

Supported towers: CLIPVisionModel (pre_layrnorm, layers with layer_norm1 + self_attn) and Dinov2Model (norm1 +
attention; its hidden_states are pre-final-layernorm, so the final layernorm is never applied here). DINOv2's
position-embedding interpolation is computed once for the export size and baked in as a constant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TowerInfo:
    """Static facts about a vision tower that the manifest needs."""

    kind: str  # "clip" | "dinov2"
    num_layers: int
    hidden_size: int
    num_heads: int
    patch_size: int
    has_cls: bool


def _tower_body(vision_tower: nn.Module) -> nn.Module:
    """CLIPVisionModel wraps `vision_model` in older transformers; 5.x exposes the parts directly."""
    return getattr(vision_tower, "vision_model", vision_tower)


def tower_info(vision_tower: nn.Module) -> TowerInfo:
    cfg = vision_tower.config
    mt = cfg.model_type
    if mt in ("clip_vision_model", "clip"):
        kind = "clip"
    elif mt == "dinov2":
        kind = "dinov2"
    else:
        raise SystemExit(f"unsupported vision tower model_type {mt!r} (supported: CLIPVisionModel, Dinov2Model)")
    return TowerInfo(kind, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size, True)


# Optional file of a checkpoint dir: a learned position table [grid tokens, vision hidden] (float32 .npy) added to
# the selected features before the projector; export_llava.load_vision_pos reads it, onnx/demo/assemble.py writes it.
VISION_POS_FILE = "nuwa_vision_pos.npy"


class VisionWrapper(nn.Module):
    """pixel_values [1,3,H,W] -> (features, cls_attention, similarity), see the module docstring."""

    def __init__(self, vision_tower: nn.Module, height: int, width: int, feature_layer: int, metric_layer: int,
                 similarity_layers: int, feature_offset: torch.Tensor | None = None):
        super().__init__()
        self.info = tower_info(vision_tower)
        # A learned per-patch table [N, C] added to `features` only (the demo model's vision position table, see
        # export_llava.load_checkpoint); the Stage-1 signals (cls_attention, similarity) are the tower's own.
        self.register_buffer("feature_offset", None if feature_offset is None else feature_offset.detach().clone())
        body = _tower_body(vision_tower)
        L = self.info.num_layers
        # Normalise HF indices (negative allowed) into hidden_states / attentions positions; an index out of range
        # is refused, not wrapped (metric layer 7 of a 4-layer tower silently became layer 3).
        if not -(L + 1) <= feature_layer <= L:
            raise SystemExit(f"vision_feature_layer {feature_layer} is not a hidden_states index of a {L}-layer tower")
        if not -L <= metric_layer < L:
            raise SystemExit(f"--metric-layer must be in -{L}..{L - 1} for a {L}-layer tower, got {metric_layer}")
        self.feature_idx = feature_layer % (L + 1)
        self.metric_layer_idx = metric_layer % L
        if not 1 <= similarity_layers <= L + 1:
            raise SystemExit(f"--similarity-layers must be in 1..{L + 1}, got {similarity_layers}")
        self.similarity_layers = similarity_layers
        self.kind = self.info.kind
        if self.kind == "clip":
            self.embeddings = body.embeddings
            self.pre_norm = body.pre_layrnorm
            self.layers = body.encoder.layers
        else:
            emb = body.embeddings
            self.patch_embeddings = emb.patch_embeddings
            self.cls_token = emb.cls_token
            with torch.no_grad():
                # Bake the (possibly bicubic-interpolated) position embeddings for this exact input size: call HF's
                # own interpolation with a dummy tensor of the right token count.
                n = (height // self.info.patch_size) * (width // self.info.patch_size)
                dummy = torch.zeros(1, n + 1, self.info.hidden_size)
                pos = emb.interpolate_pos_encoding(dummy, height, width).detach().clone()
            self.register_buffer("pos_embed", pos)
            self.pre_norm = nn.Identity()
            self.layers = body.encoder.layer

    # -- per-tower pieces -------------------------------------------------------------------------------------------
    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "clip":
            return self.pre_norm(self.embeddings(pixel_values))
        x = self.patch_embeddings(pixel_values)  # [1, N, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def _attn_parts(self, layer: nn.Module):
        """(pre-attention norm, attention module holding q_proj/k_proj) of one encoder layer."""
        if self.kind == "clip":
            return layer.layer_norm1, layer.self_attn
        return layer.norm1, layer.attention

    def _cls_attention(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Sum over heads of softmax(q_cls k^T * scale) recomputed from the layer's input h; patch columns only."""
        norm, attn = self._attn_parts(layer)
        x = norm(h)
        nh = self.info.num_heads
        hd = self.info.hidden_size // nh
        b, t, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(b, 1, nh, hd).transpose(1, 2)  # [1, H, 1, d] (CLS query only)
        k = attn.k_proj(x).view(b, t, nh, hd).transpose(1, 2)  # [1, H, T, d]
        scale = hd ** -0.5
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * scale, dim=-1)  # [1, H, 1, T]
        return probs.sum(dim=1)[:, 0, 1:]  # [1, N]

    def forward(self, pixel_values: torch.Tensor):
        h = self._embed(pixel_values)
        hidden_states = [h]
        cls_attention = None
        for i, layer in enumerate(self.layers):
            if i == self.metric_layer_idx:
                cls_attention = self._cls_attention(layer, h)
            h = layer(h, None)
            if isinstance(h, tuple):  # older transformers returned tuples
                h = h[0]
            hidden_states.append(h)
        features = hidden_states[self.feature_idx][:, 1:]
        if self.feature_offset is not None:
            features = features + self.feature_offset
        sim = torch.stack(hidden_states[-self.similarity_layers:], dim=0).mean(dim=0)[:, 1:]
        return features, cls_attention, sim


class ProjectorWrapper(nn.Module):
    """image_features [1, M, C] -> image_embeds [1, M, hidden] (LlavaMultiModalProjector)."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)
