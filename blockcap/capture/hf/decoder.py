"""The rotary decoders' shared capture loop, attention and MLP pieces.

Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, OLMo 2 and the mixture-of-experts families all embed
tokens, rotate q and k with rotary tables, mask each layer causally (some layers with a sliding
window) and run ``model.layers``. ``DecoderCapture`` runs that loop and the attention with the
model's own submodules and its modeling module's ``apply_rotary_pos_emb`` and
``eager_attention_forward``; a family subclass says in ``block`` how its block adds attention and
MLP to the residual stream. Bitwise equality with the model needs its order of operations, so the
q/k/v variants below copy each family's attention step for step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn

from blockcap.capture.base import CaptureModule
from blockcap.capture.hf.attention import additive_mask, causal_allowed, fused_attention, sliding_windows
from blockcap.capture.hf.parts import MLP, Attention, Decoder, Layer, layer_of
from blockcap.core.dims import ModelDims

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# What each layer's attention needs: the rotary (cos, sin), the window, the allowed (T, T) pairs,
# the additive mask (None when fused) and whether to return the pattern.
Context = tuple[tuple[torch.Tensor, torch.Tensor], int | None, torch.Tensor, torch.Tensor | None, bool]


def qkv_plain(attn: Attention, h: torch.Tensor) -> Tensors:
    """q, k, v as (B, heads, T, head_dim) from separate projections (Llama, Mistral, Qwen2, Mixtral)."""
    shape = (*h.shape[:-1], -1, attn.head_dim)
    return tuple(p(h).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def qkv_head_norm(attn: Attention, h: torch.Tensor) -> Tensors:
    """Qwen3: q and k RMS-normed per head, before the heads axis moves forward."""
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
    return q, k, attn.v_proj(h).view(shape).transpose(1, 2)


def qkv_head_norm_after(attn: Attention, h: torch.Tensor) -> Tensors:
    """Gemma 3: q and k RMS-normed per head, after the heads axis moves forward."""
    q, k, v = qkv_plain(attn, h)
    return attn.q_norm(q), attn.k_norm(k), v


def qkv_full_norm(attn: Attention, h: torch.Tensor) -> Tensors:
    """OLMo 2, OLMoE: q and k RMS-normed across all heads, before the split into heads."""
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q, k = attn.q_norm(attn.q_proj(h)), attn.k_norm(attn.k_proj(h))
    return tuple(t.view(shape).transpose(1, 2) for t in (q, k, attn.v_proj(h)))


def qkv_fused(attn: Attention, h: torch.Tensor) -> Tensors:
    """Phi-3: one ``qkv_proj``, sliced into q, k and v."""
    shape = (*h.shape[:-1], -1, attn.head_dim)
    qkv = attn.qkv_proj(h)
    q_end = attn.config.num_attention_heads * attn.head_dim
    k_end = q_end + attn.num_key_value_heads * attn.head_dim
    parts = (qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:])
    return tuple(t.view(shape).transpose(1, 2) for t in parts)


# model_type -> its q/k/v step (qkv_plain where missing)
QKV: dict[str, Callable[[Attention, torch.Tensor], Tensors]] = {
    "qwen3": qkv_head_norm,
    "qwen3_moe": qkv_head_norm,
    "gemma3_text": qkv_head_norm_after,
    "olmo2": qkv_full_norm,
    "olmoe": qkv_full_norm,
    "phi3": qkv_fused,
}


def gated_mlp(mlp: MLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, output) of a gated MLP: ``act(gate_proj(x)) * up_proj(x)``, then ``down_proj``."""
    hidden = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return hidden, mlp.down_proj(hidden)


def fused_gated_mlp(mlp: MLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3's gated MLP: one ``gate_up_proj``, ``up * act(gate)``, then ``down_proj``."""
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    hidden = up * mlp.activation_fn(gate)
    return hidden, mlp.down_proj(hidden)


class DecoderCapture(CaptureModule):
    """Embeddings and layers ``0..max(blocks)`` of a rotary decoder; subclasses define ``block``.

    ``softcap`` (Gemma 2's attention-logit softcapping) has no SDPA kernel, so softcapped
    attention stays exact under ``fused``.
    """

    def __init__(
        self, model: Decoder, blocks: Sequence[int], sites: Sequence[str], fused: bool = False,
        softcap: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(blocks, sites)
        cfg = model.config
        modeling = sys.modules[type(model).__module__]
        self.apply_rotary_pos_emb = modeling.apply_rotary_pos_emb
        self.eager_attention_forward = modeling.eager_attention_forward
        self.qkv = QKV.get(cfg.model_type, qkv_plain)
        self.clip_qkv = cfg.clip_qkv if cfg.model_type == "olmoe" else None
        self.eager_kwargs = {} if softcap is None else {"softcap": softcap}
        self.embed_tokens, self.rotary_emb = model.embed_tokens, model.rotary_emb
        self.layers = nn.ModuleList(model.layers[: self.depth])
        self.windows = tuple(sliding_windows(model)[: self.depth])
        self.distinct_windows = tuple(dict.fromkeys(self.windows))
        self.fused = fused and softcap is None
        self.eval()

    def rotary_tables(self, x: torch.Tensor, positions: torch.Tensor) -> list[Any]:
        """(cos, sin) for each layer; one table for all of them unless a family overrides this."""
        return [self.rotary_emb(x, positions)] * self.depth

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = ids.shape[1]
        x = self.embed_tokens(ids)
        allowed = {w: causal_allowed(T, w, ids.device) for w in self.distinct_windows}
        masks = {} if self.fused else {w: additive_mask(a, x.dtype) for w, a in allowed.items()}
        tables = self.rotary_tables(x, torch.arange(T, device=ids.device).unsqueeze(0))
        captured: list[torch.Tensor] = []
        for i, layer in enumerate(cast("Iterable[Layer]", self.layers)):
            w = self.windows[i]
            context = (tables[i], w, allowed[w], masks.get(w), self.want_pattern and self.capture_at[i])
            values = self.block(i, layer, x, context)
            captured += self.pick(i, **values)
            x = values["block_output"]
        return tuple(captured)

    def block(self, i: int, layer: Layer, x: torch.Tensor, context: Context) -> dict[str, Any]:
        """Every site of layer ``i`` (None where the block has no such tensor) for block input ``x``."""
        raise NotImplementedError

    def attend(self, attn: Attention, h: torch.Tensor, context: Context) -> tuple[torch.Tensor, Any]:
        """(heads_output (B, T, heads * head_dim), pattern or None) of attention reading ``h``."""
        (cos, sin), window, allowed, mask, want_pattern = context
        q, k, v = self.qkv(attn, h)
        if self.clip_qkv is not None:  # elementwise, so clamping after the split is clamping before it
            q, k, v = (t.clamp(min=-self.clip_qkv, max=self.clip_qkv) for t in (q, k, v))
        q, k = self.apply_rotary_pos_emb(q, k, cos, sin)
        if self.fused:
            out, pattern = fused_attention(q, k, v, attn.scaling, allowed, window, want_pattern)
        else:
            out, pattern = self.eager_attention_forward(
                attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **self.eager_kwargs
            )
        return out.reshape(*h.shape[:-1], -1).contiguous(), pattern  # also with grouped-query attention


def decoder_dims(model: Decoder, d_mlp: int, n_experts: int = 0) -> ModelDims:
    """The sizes of a rotary decoder, read from its modules where configs leave fields out."""
    cfg = model.config
    return ModelDims(
        n_layer=len(model.layers), d_model=cfg.hidden_size, n_head=cfg.num_attention_heads,
        head_dim=layer_of(model, 0).self_attn.head_dim, d_mlp=d_mlp,
        vocab_size=model.embed_tokens.num_embeddings, context=cfg.max_position_embeddings,
        n_experts=n_experts,
    )  # fmt: skip
