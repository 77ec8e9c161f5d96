"""The parts of transformers' rotary decoders that the capture modules read, as protocols.

``nn.Module`` types every submodule attribute as ``Tensor | Module``, and each family has its own
classes (``LlamaDecoderLayer``, ``Qwen3DecoderLayer``, ...), so these name the attributes the
captures use and their types. A family's modules have the subset its steps read: the q/k/v step
picks the projections and norms (``decoder.QKV``), the family's ``block`` the layer norms.
Types only: nothing here is checked at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


class Attention(Protocol):
    config: PreTrainedConfig
    head_dim: int
    scaling: float
    num_key_value_heads: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    qkv_proj: nn.Linear  # Phi-3
    q_norm: nn.Module  # Qwen3, Gemma 3, OLMo 2, OLMoE
    k_norm: nn.Module


class Router(Protocol):
    weight: torch.Tensor  # (n_experts, hidden)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class Experts(Protocol):
    down_proj: torch.Tensor  # (n_experts, hidden, intermediate)

    def __call__(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


class MLP(Protocol):
    gate_proj: nn.Linear  # gated
    up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: nn.Module
    gate_up_proj: nn.Linear  # Phi-3
    activation_fn: nn.Module
    gate: Router  # sparse
    experts: Experts
    shared_expert: nn.Module  # Qwen2-MoE
    shared_expert_gate: nn.Linear


class Layer(Protocol):
    self_attn: Attention
    mlp: MLP
    input_layernorm: nn.Module  # before attention (not OLMo 2)
    post_attention_layernorm: nn.Module  # before the MLP (Llama), after attention (Gemma, OLMo 2)
    pre_feedforward_layernorm: nn.Module  # Gemma
    post_feedforward_layernorm: nn.Module  # Gemma, OLMo 2


class Decoder(Protocol):
    """The base model (``LlamaModel``, ``MixtralModel``, ...)."""

    config: PreTrainedConfig
    embed_tokens: nn.Embedding
    rotary_emb: nn.Module
    layers: nn.ModuleList


def layer_of(model: Decoder, i: int) -> Layer:
    """Layer ``i`` of ``model`` (``nn.ModuleList`` types its items as ``Module``)."""
    return cast("Layer", model.layers[i])
