"""The Llama family (``model_type`` llama, mistral, qwen2): its capture module and adapter.

The three share one decoder layer (RMSNorm, rotary q/k, grouped-query attention, gated MLP); they
differ in biases (inside the modules) and in sliding-window attention: Mistral masks every layer
with ``sliding_window`` when it is set, Qwen2 only the layers ``layer_types`` marks as sliding.
Exact mode re-executes the model with its own submodules and its modeling module's
``apply_rotary_pos_emb`` / ``eager_attention_forward``, in the library's order; on CPU in float32
that is bitwise what hooks on the model see. ``fused`` uses SDPA: within ``FUSED_TOLERANCE``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from blockcap.capture.base import CaptureModule
from blockcap.capture.hf.load import HFAdapter, additive_mask, causal_allowed, fused_attention
from blockcap.core.dims import ModelDims

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_hf_capture.py).
FUSED_TOLERANCE = 1e-5


def sliding_windows(model: nn.Module) -> list[int | None]:
    """Each layer's attention window (None: full causal), as the model's own forward chooses it."""
    cfg, n = model.config, len(model.layers)
    if cfg.model_type == "mistral":
        return [cfg.sliding_window] * n
    if cfg.model_type == "qwen2":
        return [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types[:n]]
    return [None] * n


class LlamaCapture(CaptureModule):
    """Embeddings and layers ``0..max(blocks)`` of a Llama/Mistral/Qwen2 model, returning the sites."""

    def __init__(
        self, model: nn.Module, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ) -> None:
        super().__init__(blocks, sites)
        modeling = sys.modules[type(model).__module__]  # modeling_llama, modeling_mistral or modeling_qwen2
        self.apply_rotary_pos_emb = modeling.apply_rotary_pos_emb
        self.eager_attention_forward = modeling.eager_attention_forward
        self.embed_tokens, self.rotary_emb = model.embed_tokens, model.rotary_emb
        self.layers = nn.ModuleList(model.layers[: self.depth])
        self.windows = tuple(sliding_windows(model)[: self.depth])
        self.distinct_windows = tuple(dict.fromkeys(self.windows))
        self.fused = fused
        self.eval()

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = ids.shape[1]
        x = self.embed_tokens(ids)
        allowed = {w: causal_allowed(T, w, ids.device) for w in self.distinct_windows}
        masks = {} if self.fused else {w: additive_mask(a, x.dtype) for w, a in allowed.items()}
        cos, sin = self.rotary_emb(x, torch.arange(T, device=ids.device).unsqueeze(0))
        captured: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            attn, mlp, window = layer.self_attn, layer.mlp, self.windows[i]
            h = layer.input_layernorm(x)
            shape = h.shape[:-1]
            q = attn.q_proj(h).view(*shape, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(*shape, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(*shape, -1, attn.head_dim).transpose(1, 2)
            q, k = self.apply_rotary_pos_emb(q, k, cos, sin)
            if self.fused:
                out, pattern = fused_attention(
                    q, k, v, attn.scaling, allowed[window], window, self.want_pattern and self.capture_at[i]
                )
            else:
                out, pattern = self.eager_attention_forward(
                    attn, q, k, v, masks[window], dropout=0.0, scaling=attn.scaling
                )
            heads = out.reshape(*shape, -1).contiguous()  # (B, T, n_head * head_dim), also with GQA
            proj = attn.o_proj(heads)
            mid = x + proj
            g = layer.post_attention_layernorm(mid)
            hidden = mlp.act_fn(mlp.gate_proj(g)) * mlp.up_proj(g)
            ffwd = mlp.down_proj(hidden)
            out = mid + ffwd
            captured += self.pick(i, block_input=x, heads_output=heads, proj_output=proj, resid_mid=mid,
                                  mlp_hidden=hidden, ffwd_output=ffwd, block_output=out,
                                  attention=pattern)  # fmt: skip
            x = out
        return tuple(captured)


class Llama(HFAdapter):
    family = "llama"
    capture_class = LlamaCapture

    @staticmethod
    def dims_of(model: nn.Module) -> ModelDims:
        layer, cfg = model.layers[0], model.config
        return ModelDims(
            n_layer=len(model.layers), d_model=cfg.hidden_size, n_head=cfg.num_attention_heads,
            head_dim=layer.self_attn.head_dim, d_mlp=layer.mlp.down_proj.in_features,
            vocab_size=model.embed_tokens.num_embeddings, context=cfg.max_position_embeddings,
        )  # fmt: skip
