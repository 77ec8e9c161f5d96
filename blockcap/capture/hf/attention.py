"""Attention helpers the Hugging Face capture modules share: masks, windows, the fused path.

Eager attention in transformers takes causality from an additive mask alone; ``additive_mask``
builds the values its mask functions build, so adding it is bitwise the library's own step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from blockcap.capture.hf.parts import Decoder

# model_type -> how its forward picks each layer's sliding window: "every" layer gets
# config.sliding_window when it is set; "layer_types" only the layers config.layer_types marks
# "sliding_attention"; a type missing here never slides.
WINDOW_RULES = {
    "mistral": "every",
    "mixtral": "every",
    "phi3": "every",
    "qwen3_moe": "every",
    "qwen2": "layer_types",
    "qwen3": "layer_types",
    "qwen2_moe": "layer_types",
    "gemma2": "layer_types",
    "gemma3_text": "layer_types",
}


def config_windows(cfg: Any, n: int) -> list[int | None]:
    """The attention window of each of ``n`` layers (None: full causal), as the model's forward
    chooses it from its config."""
    rule = WINDOW_RULES.get(cfg.model_type)
    if rule == "every":
        return [cfg.sliding_window] * n
    if rule == "layer_types":
        return [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types[:n]]
    return [None] * n


def sliding_windows(model: Decoder) -> list[int | None]:
    """Each layer's attention window (None: full causal)."""
    return config_windows(model.config, len(model.layers))


def causal_allowed(T: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(T, T) bool: query i may attend key j when j <= i (and j > i - window for a sliding window)."""
    i = torch.arange(T, device=device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed = allowed & (i[None, :] > i[:, None] - window)
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, T): 0 where allowed, ``finfo(dtype).min`` elsewhere (what transformers' eager
    mask functions produce)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, allowed: torch.Tensor,
    window: int | None, want_pattern: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """SDPA over (B, heads, T, head_dim) q and (B, kv_heads, T, head_dim) k, v.

    Returns the output as (B, T, heads, head_dim), like the eager functions, and when asked the
    softmax pattern computed explicitly (SDPA does not return it).
    """
    gqa = q.shape[1] != k.shape[1]
    if window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    pattern = None
    if want_pattern:
        keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if gqa else k
        scores = torch.matmul(q, keys.transpose(-2, -1)) * scaling + additive_mask(allowed, q.dtype)
        pattern = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return out.transpose(1, 2), pattern
