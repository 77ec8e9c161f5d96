"""The character-level GPT of the original experiment: loading, dimensions and its capture module.

Two ways to compute attention:

* exact (default): the reference's own per-head ``key``/``query``/``value`` Linears, explicit
  causal mask and softmax, concatenation, called in the reference's order. On CPU in float32
  this is bitwise what forward hooks on the original model see.
* fused: one (3C, C) matmul for all heads' q/k/v and ``scaled_dot_product_attention``. Faster
  on GPU; agrees with exact within ``FUSED_TOLERANCE``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from blockcap.capture.adapter import Adapter
from blockcap.capture.base import CaptureModule
from blockcap.capture.chargpt.checkpoint import BUNDLED, load_checkpoint
from blockcap.capture.chargpt.model import GPT, Block, Head
from blockcap.core.dims import ModelDims
from blockcap.core.errors import BlockcapError
from blockcap.data.tokenizers import CharTokenizer

# Max abs difference between fused and exact captures, relative to the largest magnitude of the
# site (float32, CPU, tested in tests/test_capture.py).
FUSED_TOLERANCE = 1e-5


class FusedAttention(nn.Module):
    """A block's attention heads as one q/k/v matmul plus SDPA; same weights as the heads."""

    qkv_weight: torch.Tensor  # buffer, (3C, C)

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
    for head in cast("Iterable[Head]", block.sa.heads):
        wei = head.pattern(x)  # (B, T, T)
        outs.append(wei @ head.value(x))  # dropout is the identity in eval mode
        patterns.append(wei)
    return torch.cat(outs, dim=-1), (torch.stack(patterns, dim=1) if want_pattern else None)


class CharGPTCapture(CaptureModule):
    """Embeddings and blocks ``0..max(blocks)`` of a char ``GPT``, returning the requested sites."""

    def __init__(self, model: GPT, blocks: Sequence[int], sites: Sequence[str], fused: bool = False) -> None:
        super().__init__(blocks, sites)
        model = model.eval()
        self.token_embedding_table = model.token_embedding_table
        self.position_embedding_table = model.position_embedding_table
        self.blocks = nn.ModuleList(model.blocks[: self.depth])
        self.fused_attention = (
            nn.ModuleList([FusedAttention(b) for b in cast("Iterable[Block]", self.blocks)])
            if fused
            else None
        )
        self.eval()

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = idx.shape[1]
        x = self.token_embedding_table(idx) + self.position_embedding_table(
            torch.arange(T, device=idx.device)
        )
        captured: list[torch.Tensor] = []
        for i, block in enumerate(cast("Iterable[Block]", self.blocks)):
            want = self.want_pattern and self.capture_at[i]
            h = block.ln1(x)
            if self.fused_attention is not None:
                heads, pattern = self.fused_attention[i](h, want)
            else:
                heads, pattern = _exact_attention(block, h, want)
            proj = block.sa.proj(heads)  # (B, T, C); dropout is the identity in eval mode
            mid = x + proj
            up, act, down, _ = block.ffwd.net  # Linear, ReLU, Linear, Dropout (identity in eval)
            hidden = act(up(block.ln2(mid)))  # (B, T, 4C)
            ffwd = down(hidden)
            out = mid + ffwd
            captured += self.pick(i, block_input=x, heads_output=heads, proj_output=proj, resid_mid=mid,
                                  mlp_hidden=hidden, ffwd_output=ffwd, block_output=out,
                                  attention=pattern)  # fmt: skip
            x = out
        return tuple(captured)


class CharGPT(Adapter):
    family = "chargpt"
    capture_class = CharGPTCapture


def load(weights: str | None, dataset_text: Callable[[], str]) -> CharGPT:
    """The char GPT from ``weights`` (None: the bundled model).

    A raw state dict of the original code carries no vocabulary: as in the original, it is the
    sorted set of the dataset's characters, read through ``dataset_text``.
    """
    loaded = load_checkpoint(weights)
    cfg = loaded.model.config
    if loaded.vocab is not None:
        tok = CharTokenizer(loaded.vocab)
    else:
        tok = CharTokenizer.from_text(dataset_text())
        if len(tok) != cfg.vocab_size:
            raise BlockcapError(
                f"the dataset has {len(tok)} distinct characters but weights {loaded.path} "
                f"expect {cfg.vocab_size}; use the dataset the weights were trained on"
            )
    dims = ModelDims(
        n_layer=cfg.n_layer, d_model=cfg.n_embed, n_head=cfg.n_head, head_dim=cfg.head_dim,
        d_mlp=4 * cfg.n_embed, vocab_size=cfg.vocab_size, context=cfg.block_size,
    )  # fmt: skip
    provenance = {
        "family": CharGPT.family,
        "weights_path": BUNDLED if weights in (None, BUNDLED) else str(loaded.path),
        "config": cfg.to_dict(),
        "weights_meta": loaded.meta,
    }
    return CharGPT(loaded.model, dims, tok, loaded.sha256, provenance)
