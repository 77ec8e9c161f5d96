"""The token stream windows are cut from: a dataset's documents joined with a separator token.

``JoinedStream`` reads any range of the joined stream straight from a token cache, so a process
holds only the ranges it reads; ``ArrayStream`` is a stream already in memory (one document).
Document ``k`` starts at ``J[k] = start[k] + k * s`` in the joined stream, where ``start`` is its
start in the cache's concatenated ids and ``s`` is 1 with a separator, 0 without; the separator
follows every document but the last.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from blockcap.data.cache import DOC_CHUNK, TokenCache


class Stream(Protocol):
    def __len__(self) -> int: ...
    def read(self, lo: int, hi: int) -> np.ndarray: ...
    def locate(self, positions: np.ndarray) -> np.ndarray: ...
    def documents(self) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class ArrayStream:
    """Token ids in memory, as one document."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.asarray(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, lo: int, hi: int) -> np.ndarray:
        return np.ascontiguousarray(self.ids[lo:hi], dtype=np.int64)

    def locate(self, positions: np.ndarray) -> np.ndarray:
        """(document, input file, row, position in document) of each stream position."""
        out = np.zeros((len(positions), 4), np.int64)
        out[:, 3] = positions
        return out

    def documents(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield np.zeros(1, np.int64), np.asarray([len(self.ids)], np.int64)


class JoinedStream:
    """A token cache's documents joined by ``separator`` (an id, or None for no separator)."""

    def __init__(self, cache: TokenCache, separator: int | None) -> None:
        self.cache = cache
        self.separator = separator
        self.s = 0 if separator is None else 1
        self.n_docs = cache.n_documents
        firsts = cache.doc_chunk_firsts()
        self.chunk_first_j = firsts + np.arange(len(firsts), dtype=np.int64) * DOC_CHUNK * self.s
        self._j: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.cache.n_tokens + (self.n_docs - 1) * self.s

    def _records(self, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """J, length and cache record (start, file, row) of documents ``k0:k1``."""
        recs = self.cache.docs(k0, min(k1 + 1, self.n_docs))
        ends = np.append(recs[1:, 0], self.cache.n_tokens) if k1 >= self.n_docs else recs[1:, 0]
        recs = recs[: k1 - k0]
        j = recs[:, 0] + np.arange(k0, k1, dtype=np.int64) * self.s
        return j, ends[: k1 - k0] - recs[:, 0], recs

    def _chunk_j(self, c: int) -> np.ndarray:
        """J of every document of docs chunk ``c`` (the last two chunks used are kept)."""
        if c not in self._j:
            k0 = c * DOC_CHUNK
            last = dict(list(self._j.items())[-1:])
            self._j = {**last, c: self._records(k0, min(k0 + DOC_CHUNK, self.n_docs))[0]}
        return self._j[c]

    def docs_at(self, positions: np.ndarray) -> np.ndarray:
        """The document holding each joined position (its trailing separator included)."""
        chunks = np.searchsorted(self.chunk_first_j, positions, side="right") - 1
        out = np.empty(len(positions), np.int64)
        for c in np.unique(chunks).tolist():
            at = chunks == c
            out[at] = c * DOC_CHUNK + np.searchsorted(self._chunk_j(c), positions[at], side="right") - 1
        return out

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Joined-stream ids ``lo:hi`` (int64), separators included."""
        if hi <= lo:
            return np.zeros(0, np.int64)
        k0, k1 = (int(k) for k in self.docs_at(np.asarray([lo, hi - 1])))
        j, length, recs = self._records(k0, k1 + 1)
        p = np.arange(lo, hi, dtype=np.int64)
        k = np.searchsorted(j, p, side="right") - 1
        off = p - j[k]
        src = recs[k, 0] + np.minimum(off, length[k] - 1)
        first = int(src[0])
        out: np.ndarray = self.cache.ids(first, int(src[-1]) + 1)[src - first]
        if self.s:
            out[off >= length[k]] = self.separator
        return out

    def locate(self, positions: np.ndarray) -> np.ndarray:
        """(document, input file, row, position in document) of each position; a separator
        counts as the start of the next document."""
        if len(positions) == 0:
            return np.zeros((0, 4), np.int64)
        k = self.docs_at(positions)
        k0, k1 = int(k.min()), min(int(k.max()) + 2, self.n_docs)
        j, length, recs = self._records(k0, k1)
        off = positions - j[k - k0]
        past = (off >= length[k - k0]) & (k + 1 < self.n_docs)
        k = np.where(past, k + 1, k)
        off = np.where(past, 0, off)
        return np.column_stack([k, recs[k - k0, 1], recs[k - k0, 2], off])

    def documents(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(J, length) of every document, a chunk of documents at a time."""
        for k0 in range(0, self.n_docs, DOC_CHUNK):
            j, length, _ = self._records(k0, min(k0 + DOC_CHUNK, self.n_docs))
            yield j, length
