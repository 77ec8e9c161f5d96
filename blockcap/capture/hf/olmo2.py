"""OLMo 2 (``model_type`` olmo2): norms after each half, none before.

An OLMo 2 block has no norm before attention or MLP: q, k and v read the block input (q and k are
RMS-normed across all heads), the MLP reads the residual stream, and each half's output is normed
(``post_attention_layernorm``, ``post_feedforward_layernorm``) before it is added. So
``proj_output`` and ``ffwd_output`` are what each half adds, after its norm (TransformerLens's
``hook_attn_out`` and ``hook_mlp_out``). Exact mode is bitwise the model on CPU in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from blockcap.capture.hf.adapter import HFAdapter
from blockcap.capture.hf.decoder import Context, DecoderCapture, decoder_dims, gated_mlp
from blockcap.capture.hf.parts import Decoder, Layer, layer_of
from blockcap.core.dims import ModelDims

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_hf_capture.py).
FUSED_TOLERANCE = 1e-5


class Olmo2Capture(DecoderCapture):
    """Embeddings and layers ``0..max(blocks)`` of an ``Olmo2Model``."""

    def block(self, i: int, layer: Layer, x: torch.Tensor, context: Context) -> dict[str, Any]:
        heads, pattern = self.attend(layer.self_attn, x, context)
        proj = layer.post_attention_layernorm(layer.self_attn.o_proj(heads))
        mid = x + proj
        hidden, down = gated_mlp(layer.mlp, mid)
        ffwd = layer.post_feedforward_layernorm(down)
        return dict(block_input=x, heads_output=heads, proj_output=proj, resid_mid=mid, mlp_hidden=hidden,
                    ffwd_output=ffwd, block_output=mid + ffwd, attention=pattern)  # fmt: skip


class Olmo2(HFAdapter):
    family = "olmo2"
    capture_class = Olmo2Capture

    @staticmethod
    def dims_of(model: Decoder) -> ModelDims:
        return decoder_dims(model, d_mlp=layer_of(model, 0).mlp.down_proj.in_features)
