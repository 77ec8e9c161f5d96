"""Gemma 2 and Gemma 3 (``model_type`` gemma2, gemma3_text, and the text tower of gemma3).

Their blocks norm each half on both sides: ``input_layernorm`` before attention and
``post_attention_layernorm`` after it, ``pre_feedforward_layernorm`` before the MLP and
``post_feedforward_layernorm`` after it. So ``proj_output`` and ``ffwd_output`` are what each half
adds to the residual stream, after its post-norm (TransformerLens's ``hook_attn_out`` and
``hook_mlp_out``). Both scale the embeddings by sqrt(d_model) (inside ``embed_tokens``), alternate
sliding-window and global layers (``layer_types``) and scale scores by
``query_pre_attn_scalar ** -0.5``. Gemma 2 softcaps attention logits (so its attention stays exact
under ``fused``); Gemma 3 norms q and k per head instead and has a rotary table per layer type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from blockcap.capture.hf.adapter import HFAdapter
from blockcap.capture.hf.decoder import Context, DecoderCapture, decoder_dims, gated_mlp
from blockcap.capture.hf.parts import Decoder, Layer, layer_of
from blockcap.core.dims import ModelDims

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_hf_capture.py).
FUSED_TOLERANCE = 1e-5


class GemmaCapture(DecoderCapture):
    """Embeddings and layers ``0..max(blocks)`` of a Gemma 2 or Gemma 3 text model."""

    def __init__(
        self, model: Decoder, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ) -> None:
        cfg = model.config
        # Gemma 3's attention keeps the config's attn_logit_softcapping but does not apply it
        softcap = cfg.attn_logit_softcapping if cfg.model_type == "gemma2" else None
        super().__init__(model, blocks, sites, fused, softcap=softcap)
        self.per_type_rotary = cfg.model_type == "gemma3_text"
        self.layer_types = tuple(cfg.layer_types[: self.depth])

    def rotary_tables(self, x: torch.Tensor, positions: torch.Tensor) -> list[Any]:
        if not self.per_type_rotary:
            return super().rotary_tables(x, positions)
        tables = {t: self.rotary_emb(x, positions, t) for t in dict.fromkeys(self.layer_types)}
        return [tables[t] for t in self.layer_types]

    def block(self, i: int, layer: Layer, x: torch.Tensor, context: Context) -> dict[str, Any]:
        heads, pattern = self.attend(layer.self_attn, layer.input_layernorm(x), context)
        proj = layer.post_attention_layernorm(layer.self_attn.o_proj(heads))
        mid = x + proj
        hidden, down = gated_mlp(layer.mlp, layer.pre_feedforward_layernorm(mid))
        ffwd = layer.post_feedforward_layernorm(down)
        return dict(block_input=x, heads_output=heads, proj_output=proj, resid_mid=mid, mlp_hidden=hidden,
                    ffwd_output=ffwd, block_output=mid + ffwd, attention=pattern)  # fmt: skip


class Gemma(HFAdapter):
    family = "gemma"
    capture_class = GemmaCapture

    @staticmethod
    def dims_of(model: Decoder) -> ModelDims:
        return decoder_dims(model, d_mlp=layer_of(model, 0).mlp.down_proj.in_features)
