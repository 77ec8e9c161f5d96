"""The streamed scoring pass behind ``topk``: spans of whole chunks read in the background, one
matrix multiply per span for every query, float32 to select candidates and float64 to rank them.
See ``blockcap.analysis.search`` for the exactness argument."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np
import torch

from blockcap.analysis.arrays import LazyArray
from blockcap.analysis.reader import CaptureStore

R = TypeVar("R")  # what a prefetched job returns
SPAN_BYTES = 8 << 20  # float32 bytes of site data scored per step (whole chunks, at least one)


PAIR_BYTES = 4 << 20  # float64 bytes of candidate rows rescored at once


_EPS = 1e-12  # norms below this count as this (a zero vector has cosine 0 with everything)


_NO_ROW = np.iinfo(np.int64).max


# --- scoring ------------------------------------------------------------------------------------------
class Scorer:
    """float32 estimates with a proven error bound, and exact float64 scores of chosen rows.

    Keys are what is ranked: the score, except for l2 where it is minus the squared distance
    (monotone in the score, and boundable); negated when the smallest are wanted.
    """

    def __init__(self, q: torch.Tensor, metric: str, largest: bool) -> None:
        self.metric = metric
        self.sign = 1.0 if largest else -1.0
        self.q64 = q.double()
        self.qn64 = self.q64.norm(dim=1)
        self.qn = self.qn64.float()
        self.qmat = (self.q64 / self.qn64.clamp_min(_EPS)[:, None]).float() if metric == "cosine" else q
        self.slack = 8 * (q.shape[1] + 2) * 2.0**-24  # 8x the float32 dot-product error bound

    def estimate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(key (q, n), tolerance (q,)): every exact key lies within key +- tolerance.

        One tolerance per query (from the span's largest norm), so selecting needs no second
        (q, n) matrix. NaN keys (from non-finite data) become -inf: they never set a threshold.
        """
        key = self.qmat @ x.T  # (q, n): the one multiply
        xn = x.norm(dim=1)
        top = xn.max() if xn.numel() else torch.tensor(0.0)
        if self.metric == "cosine":
            key.div_(xn.clamp_min(_EPS))
            tol = torch.full_like(self.qn, self.slack)
        elif self.metric == "dot":
            tol = self.slack * self.qn * top
        else:  # minus the squared distance
            key.mul_(2).sub_(xn.square()).sub_(self.qn.square()[:, None])
            tol = self.slack * (self.qn + top).square()
        if self.sign < 0:
            key.neg_()
        return key.nan_to_num_(nan=-np.inf), tol

    def exact(self, x: torch.Tensor, q_index: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(key, score) in float64 of rows ``x`` against queries ``q_index``, pair by pair."""
        xs, qs = x.double(), self.q64[q_index]
        if self.metric == "l2":
            d2 = (xs - qs).square().sum(dim=1)
            key, score = -d2, -d2.sqrt()
        else:
            score = (xs * qs).sum(dim=1)
            if self.metric == "cosine":
                xn = xs.square().sum(dim=1).sqrt()
                score = score / (xn.clamp_min(_EPS) * self.qn64[q_index].clamp_min(_EPS))
            key = score
        return (self.sign * key).numpy(), score.numpy()


@dataclass
class Span:
    """Rows of the site read in one step, with where each row is."""

    x: torch.Tensor  # (n, C) float32
    window: np.ndarray  # (n,) of the row (a dedup row: its first occurrence)
    position: np.ndarray
    valid: torch.Tensor  # (n,) committed rows
    # (n,) the valid rows that may set the threshold (unique: one per prefix); None: all valid rows
    counted: torch.Tensor | None
    tokens: np.ndarray | None  # (windows lo.., T) token ids of a plain store's span windows
    lo: int  # the span's first window (plain) or row (dedup)
    row: np.ndarray | None  # (n,) a dedup store's row index of each row


@dataclass
class Hits:
    """Scored (query, row) pairs, kept sorted by query, then rank."""

    query: np.ndarray
    key: np.ndarray
    score: np.ndarray
    window: np.ndarray
    position: np.ndarray
    tokens: np.ndarray | None  # (n, T) token ids of each hit's window (plain stores)
    row: np.ndarray | None  # dedup stores: the row of each hit

    def take(self, i: np.ndarray) -> Hits:
        return Hits(
            self.query[i], self.key[i], self.score[i], self.window[i], self.position[i],
            None if self.tokens is None else self.tokens[i], None if self.row is None else self.row[i],
        )  # fmt: skip

    def plus(self, other: Hits) -> Hits:
        return Hits(
            np.concatenate([self.query, other.query]), np.concatenate([self.key, other.key]),
            np.concatenate([self.score, other.score]), np.concatenate([self.window, other.window]),
            np.concatenate([self.position, other.position]),
            _cat(self.tokens, other.tokens), _cat(self.row, other.row),
        )  # fmt: skip

    def ranked(self, k: int, nq: int, unique: bool) -> Hits:
        """Best first per query (key, then lower window, then position); at most k each, and with
        ``unique`` only the best of each distinct prefix (token ids up to the hit)."""
        h = self.take(np.lexsort((self.position, self.window, -self.key, self.query)))
        if unique:
            assert h.tokens is not None  # unique ranks a plain store's hits (dedup rows are distinct)
            prefixes = np.empty(h.query.size, object)
            prefixes[:] = [t[: p + 1].tobytes() for t, p in zip(h.tokens, h.position, strict=True)]
            codes = np.unique(prefixes, return_inverse=True)[1].reshape(-1)
            first = np.unique(h.query * (codes.max(initial=0) + 1) + codes, return_index=True)[1]
            h = h.take(np.sort(first))
        return h.take(np.flatnonzero(_offsets(np.bincount(h.query, minlength=nq)) < k))


def _cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """A field of two sets of hits of one store: both arrays, or both None (a field the store lacks)."""
    if a is None:
        return None
    assert b is not None
    return np.concatenate([a, b])


class Best:
    """The k best hits of each query so far, and the key each new row must reach."""

    def __init__(self, nq: int, k: int, unique: bool, empty: Hits) -> None:
        self.nq, self.k, self.unique = nq, k, unique
        self.hits = empty
        self.threshold = torch.full((nq,), -np.inf, dtype=torch.float64)

    def merge(self, new: Hits) -> None:
        self.hits = self.hits.plus(new).ranked(self.k, self.nq, self.unique)
        counts = np.bincount(self.hits.query, minlength=self.nq)
        kth = self.hits.key[np.maximum(np.cumsum(counts) - 1, 0)] if self.hits.key.size else np.zeros(self.nq)
        self.threshold = torch.from_numpy(np.where(counts == self.k, kth, -np.inf))


def candidates(span: Span, scorer: Scorer, k: int, threshold: torch.Tensor) -> Hits:
    """Rows of ``span`` that may enter some query's top k (given each query's k-th best key so
    far, -inf until it has k), scored exactly."""
    key, tol = scorer.estimate(span.x)
    everywhere = bool(span.valid.all())
    if not everywhere:
        key[:, ~span.valid] = -np.inf
    bar = threshold
    if key.shape[1] >= k and bool(torch.isinf(bar).any()):  # some query lacks k hits yet: the
        counted = key if span.counted is None else key.masked_fill(~span.counted[None, :], -np.inf)
        span_kth = counted.topk(k, dim=1).values[:, -1].double() - tol  # span's own k-th bounds it
        bar = torch.maximum(bar, span_kth)
    cut = torch.nextafter((bar - tol).float(), torch.tensor(-np.inf))  # never above it in float32
    chosen = key >= cut[:, None]
    if not everywhere:
        chosen &= span.valid[None, :]
    q_index, rows = chosen.nonzero(as_tuple=True)
    step = max(1, PAIR_BYTES // (8 * span.x.shape[1]))
    parts = [
        scorer.exact(span.x[rows[i : i + step]], q_index[i : i + step]) for i in range(0, rows.numel(), step)
    ]
    r = rows.numpy()
    return Hits(
        q_index.numpy(),
        np.concatenate([p[0] for p in parts]) if parts else np.zeros(0),
        np.concatenate([p[1] for p in parts]) if parts else np.zeros(0),
        span.window[r],
        span.position[r],
        None if span.tokens is None else span.tokens[span.window[r] - span.lo],
        None if span.row is None else span.row[r],
    )


def no_hits(T: int, dedup: bool) -> Hits:
    z = np.zeros(0, np.int64)
    tokens = None if dedup else np.zeros((0, T), np.int64)
    return Hits(z, z.astype(float), z.astype(float), z, z, tokens, z if dedup else None)


# --- reading ------------------------------------------------------------------------------------------
@contextmanager
def threads_beside_reader() -> Iterator[None]:
    """torch ops get one thread fewer (at least one) while a background thread reads.

    An OpenMP team that shares its cores with the reader stalls at every barrier: on two
    cores, two threads scored several times slower than one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


AHEAD = 2  # spans read ahead of the one being scored: the reader never waits for the scorer


def prefetched(jobs: Iterable[Callable[[], R]]) -> Generator[R, None, None]:
    """Each job's result in order, the next ``AHEAD`` running in the background meanwhile (a job
    is taken from ``jobs`` when it is submitted, ``AHEAD`` before its result is wanted)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) > AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _span_items(item_bytes: int, chunk: int) -> int:
    """Items per span: whole chunks, about ``SPAN_BYTES``."""
    return chunk * max(1, SPAN_BYTES // max(1, item_bytes * chunk))


def _prefix_hashes(tokens: np.ndarray) -> np.ndarray:
    """(windows, T) uint64 hash of each prefix ``tokens[w, :p + 1]`` (equal prefixes, equal hashes)."""
    h = np.zeros(tokens.shape[0], np.uint64)
    out = np.empty(tokens.shape, np.uint64)
    for p in range(tokens.shape[1]):
        h = h * np.uint64(1_000_003) + tokens[:, p].astype(np.uint64) + np.uint64(1)
        out[:, p] = h
    return out


def _first_of_each(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mask of the valid rows whose key no earlier valid row has."""
    idx = np.flatnonzero(valid)
    out = np.zeros(keys.size, bool)
    out[idx[np.unique(keys[idx], return_index=True)[1]]] = True
    return out


class WindowSource:
    """A plain store's site, in spans of whole chunks of windows."""

    def __init__(self, store: CaptureStore, arr: LazyArray, position: int | None, unique: bool) -> None:
        self.store, self.arr, self.position, self.unique = store, arr, position, unique
        self.committed = store.committed_windows()

    def jobs(self) -> list[Callable[[], Span]]:
        n, T, C = self.arr.shape
        step = _span_items(4 * T * C, self.arr.chunk_windows)
        spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        return [partial(self._read, lo, hi) for lo, hi in spans if self.committed[lo:hi].any()]

    def _read(self, lo: int, hi: int) -> Span:
        data = self.arr[lo:hi].float()
        T = data.shape[1]
        cols = np.arange(T) if self.position is None else np.asarray([self.position])
        x = data.reshape(-1, data.shape[-1]) if self.position is None else data[:, self.position]
        window = np.repeat(np.arange(lo, hi), cols.size)
        valid = self.committed[window]
        tokens = self.store.tokens.np[lo:hi].astype(np.int64)  # read here, beside the vectors: cheap
        counted = None
        if self.unique:
            counted = torch.from_numpy(_first_of_each(_prefix_hashes(tokens)[:, cols].reshape(-1), valid))
        return Span(x, window, np.tile(cols, hi - lo), torch.from_numpy(valid), counted, tokens, lo, None)

    def finish(self, best: Best) -> Hits:
        return best.hits


class DedupSource:
    """A dedup store's site: each distinct prefix's row scored once, standing for its occurrences.

    A row is placed at its first committed occurrence (the best of equal hits); at the end each
    kept row is expanded into its occurrences, so results equal those of a plain store. Holds the
    window index in memory (two int64 per stored token), as ``committed_windows`` reads it anyway.
    """

    def __init__(
        self, store: CaptureStore, arr: LazyArray, position: int | None, unique: bool, k: int
    ) -> None:
        self.rows = LazyArray(arr.zarr, arr.name, arr.bfloat16, chunks=arr.chunks)  # (row, width)
        self.unique, self.k = unique, k
        prefix = store.prefix_rows.np[:].astype(np.int64)
        T = prefix.shape[1]
        where = np.flatnonzero(np.repeat(store.committed_windows(), T))  # flat w * T + p, ascending
        if position is not None:
            where = where[where % T == position]
        occ_rows = prefix.reshape(-1)[where]
        order = np.argsort(occ_rows, kind="stable")  # by row, then window and position
        self.occ_rows, self.occ_where, self.T = occ_rows[order], where[order], T
        self.first = np.full(self.rows.shape[0], _NO_ROW)
        rows, at = np.unique(self.occ_rows, return_index=True)
        self.first[rows] = self.occ_where[at]

    def jobs(self) -> list[Callable[[], Span]]:
        n, C = self.rows.shape
        step = _span_items(4 * C, self.rows.chunk_windows)
        spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        return [partial(self._read, lo, hi) for lo, hi in spans if (self.first[lo:hi] < _NO_ROW).any()]

    def _read(self, lo: int, hi: int) -> Span:
        first = self.first[lo:hi]
        valid = torch.from_numpy(first < _NO_ROW)
        return Span(self.rows[lo:hi].float(), first // self.T, first % self.T, valid, None, None, lo,
                     np.arange(lo, hi))  # fmt: skip

    def finish(self, best: Best) -> Hits:
        """Unique: each row's first occurrence; else every occurrence of the kept rows, re-ranked."""
        h = best.hits
        if self.unique or h.query.size == 0:
            return h
        rows = h.row
        assert rows is not None  # a dedup store's hits carry their rows
        start = np.searchsorted(self.occ_rows, rows, "left")
        count = np.minimum(np.searchsorted(self.occ_rows, rows, "right") - start, self.k)
        which = np.repeat(np.arange(rows.size), count)
        occ = self.occ_where[np.repeat(start, count) + _offsets(count)]
        out = Hits(h.query[which], h.key[which], h.score[which], occ // self.T, occ % self.T, None, None)
        return out.ranked(self.k, best.nq, False)


def _offsets(count: np.ndarray) -> np.ndarray:
    """0..c-1 for each c in ``count``, concatenated."""
    return np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
