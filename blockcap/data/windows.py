"""The split and the windows, as the original experiment made them.

``val`` is the last 10 % of the token stream, windows are ``unfold(0, sample_len, stride)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TRAIN_FRACTION = 0.9


def split_tokens(data: np.ndarray, split: str, train_fraction: float = TRAIN_FRACTION) -> np.ndarray:
    """The original split: first ``int(0.9 * len)`` tokens train, the rest val; ``all`` is everything."""
    n = int(train_fraction * len(data))
    return {"train": data[:n], "val": data[n:], "all": data}[split]


def window_count(n_tokens: int, sample_len: int, stride: int) -> int:
    """How many windows ``unfold(0, sample_len, stride)`` makes of ``n_tokens`` tokens."""
    return 0 if n_tokens < sample_len else (n_tokens - sample_len) // stride + 1


@dataclass(frozen=True)
class Windows:
    """Fixed-length windows of a token stream, as the original batcher made them."""

    tokens: np.ndarray  # the split's token stream
    sample_len: int
    stride: int

    def __len__(self) -> int:
        return window_count(len(self.tokens), self.sample_len, self.stride)

    def get(self, start: int, stop: int) -> torch.Tensor:
        """Windows ``start:stop`` as (stop - start, sample_len) int64."""
        lo = start * self.stride
        hi = (stop - 1) * self.stride + self.sample_len
        part = torch.from_numpy(np.ascontiguousarray(self.tokens[lo:hi], dtype=np.int64))
        return part.unfold(0, self.sample_len, self.stride)

    def offsets(self, start: int, stop: int) -> np.ndarray:
        """Start of each window in the split's token stream."""
        return np.arange(start, stop, dtype=np.int64) * self.stride
