"""The capture module: runs a model up to the deepest requested block and returns its internals.

No hooks: the block's computation is written out once here, returning every requested
intermediate as a flat tuple, so ``torch.compile(fullgraph=True)`` and ``torch.export`` accept it.

Two ways to compute attention:

* exact (default): the reference's own per-head ``key``/``query``/``value`` Linears, explicit
  causal mask and softmax, concatenation, called in the reference's order. On CPU in float32
  this is bitwise what forward hooks on the original model see.
* fused: one (3C, C) matmul for all heads' q/k/v and ``scaled_dot_product_attention``. Faster
  on GPU; agrees with exact within ``FUSED_TOLERANCE``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from blockcap.model import GPT, Block
from blockcap.store import SITES

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_capture.py).
FUSED_TOLERANCE = 1e-5


class FusedAttention(nn.Module):
    """A block's attention heads as one q/k/v matmul plus SDPA; same weights as the heads."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        heads = block.sa.heads
        w = [torch.cat([getattr(h, name).weight for h in heads], dim=0) for name in ("query", "key", "value")]
        self.register_buffer("qkv_weight", torch.cat(w, dim=0).detach().clone())  # (3C, C)
        self.n_head = len(heads)

    def forward(self, x: torch.Tensor, want_pattern: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        q, k, v = F.linear(x, self.qkv_weight).split(C, dim=-1)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        pattern = None
        if want_pattern:
            scores = (q @ k.transpose(-2, -1)) * (C // self.n_head) ** -0.5
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            pattern = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, nh, T, T)
        return out.transpose(1, 2).reshape(B, T, C), pattern


def _exact_attention(
    block: Block, x: torch.Tensor, want_pattern: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference heads, call for call: key, query, mask, softmax, value, concatenation."""
    outs, patterns = [], []
    for head in block.sa.heads:
        wei = head.pattern(x)  # (B, T, T)
        outs.append(wei @ head.value(x))  # dropout is the identity in eval mode
        patterns.append(wei)
    return torch.cat(outs, dim=-1), (torch.stack(patterns, dim=1) if want_pattern else None)


class CaptureModule(nn.Module):
    """Embeddings and blocks ``0..max(blocks)`` of ``model``, returning the requested sites.

    ``forward(idx)`` takes token ids (B, T) and returns one tensor per ``(block, site)`` in
    ``self.outputs`` order: vector sites (B, T, n_embed), ``attention`` (B, n_head, T, T).
    """

    def __init__(self, model: GPT, blocks: Sequence[int], sites: Sequence[str], fused: bool = False) -> None:
        super().__init__()
        if not blocks or not sites:
            raise ValueError("need at least one block and one site")
        unknown = [s for s in sites if s not in SITES]
        if unknown:
            raise ValueError(f"unknown sites {unknown}")
        model = model.eval()
        depth = max(blocks) + 1
        self.token_embedding_table = model.token_embedding_table
        self.position_embedding_table = model.position_embedding_table
        self.blocks = nn.ModuleList(model.blocks[:depth])
        self.fused_attention = nn.ModuleList([FusedAttention(b) for b in self.blocks]) if fused else None
        self.capture_at = tuple(i in set(blocks) for i in range(depth))
        self.sites = tuple(sites)
        self.want_pattern = "attention" in self.sites
        self.outputs = [(b, s) for b in sorted(set(blocks)) for s in self.sites]
        self.eval()

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = idx.shape[1]
        x = self.token_embedding_table(idx) + self.position_embedding_table(
            torch.arange(T, device=idx.device)
        )
        captured: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            h = block.ln1(x)
            if self.fused_attention is not None:
                heads, pattern = self.fused_attention[i](h, self.want_pattern and self.capture_at[i])
            else:
                heads, pattern = _exact_attention(block, h, self.want_pattern and self.capture_at[i])
            proj = block.sa.proj(heads)  # (B, T, C); dropout is the identity in eval mode
            mid = x + proj
            ffwd = block.ffwd(block.ln2(mid))
            out = mid + ffwd
            if self.capture_at[i]:
                values = {
                    "block_input": x,
                    "heads_output": heads,
                    "proj_output": proj,
                    "resid_mid": mid,
                    "ffwd_output": ffwd,
                    "block_output": out,
                    "attention": pattern,
                }
                captured.extend(values[s] for s in self.sites)
            x = out
        return tuple(captured)
