"""The split and the windows: which stream positions each window holds.

As the original experiment: ``val`` is the last 10 % of the (joined) token stream, ``train`` the
rest, and windows are ``unfold(0, sample_len, stride)`` of the split's stream (``joined``). With
``documents``, windows never cross a document boundary: each document of the split gets its own
``unfold``. With a BOS id, every window is that token followed by ``sample_len - 1`` stream
tokens (as TransformerLens and SAELens prepend it). A window is read from the stream when asked
for, so memory follows the windows read, not the corpus.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from blockcap.core.spec import DOCUMENTS, JOINED
from blockcap.data.stream import ArrayStream, Stream

TRAIN_FRACTION = 0.9


def split_range(n_tokens: int, split: str, train_fraction: float = TRAIN_FRACTION) -> tuple[int, int]:
    """Stream positions of a split: first ``int(0.9 * n)`` train, the rest val; ``all`` everything."""
    n = int(train_fraction * n_tokens)
    return {"train": (0, n), "val": (n, n_tokens), "all": (0, n_tokens)}[split]


def split_tokens(data: np.ndarray, split: str, train_fraction: float = TRAIN_FRACTION) -> np.ndarray:
    """The split of an in-memory stream (see ``split_range``)."""
    lo, hi = split_range(len(data), split, train_fraction)
    return data[lo:hi]


def window_count(n_tokens: int, sample_len: int, stride: int) -> int:
    """How many windows ``unfold(0, sample_len, stride)`` makes of ``n_tokens`` tokens."""
    return 0 if n_tokens < sample_len else (n_tokens - sample_len) // stride + 1


class Windows:
    """Fixed-length windows of a stream's positions ``span`` (a split), as the original batcher made
    them; ``stream`` may be an array of ids (one document)."""

    def __init__(
        self, stream: Stream | np.ndarray, sample_len: int, stride: int, span: tuple[int, int] | None = None,
        mode: str = JOINED, bos_id: int | None = None,
    ) -> None:  # fmt: skip
        self.stream = ArrayStream(stream) if isinstance(stream, np.ndarray) else stream
        self.sample_len, self.stride, self.mode, self.bos_id = sample_len, stride, mode, bos_id
        self.span = span or (0, len(self.stream))
        self.body = sample_len - (bos_id is not None)  # stream tokens per window
        if mode == DOCUMENTS:
            self._starts = self._document_starts()
            self.n = len(self._starts)
        else:
            self.n = window_count(self.span[1] - self.span[0], self.body, stride) if self.body else 0

    def __len__(self) -> int:
        return self.n

    def _document_starts(self) -> _Spilled:
        """First stream position of every window that stays inside one document of the span,
        computed a chunk of documents at a time and kept in a temporary file (one int64 a window)."""
        a, b = self.span
        spilled = _Spilled()
        for j, length in self.stream.documents():
            lo, hi = np.maximum(j, a), np.minimum(j + length, b)
            count = np.where(hi - lo >= self.body, (hi - lo - self.body) // self.stride + 1, 0)
            if count.any():
                doc = np.repeat(np.arange(len(count)), count)
                first = np.cumsum(count) - count
                spilled.append(lo[doc] + (np.arange(len(doc)) - first[doc]) * self.stride)
        return spilled

    def starts(self, start: int, stop: int) -> np.ndarray:
        """Stream position of the first stream token of windows ``start:stop``."""
        if self.mode == DOCUMENTS:
            return self._starts.read(start, stop)
        return self.span[0] + np.arange(start, stop, dtype=np.int64) * self.stride

    def get(self, start: int, stop: int) -> torch.Tensor:
        """Windows ``start:stop`` as (stop - start, sample_len) int64.

        Windows that overlap or touch are read as one range of the stream; sparse ones (a stride
        well past their length) one by one, so a read never holds the gaps between them.
        """
        firsts = self.starts(start, stop)
        lo, hi = int(firsts[0]), int(firsts[-1]) + self.body
        if hi - lo <= 2 * len(firsts) * self.body:
            ids = self.stream.read(lo, hi)
            body = ids[(firsts - lo)[:, None] + np.arange(self.body)]
        else:
            body = np.stack([self.stream.read(s, s + self.body) for s in firsts.tolist()])
        if self.bos_id is not None:
            body = np.concatenate([np.full((len(body), 1), self.bos_id, np.int64), body], axis=1)
        return torch.from_numpy(np.ascontiguousarray(body, dtype=np.int64))

    def offsets(self, start: int, stop: int) -> np.ndarray:
        """Start of each window in the split's token stream."""
        return self.starts(start, stop) - self.span[0]

    def sources(self, start: int, stop: int) -> np.ndarray:
        """(document, input file, row, position in document) of each window's first stream token."""
        return self.stream.locate(self.starts(start, stop))


class _Spilled:
    """An int64 array appended to a temporary file and read back by ranges (from any thread)."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="blockcap-windows-")  # noqa: SIM115 - lives with the windows
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def append(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values, dtype="<i8").tobytes())
        self.n += len(values)

    def read(self, lo: int, hi: int) -> np.ndarray:
        self.file.flush()
        lo, hi = max(0, lo), min(hi, self.n)
        raw = os.pread(self.file.fileno(), 8 * max(0, hi - lo), 8 * lo)
        return np.frombuffer(raw, "<i8").astype(np.int64)
