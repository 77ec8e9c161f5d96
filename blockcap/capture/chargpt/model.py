"""The character-level GPT of the original experiment (Karpathy's "gpt.py"), computation for computation.

Module names mirror the original so its ``state_dict`` loads unchanged; see
``blockcap.checkpoint`` for loading and the key table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Model size. ``seed`` is the original experiment's model; ``small`` is the bundled default."""

    vocab_size: int = 65
    n_embed: int = 384
    n_head: int = 6
    n_layer: int = 6
    block_size: int = 256
    dropout: float = 0.2

    # Sizes beyond these are not char GPTs but corrupt or hostile files: refused before allocating.
    LIMITS = {
        "vocab_size": 1 << 20,
        "n_embed": 1 << 16,
        "n_head": 1 << 10,
        "n_layer": 1 << 10,
        "block_size": 1 << 14,
    }

    def __post_init__(self) -> None:
        for name, hi in self.LIMITS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise ValueError(f"{name}={v!r} is out of range 1..{hi}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout={self.dropout!r} is out of range 0..1")
        if self.n_embed % self.n_head:
            raise ValueError(f"n_embed={self.n_embed} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embed // self.n_head

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    "seed": GPTConfig(n_embed=384, n_head=6, n_layer=6, block_size=256, dropout=0.2),
    "small": GPTConfig(n_embed=96, n_head=6, n_layer=6, block_size=256, dropout=0.0),
}


def state_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every ``state_dict`` entry of ``GPT(config)``, without building it."""
    n, v, hs, T = config.n_embed, config.vocab_size, config.head_dim, config.block_size
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding_table.weight": (v, n),
        "position_embedding_table.weight": (T, n),
    }
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        for h in range(config.n_head):
            shapes.update({f"{b}sa.heads.{h}.{w}.weight": (hs, n) for w in ("key", "query", "value")})
            shapes[f"{b}sa.heads.{h}.tril"] = (T, T)
        shapes.update({f"{b}sa.proj.weight": (n, n), f"{b}sa.proj.bias": (n,)})
        shapes.update({f"{b}ffwd.net.0.weight": (4 * n, n), f"{b}ffwd.net.0.bias": (4 * n,)})
        shapes.update({f"{b}ffwd.net.2.weight": (n, 4 * n), f"{b}ffwd.net.2.bias": (n,)})
        for ln in ("ln1", "ln2"):
            shapes.update({f"{b}{ln}.weight": (n,), f"{b}{ln}.bias": (n,)})
    shapes.update({"ln_f.weight": (n,), "ln_f.bias": (n,), "lm_head.weight": (v, n), "lm_head.bias": (v,)})
    return shapes


def causal_mask(config: GPTConfig) -> torch.Tensor:
    """The original's ``tril`` buffer: 1 where a query may attend a key."""
    return torch.tril(torch.ones(config.block_size, config.block_size))


class Head(nn.Module):
    """One causal self-attention head."""

    tril: torch.Tensor  # buffer

    def __init__(self, config: GPTConfig, tril: torch.Tensor | None = None) -> None:
        super().__init__()
        hs = config.head_dim
        self.key = nn.Linear(config.n_embed, hs, bias=False)
        self.query = nn.Linear(config.n_embed, hs, bias=False)
        self.value = nn.Linear(config.n_embed, hs, bias=False)
        self.register_buffer("tril", causal_mask(config) if tril is None else tril)
        self.dropout = nn.Dropout(config.dropout)

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights, (B, T, T), before dropout."""
        T = x.shape[1]
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        return F.softmax(wei, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wei = self.dropout(self.pattern(x))
        return wei @ self.value(x)  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Heads in parallel, concatenated, then projected back to n_embed."""

    def __init__(self, config: GPTConfig, tril: torch.Tensor | None = None) -> None:
        super().__init__()
        self.heads = nn.ModuleList([Head(config, tril) for _ in range(config.n_head)])
        self.proj = nn.Linear(config.n_embed, config.n_embed)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B, T, n_embed)
        return self.dropout(self.proj(out))


class FeedForward(nn.Module):
    """Linear(n, 4n) - ReLU - Linear(4n, n)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        n = config.n_embed
        self.net = nn.Sequential(
            nn.Linear(n, 4 * n), nn.ReLU(), nn.Linear(4 * n, n), nn.Dropout(config.dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block: communication, then computation."""

    def __init__(self, config: GPTConfig, tril: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sa = MultiHeadAttention(config, tril)
        self.ffwd = FeedForward(config)
        self.ln1 = nn.LayerNorm(config.n_embed)
        self.ln2 = nn.LayerNorm(config.n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, final LayerNorm, LM head."""

    def __init__(self, config: GPTConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embed)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embed)
        tril = causal_mask(config)  # one tensor for every head: block_size² floats, not per head
        self.blocks = nn.Sequential(*[Block(config, tril) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embed)
        self.lm_head = nn.Linear(config.n_embed, config.vocab_size)
        if init:  # skipped when weights are loaded right after
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Residual stream entering block 0, (B, T, n_embed)."""
        T = idx.shape[1]
        tok_emb = self.token_embedding_table(idx)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))
        return tok_emb + pos_emb

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.blocks(self.embed(idx))
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        B, T, V = logits.shape
        return logits, F.cross_entropy(logits.view(B * T, V), targets.view(B * T))

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T) with the global RNG."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx
