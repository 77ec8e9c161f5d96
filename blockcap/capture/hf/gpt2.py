"""GPT-2 (``model_type`` gpt2): its capture module and adapter.

Exact mode re-executes ``GPT2Model`` with the model's own submodules and
``modeling_gpt2.eager_attention_forward`` (or the attention's ``_upcast_and_reordered_attn`` where
the config asks for it), in the library's order; on CPU in float32 that is bitwise what hooks on
the model see. ``fused`` computes attention with SDPA instead: faster, within ``FUSED_TOLERANCE``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn
from transformers.models.gpt2 import modeling_gpt2

from blockcap.capture.base import CaptureModule
from blockcap.capture.hf.adapter import HFAdapter
from blockcap.capture.hf.attention import additive_mask, causal_allowed, fused_attention
from blockcap.core.dims import ModelDims

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_hf_capture.py).
FUSED_TOLERANCE = 1e-5


class GPT2Capture(CaptureModule):
    """Embeddings and blocks ``0..max(blocks)`` of a ``GPT2Model``, returning the requested sites."""

    def __init__(
        self, model: modeling_gpt2.GPT2Model, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ) -> None:
        super().__init__(blocks, sites)
        self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        self.h = nn.ModuleList(model.h[: self.depth])
        self.fused = fused
        self.eval()

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = ids.shape[1]
        embeds = self.wte(ids)
        x = self.drop(embeds + self.wpe(torch.arange(T, device=ids.device).unsqueeze(0)))
        allowed = causal_allowed(T, None, ids.device)
        mask = None if self.fused else additive_mask(allowed, embeds.dtype)  # the eager functions' mask
        captured: list[torch.Tensor] = []
        for i, block in enumerate(cast("Iterable[modeling_gpt2.GPT2Block]", self.h)):
            attn, mlp = block.attn, block.mlp
            h = block.ln_1(x)
            q, k, v = attn.c_attn(h).split(attn.split_size, dim=2)
            shape = (*h.shape[:-1], -1, attn.head_dim)
            q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, n_head, T, head_dim)
            if self.fused:
                out, pattern = fused_attention(
                    q, k, v, attn.scaling, allowed, None, self.want_pattern and self.capture_at[i]
                )
            elif attn.reorder_and_upcast_attn:
                out, pattern = attn._upcast_and_reordered_attn(q, k, v, mask)
            else:
                out, pattern = modeling_gpt2.eager_attention_forward(
                    attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling
                )
            heads = out.reshape(*out.shape[:-2], -1).contiguous()  # (B, T, n_head * head_dim)
            proj = attn.c_proj(heads)
            mid = attn.resid_dropout(proj) + x  # dropouts are the identity in eval mode
            hidden = mlp.act(mlp.c_fc(block.ln_2(mid)))
            ffwd = mlp.dropout(mlp.c_proj(hidden))
            out = mid + ffwd
            captured += self.pick(i, block_input=x, heads_output=heads, proj_output=proj, resid_mid=mid,
                                  mlp_hidden=hidden, ffwd_output=ffwd, block_output=out,
                                  attention=pattern)  # fmt: skip
            x = out
        return tuple(captured)


class GPT2(HFAdapter):
    family = "gpt2"
    capture_class = GPT2Capture

    @staticmethod
    def dims_of(model: modeling_gpt2.GPT2Model) -> ModelDims:
        block, cfg = cast(modeling_gpt2.GPT2Block, model.h[0]), model.config
        attn = block.attn
        return ModelDims(
            n_layer=len(model.h), d_model=attn.embed_dim, n_head=attn.num_heads, head_dim=attn.head_dim,
            d_mlp=block.mlp.c_fc.nf, vocab_size=model.wte.num_embeddings, context=cfg.n_positions,
        )  # fmt: skip
