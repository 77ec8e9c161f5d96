"""Mixture-of-experts models (``model_type`` mixtral, qwen2_moe, olmoe, qwen3_moe).

Pre-norm blocks whose MLP is a sparse block: a router (``mlp.gate``) scores every expert, the
top-k experts run on each token and their outputs are summed with the router's weights (Qwen2-MoE
adds a shared expert scaled by a sigmoid gate). ``router_logits`` are the router's logits before
its softmax and top-k, ``ffwd_output`` the whole sparse block's output; a sparse block has no
``mlp_hidden`` (each expert has its own). Qwen2-MoE and Qwen3-MoE can keep some blocks dense
(``mlp_only_layers``, ``decoder_sparse_step``): those have ``mlp_hidden`` and no router.

The capture calls the model's own router and experts modules, so the experts run the
implementation transformers loaded them with (``config._experts_implementation``, recorded in the
store; ``grouped_mm`` by default, which ``torch.compile(fullgraph=True)`` accepts). Attention
varies as in the dense families: Mixtral's is Mistral's, Qwen2-MoE's Qwen2's, Qwen3-MoE's Qwen3's
(per-head q/k norms) and OLMoE's OLMo's (q/k norms across heads, ``clip_qkv``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch.nn import functional as F

from blockcap.capture.hf.adapter import HFAdapter
from blockcap.capture.hf.decoder import Context, DecoderCapture, decoder_dims, gated_mlp
from blockcap.capture.hf.parts import MLP, Decoder, Layer, layer_of
from blockcap.core.dims import ModelDims

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_hf_capture.py).
FUSED_TOLERANCE = 1e-5


def is_sparse(layer: Layer) -> bool:
    return hasattr(layer.mlp, "experts")


def sparse_block(mlp: MLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, router logits (B, T, n_experts)) of a sparse block, in its ``forward``'s order."""
    B, T, H = x.shape
    flat = x.view(-1, H)
    shared = mlp.shared_expert(flat) if hasattr(mlp, "shared_expert") else None  # Qwen2-MoE
    logits, weights, index = mlp.gate(flat)
    out = mlp.experts(flat, index, weights)
    if shared is not None:
        out = out + F.sigmoid(mlp.shared_expert_gate(flat)) * shared
    return out.reshape(B, T, H), logits.view(B, T, -1)


class MoECapture(DecoderCapture):
    """Embeddings and layers ``0..max(blocks)`` of a mixture-of-experts model."""

    def __init__(
        self, model: Decoder, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ) -> None:
        super().__init__(model, blocks, sites, fused)
        self.sparse = tuple(is_sparse(layer) for layer in cast("Iterable[Layer]", self.layers))

    def block(self, i: int, layer: Layer, x: torch.Tensor, context: Context) -> dict[str, Any]:
        heads, pattern = self.attend(layer.self_attn, layer.input_layernorm(x), context)
        proj = layer.self_attn.o_proj(heads)
        mid = x + proj
        g = layer.post_attention_layernorm(mid)
        if self.sparse[i]:
            hidden = None
            ffwd, router = sparse_block(layer.mlp, g)
        else:
            (hidden, ffwd), router = gated_mlp(layer.mlp, g), None
        return dict(block_input=x, heads_output=heads, proj_output=proj, resid_mid=mid, mlp_hidden=hidden,
                    ffwd_output=ffwd, block_output=mid + ffwd, attention=pattern,
                    router_logits=router)  # fmt: skip


class MoE(HFAdapter):
    family = "moe"
    capture_class = MoECapture

    @staticmethod
    def dims_of(model: Decoder) -> ModelDims:
        """``d_mlp`` is the dense blocks' MLP width, or an expert's where every block is sparse."""
        layers = [layer_of(model, i) for i in range(len(model.layers))]
        sparse = [layer.mlp for layer in layers if is_sparse(layer)]
        dense = [layer.mlp for layer in layers if not is_sparse(layer)]
        d_mlp = dense[0].down_proj.in_features if dense else sparse[0].experts.down_proj.shape[-1]
        n_experts = sparse[0].gate.weight.shape[0] if sparse else 0
        return decoder_dims(model, d_mlp=d_mlp, n_experts=n_experts)

    def absent_sites(self, blocks: Sequence[int]) -> dict[str, str]:
        absent = {}
        model = cast("Decoder", self.model)
        sparse = [b for b in blocks if is_sparse(layer_of(model, b))]
        dense = [b for b in blocks if not is_sparse(layer_of(model, b))]
        if sparse:
            absent["mlp_hidden"] = (
                f"block {sparse[0]} is a sparse mixture-of-experts block: each expert has its own hidden "
                f"layer, so there is no one MLP hidden layer (router_logits and ffwd_output are there)"
            )
        if dense:
            absent["router_logits"] = f"block {dense[0]} of this model is a dense MLP block, with no router"
        return absent
