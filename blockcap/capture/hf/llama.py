"""The Llama family (``model_type`` llama, mistral, qwen2, qwen3, phi3): pre-norm blocks.

One decoder layer shape: RMSNorm, rotary q/k, grouped-query attention, a gated MLP, each half
added to the residual stream after a norm before it. The members differ inside it: biases (in
the modules), Qwen3's per-head q/k norms, Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` and
partial rotary (inside its ``apply_rotary_pos_emb``), and sliding windows (Mistral and Phi-3 on
every layer when set, Qwen2/3 on the layers ``layer_types`` marks). Exact mode is bitwise the
model on CPU in float32; ``fused`` uses SDPA: within ``FUSED_TOLERANCE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from blockcap.capture.hf.adapter import HFAdapter
from blockcap.capture.hf.decoder import Context, DecoderCapture, decoder_dims, fused_gated_mlp, gated_mlp
from blockcap.capture.hf.parts import Decoder, Layer, layer_of
from blockcap.core.dims import ModelDims

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_hf_capture.py).
FUSED_TOLERANCE = 1e-5


class LlamaCapture(DecoderCapture):
    """Embeddings and layers ``0..max(blocks)`` of a Llama-family model, returning the sites."""

    def __init__(
        self, model: Decoder, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ) -> None:
        super().__init__(model, blocks, sites, fused)
        self.mlp_step = fused_gated_mlp if model.config.model_type == "phi3" else gated_mlp

    def block(self, i: int, layer: Layer, x: torch.Tensor, context: Context) -> dict[str, Any]:
        heads, pattern = self.attend(layer.self_attn, layer.input_layernorm(x), context)
        proj = layer.self_attn.o_proj(heads)
        mid = x + proj  # Phi-3's residual dropouts are the identity in eval mode
        hidden, ffwd = self.mlp_step(layer.mlp, layer.post_attention_layernorm(mid))
        return dict(block_input=x, heads_output=heads, proj_output=proj, resid_mid=mid, mlp_hidden=hidden,
                    ffwd_output=ffwd, block_output=mid + ffwd, attention=pattern)  # fmt: skip


class Llama(HFAdapter):
    family = "llama"
    capture_class = LlamaCapture

    @staticmethod
    def dims_of(model: Decoder) -> ModelDims:
        return decoder_dims(model, d_mlp=layer_of(model, 0).mlp.down_proj.in_features)
