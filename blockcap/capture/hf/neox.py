"""GPT-NeoX / Pythia (``model_type`` gpt_neox): its capture module and adapter.

Exact mode re-executes ``GPTNeoXModel`` with the model's own submodules, ``rotary_emb`` and
``modeling_gpt_neox``'s ``apply_rotary_pos_emb`` / ``eager_attention_forward``, in the library's
order, including the parallel residual's ``(mlp + attn) + x``; on CPU in float32 that is bitwise
what hooks on the model see. ``fused`` computes attention with SDPA: within ``FUSED_TOLERANCE``.

With ``use_parallel_residual`` (Pythia's default) the MLP reads the block input, so there is no
residual stream between attention and MLP: such a model has no ``resid_mid``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn
from transformers.models.gpt_neox import modeling_gpt_neox

from blockcap.capture.base import CaptureModule
from blockcap.capture.hf.adapter import HFAdapter
from blockcap.capture.hf.attention import additive_mask, causal_allowed, fused_attention
from blockcap.core.dims import ModelDims

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_hf_capture.py).
FUSED_TOLERANCE = 1e-5


class NeoXCapture(CaptureModule):
    """Embeddings and layers ``0..max(blocks)`` of a ``GPTNeoXModel``, returning the requested sites."""

    def __init__(
        self, model: modeling_gpt_neox.GPTNeoXModel, blocks: Sequence[int], sites: Sequence[str],
        fused: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(blocks, sites)
        self.embed_in, self.emb_dropout, self.rotary_emb = model.embed_in, model.emb_dropout, model.rotary_emb
        self.layers = nn.ModuleList(model.layers[: self.depth])
        self.fused = fused
        self.eval()

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = ids.shape[1]
        embeds = self.embed_in(ids)
        allowed = causal_allowed(T, None, ids.device)
        mask = None if self.fused else additive_mask(allowed, embeds.dtype)  # the eager functions' mask
        x = self.emb_dropout(embeds)
        cos, sin = self.rotary_emb(x, position_ids=torch.arange(T, device=ids.device).unsqueeze(0))
        captured: list[torch.Tensor] = []
        for i, layer in enumerate(cast("Iterable[modeling_gpt_neox.GPTNeoXLayer]", self.layers)):
            attn, mlp = layer.attention, layer.mlp
            h = layer.input_layernorm(x)
            shape = h.shape[:-1]
            qkv = attn.query_key_value(h).view(*shape, -1, 3 * attn.head_size).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1)
            q, k = modeling_gpt_neox.apply_rotary_pos_emb(q, k, cos, sin)
            if self.fused:
                out, pattern = fused_attention(
                    q, k, v, attn.scaling, allowed, None, self.want_pattern and self.capture_at[i]
                )
            else:  # not fused, so there is a mask
                out, pattern = modeling_gpt_neox.eager_attention_forward(
                    attn, q, k, v, cast(torch.Tensor, mask), scaling=attn.scaling, dropout=0.0
                )
            heads = out.reshape(*shape, -1).contiguous()  # (B, T, n_head * head_dim)
            proj = attn.dense(heads)
            attn_out = layer.post_attention_dropout(proj)  # dropouts are the identity in eval mode
            if layer.use_parallel_residual:
                mid = None
                hidden = mlp.act(mlp.dense_h_to_4h(layer.post_attention_layernorm(x)))
                ffwd = mlp.dense_4h_to_h(hidden)
                out = layer.post_mlp_dropout(ffwd) + attn_out + x
            else:
                mid = attn_out + x
                hidden = mlp.act(mlp.dense_h_to_4h(layer.post_attention_layernorm(mid)))
                ffwd = mlp.dense_4h_to_h(hidden)
                out = layer.post_mlp_dropout(ffwd) + mid
            captured += self.pick(i, block_input=x, heads_output=heads, proj_output=proj, resid_mid=mid,
                                  mlp_hidden=hidden, ffwd_output=ffwd, block_output=out,
                                  attention=pattern)  # fmt: skip
            x = out
        return tuple(captured)


class NeoX(HFAdapter):
    family = "neox"
    capture_class = NeoXCapture

    @staticmethod
    def dims_of(model: modeling_gpt_neox.GPTNeoXModel) -> ModelDims:
        layer, cfg = cast(modeling_gpt_neox.GPTNeoXLayer, model.layers[0]), model.config
        return ModelDims(
            n_layer=len(model.layers), d_model=cfg.hidden_size, n_head=cfg.num_attention_heads,
            head_dim=layer.attention.head_size, d_mlp=layer.mlp.dense_h_to_4h.out_features,
            vocab_size=model.embed_in.num_embeddings, context=cfg.max_position_embeddings,
        )  # fmt: skip

    def absent_sites(self, blocks: Sequence[int]) -> dict[str, str]:
        absent = super().absent_sites(blocks)
        if self.model.config.use_parallel_residual:
            absent["resid_mid"] = (
                "this GPT-NeoX model uses a parallel residual (attention and MLP both read the block "
                "input), so there is no residual stream between them"
            )
        return absent
