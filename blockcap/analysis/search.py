"""Top-k nearest neighbours of many queries over a captured site, in one streamed pass.

The original analysis looked up, for a token's vector, the most similar tokens of the dataset.
``topk`` scans the store once, a span of whole chunks at a time (the next span is read in the
background while this one is scored), with one matrix multiply per span for every query, so it
works on stores far larger than memory: it holds two spans, their scores and k hits per query.

Exactness: the float32 multiply only *selects* candidates. Its rounding error is bounded (a dot
product of C float32 terms is off by at most ~C * 2**-24 * |x| |q|), so every row whose score
could reach the current k-th best, widened by eight times that bound, is rescored in float64
from its own values, and ranked by (score, then lower window, then lower position). Identical
vectors therefore get identical scores wherever they sit, ties are broken the same way every
time, and the result equals a float64 brute force over the same data.
"""

from __future__ import annotations

import ast
import json as jsonlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import fire
import numpy as np
import torch

from blockcap.analysis.reader import CaptureStore, LazyArray, open_store
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import is_vector

METRICS = ("cosine", "l2", "dot")
NEAREST_METRICS = ("cosine", "l2")  # what ``nearest`` always took; ``topk`` adds dot
SPAN_BYTES = 8 << 20  # float32 bytes of site data scored per step (whole chunks, at least one)
PAIR_BYTES = 4 << 20  # float64 bytes of candidate rows rescored at once
_EPS = 1e-12  # norms below this count as this (a zero vector has cosine 0 with everything)
_NO_ROW = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Match:
    """One neighbour: where it is, how close, and its text so far."""

    window: int
    position: int
    score: float  # cosine similarity, minus the Euclidean distance, or the dot product
    substring: str


# --- checking the request ---------------------------------------------------------------------------
def _check_options(k: Any, metric: Any, largest: Any, unique: Any, metrics: tuple[str, ...]) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise BlockcapError(f"k={k!r} is out of range; use an integer 1 or more")
    if metric not in metrics:
        raise BlockcapError(f"metric={metric!r} is unknown; use one of {', '.join(metrics)}")
    for name, value in (("largest", largest), ("unique", unique)):
        if not isinstance(value, bool):
            raise BlockcapError(f"{name}={value!r} is not True or False")


def _vector_site(store: CaptureStore, site: Any, block: int | None) -> LazyArray:
    """The site's array, refusing attention (a pattern per window, not a vector per token)."""
    arr = store.site(site, block)
    if not is_vector(site):
        vectors = ", ".join(s for s in store.sites if is_vector(s)) or "none"
        raise BlockcapError(
            f"site={site!r} holds a pattern per window, not a vector per token; use one of: {vectors}"
        )
    return arr


def _position(position: Any, T: int) -> int | None:
    if position is None:
        return None
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not -T <= position < T:
        raise BlockcapError(
            f"position={position!r} is out of range; windows have {T} positions, use {-T}..{T - 1} or None"
        )
    return int(position) % T


def _texts(queries: Any) -> list[str] | None:
    """``queries`` as a list of texts, or None when they are vectors."""
    if isinstance(queries, str):
        return [queries]
    if isinstance(queries, (list, tuple)) and queries and all(isinstance(q, str) for q in queries):
        return list(queries)
    return None


def _query_matrix(queries: Any, arr: LazyArray) -> torch.Tensor:
    """Vector queries as a (q, width) float32 tensor, checked against the site's width."""
    C = arr.shape[-1]
    try:
        q = torch.as_tensor(np.asarray(queries) if isinstance(queries, (list, tuple)) else queries)
    except (TypeError, ValueError, RuntimeError):
        raise BlockcapError(
            f"queries of type {type(queries).__name__} are neither text (a str or list of str) nor "
            f"vectors; pass a ({C},) or (q, {C}) tensor"
        ) from None
    if q.dtype == torch.bool or q.is_complex() or q.ndim not in (1, 2) or q.numel() == 0:
        raise BlockcapError(
            f"queries of shape {tuple(q.shape)} and dtype {q.dtype} are not vectors; "
            f"pass a ({C},) or (q, {C}) real tensor"
        )
    if q.ndim == 1 and q.shape[0] != C:
        raise BlockcapError(f"query has {q.shape[0]} values but {arr.name} vectors have {C}")
    if q.ndim == 2 and q.shape[1] != C:
        raise BlockcapError(
            f"queries have width {q.shape[1]} but {arr.name} vectors have {C}; pass a (q, {C}) tensor"
        )
    q = q.detach().cpu().float().reshape(-1, C)
    if not torch.isfinite(q).all():
        raise BlockcapError("queries hold NaN or infinite values; pass finite vectors")
    return q


# --- text queries -------------------------------------------------------------------------------------
def _check_texts(store: CaptureStore, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, refusing empty text and characters the vocabulary lacks."""
    out = []
    vocab = getattr(store.tokenizer, "stoi", None)  # a char tokenizer's table
    for text in texts:
        missing = sorted(set(text) - vocab.keys()) if vocab is not None else []
        if missing:
            raise BlockcapError(
                f"query {text!r} has characters not in the model's vocabulary ({''.join(missing)!r}); "
                f"remove them"
            )
        ids = store.tokenizer.encode(text) if text else np.zeros(0, np.int64)
        if ids.size == 0:
            raise BlockcapError(f"query {text!r} has no tokens; pass some text")
        out.append(ids)
    return out


def load_store_model(store: CaptureStore, model: str | None = None, weights: str | None = None) -> Any:
    """The model adapter the store was captured with (``model``/``weights``: where it is now).

    Refuses any model whose weights hash differs from the one the store recorded, so query
    vectors always come from the same model as the stored ones.
    """
    spec = store.spec
    if spec is None:
        raise BlockcapError(
            f"store {store.location} predates recorded specs (format 1); pass query vectors instead of text"
        )
    if model is not None or weights is not None:
        spec = replace(spec, model=model, weights=weights, revision=None)
    from blockcap.capture import load_model

    # a raw state dict has no vocabulary: the store's own (its dataset's sorted characters) is it
    adapter = load_model(spec, lambda: getattr(store.tokenizer, "vocab", ""))
    if adapter.model_sha256 != spec.model_sha256:
        where = f"model={spec.model!r}" if spec.model else f"weights={spec.weights!r}"
        raise BlockcapError(
            f"{where} has sha256 {adapter.model_sha256}, but the store was captured with "
            f"{spec.model_sha256}; pass model= or weights= naming the weights it was captured with"
        )
    adapter.to(torch.device("cpu"), getattr(torch, spec.model_dtype))
    return adapter


def text_vectors(
    store: CaptureStore, texts: list[str], site: str, block: int, model: str | None = None,
    weights: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """(len(texts), width): each text's ``site`` vector of ``block`` at its last position."""
    ids = _check_texts(store, texts)
    adapter = load_store_model(store, model, weights)
    context = adapter.dims.context
    for text, i in zip(texts, ids, strict=True):
        if i.size > context:
            raise BlockcapError(
                f"query {text[:40]!r}... is {i.size} tokens, longer than the model's context of "
                f"{context}; shorten it"
            )
    module = adapter.capture_module((block,), (site,), fused=store.spec.fused)
    with torch.inference_mode():
        return torch.stack([module(torch.as_tensor(i)[None])[0][0, -1].float() for i in ids])


# --- scoring ------------------------------------------------------------------------------------------
class _Scorer:
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
class _Span:
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
class _Hits:
    """Scored (query, row) pairs, kept sorted by query, then rank."""

    query: np.ndarray
    key: np.ndarray
    score: np.ndarray
    window: np.ndarray
    position: np.ndarray
    tokens: np.ndarray | None  # (n, T) token ids of each hit's window (plain stores)
    row: np.ndarray | None  # dedup stores: the row of each hit

    def fields(self) -> tuple[np.ndarray | None, ...]:
        return self.query, self.key, self.score, self.window, self.position, self.tokens, self.row

    def take(self, i: np.ndarray) -> _Hits:
        return _Hits(*(None if f is None else f[i] for f in self.fields()))

    def plus(self, other: _Hits) -> _Hits:
        pairs = zip(self.fields(), other.fields(), strict=True)
        return _Hits(*(None if a is None else np.concatenate([a, b]) for a, b in pairs))

    def ranked(self, k: int, nq: int, unique: bool) -> _Hits:
        """Best first per query (key, then lower window, then position); at most k each, and with
        ``unique`` only the best of each distinct prefix (token ids up to the hit)."""
        h = self.take(np.lexsort((self.position, self.window, -self.key, self.query)))
        if unique:
            prefixes = np.empty(h.query.size, object)
            prefixes[:] = [t[: p + 1].tobytes() for t, p in zip(h.tokens, h.position, strict=True)]
            codes = np.unique(prefixes, return_inverse=True)[1].reshape(-1)
            first = np.unique(h.query * (codes.max(initial=0) + 1) + codes, return_index=True)[1]
            h = h.take(np.sort(first))
        return h.take(np.flatnonzero(_offsets(np.bincount(h.query, minlength=nq)) < k))


class _Best:
    """The k best hits of each query so far, and the key each new row must reach."""

    def __init__(self, nq: int, k: int, unique: bool, empty: _Hits) -> None:
        self.nq, self.k, self.unique = nq, k, unique
        self.hits = empty
        self.threshold = torch.full((nq,), -np.inf, dtype=torch.float64)

    def merge(self, new: _Hits) -> None:
        self.hits = self.hits.plus(new).ranked(self.k, self.nq, self.unique)
        counts = np.bincount(self.hits.query, minlength=self.nq)
        kth = self.hits.key[np.maximum(np.cumsum(counts) - 1, 0)] if self.hits.key.size else np.zeros(self.nq)
        self.threshold = torch.from_numpy(np.where(counts == self.k, kth, -np.inf))


def _candidates(span: _Span, scorer: _Scorer, k: int, threshold: torch.Tensor) -> _Hits:
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
    return _Hits(
        q_index.numpy(),
        np.concatenate([p[0] for p in parts]) if parts else np.zeros(0),
        np.concatenate([p[1] for p in parts]) if parts else np.zeros(0),
        span.window[r],
        span.position[r],
        None if span.tokens is None else span.tokens[span.window[r] - span.lo],
        None if span.row is None else span.row[r],
    )


def _no_hits(T: int, dedup: bool) -> _Hits:
    z = np.zeros(0, np.int64)
    tokens = None if dedup else np.zeros((0, T), np.int64)
    return _Hits(z, z.astype(float), z.astype(float), z, z, tokens, z if dedup else None)


# --- reading ------------------------------------------------------------------------------------------
@contextmanager
def _threads_beside_reader() -> Iterator[None]:
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


def _prefetched(jobs: Sequence[Callable[[], _Span]]) -> Iterator[_Span]:
    """Each job's result in order, the next one running in the background meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) > 1:
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


class _WindowSource:
    """A plain store's site, in spans of whole chunks of windows."""

    def __init__(self, store: CaptureStore, arr: LazyArray, position: int | None, unique: bool) -> None:
        self.store, self.arr, self.position, self.unique = store, arr, position, unique
        self.committed = store.committed_windows()

    def jobs(self) -> list[Callable[[], _Span]]:
        n, T, C = self.arr.shape
        step = _span_items(4 * T * C, self.arr.chunk_windows)
        spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        return [lambda lo=lo, hi=hi: self._read(lo, hi) for lo, hi in spans if self.committed[lo:hi].any()]

    def _read(self, lo: int, hi: int) -> _Span:
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
        return _Span(x, window, np.tile(cols, hi - lo), torch.from_numpy(valid), counted, tokens, lo, None)

    def finish(self, best: _Best) -> _Hits:
        return best.hits


class _DedupSource:
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

    def jobs(self) -> list[Callable[[], _Span]]:
        n, C = self.rows.shape
        step = _span_items(4 * C, self.rows.chunk_windows)
        spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        return [
            lambda lo=lo, hi=hi: self._read(lo, hi) for lo, hi in spans if (self.first[lo:hi] < _NO_ROW).any()
        ]

    def _read(self, lo: int, hi: int) -> _Span:
        first = self.first[lo:hi]
        valid = torch.from_numpy(first < _NO_ROW)
        return _Span(self.rows[lo:hi].float(), first // self.T, first % self.T, valid, None, None, lo,
                     np.arange(lo, hi))  # fmt: skip

    def finish(self, best: _Best) -> _Hits:
        """Unique: each row's first occurrence; else every occurrence of the kept rows, re-ranked."""
        h = best.hits
        if self.unique or h.query.size == 0:
            return h
        rows = h.row
        start = np.searchsorted(self.occ_rows, rows, "left")
        count = np.minimum(np.searchsorted(self.occ_rows, rows, "right") - start, self.k)
        which = np.repeat(np.arange(rows.size), count)
        occ = self.occ_where[np.repeat(start, count) + _offsets(count)]
        out = _Hits(h.query[which], h.key[which], h.score[which], occ // self.T, occ % self.T, None, None)
        return out.ranked(self.k, best.nq, False)


def _offsets(count: np.ndarray) -> np.ndarray:
    """0..c-1 for each c in ``count``, concatenated."""
    return np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)


# --- the search -----------------------------------------------------------------------------------------
def topk(
    store: CaptureStore, queries: Any, site: str = "ffwd_output", block: int | None = None, k: int = 10,
    metric: str = "cosine", position: int | None = None, largest: bool = True, unique: bool = False,
    model: str | None = None, weights: str | None = None,
) -> list[list[Match]]:  # fmt: skip
    """The ``k`` best tokens of ``site`` for each query, best first: one list per query.

    ``queries``: a (q, width) tensor, one vector, or text (a str or list of str), which is run
    through the store's own model (``model``/``weights`` say where it is now, if it moved) and
    taken at its last position. ``metric``: cosine, l2 (score: minus the distance) or dot.
    ``position`` searches one position only (negative counts from the end); ``largest=False``
    returns the lowest scores instead; ``unique`` keeps each distinct substring's best hit only.
    Only committed windows are searched, so a store still being written can be queried; a dedup
    store scores each distinct prefix once and returns what a plain store would.
    """
    _check_options(k, metric, largest, unique, METRICS)
    arr = _vector_site(store, site, block)
    pos = _position(position, arr.shape[1])
    texts = _texts(queries)
    if texts is None:
        q = _query_matrix(queries, arr)
    else:
        q = text_vectors(store, texts, site, store.blocks[0] if block is None else block, model, weights)
    k = int(k)
    source: Any = (
        _DedupSource(store, arr, pos, unique, k) if store.dedup else _WindowSource(store, arr, pos, unique)
    )
    best = _Best(
        len(q), k, unique and not store.dedup, _no_hits(arr.shape[1], store.dedup)
    )  # dedup rows: distinct
    scorer = _Scorer(q, metric, largest)
    with _threads_beside_reader():
        for span in _prefetched(source.jobs()):
            best.merge(_candidates(span, scorer, k, best.threshold))
    return _matches(store, source.finish(best), len(q))


def _matches(store: CaptureStore, hits: _Hits, nq: int) -> list[list[Match]]:
    """The hits as Matches, with their text (a dedup store's windows are read now, one by one)."""
    tokens = hits.tokens
    if tokens is None:
        windows, at = np.unique(hits.window, return_inverse=True)
        tokens = store.tokens.np[windows][at.reshape(-1)] if windows.size else np.zeros((0, 0), np.int64)
    out: list[list[Match]] = [[] for _ in range(nq)]
    for q, w, p, score, ids in zip(hits.query, hits.window, hits.position, hits.score, tokens, strict=True):
        text = store.tokenizer.decode(ids[: p + 1].tolist())
        out[q].append(Match(int(w), int(p), float(score), text))
    return out


def nearest(
    store: CaptureStore,
    query: torch.Tensor,
    site: str = "ffwd_output",
    block: int | None = None,
    k: int = 10,
    metric: str = "cosine",
) -> list[Match]:
    """The ``k`` tokens whose ``site`` vectors are closest to the vector ``query``, best first.

    One query, cosine or l2: ``topk`` does many queries (and text, and dot) in one pass.
    """
    _check_options(k, metric, True, False, NEAREST_METRICS)
    return topk(store, torch.as_tensor(query).reshape(-1), site, block, k, metric)[0]


# --- the CLI command --------------------------------------------------------------------------------------
VISIBLE = {"\n": "⏎", " ": "␣", "\t": "⇥"}
SHOWN_CHARS = 60  # the tail of a long substring that the table shows


def visible(text: str) -> str:
    """``text`` with newlines, spaces and tabs drawn (⏎ ␣ ⇥) and other control characters escaped."""
    return "".join(VISIBLE.get(c) or (c if c.isprintable() else repr(c)[1:-1]) for c in text)


def _query_argument(raw: str) -> str | list[str]:
    """``--query`` as typed (spaces kept, digits stay text); a list literal of strings gives several."""
    if raw.lstrip().startswith("["):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
    return raw


@fire.decorators.SetParseFn(_query_argument, "query")
def similar_command(
    store: str, query: Any = None, site: str = "ffwd_output", block_idx: int | None = None, k: int = 10,
    metric: str = "cosine", position: int | None = None, unique: bool = False, largest: bool = True,
    json: bool = False, model: str | None = None, weights: str | None = None,
    storage_options: str | None = None,
) -> None:  # fmt: skip
    """Print the k tokens whose vectors are nearest to those of some text, for each query.

    --query="the " (verbatim), or several at once as a list: --query='["the ", "and"]'.
    Substrings show newlines as ⏎ and spaces as ␣; --json prints every match in full.
    """
    if isinstance(query, str):
        query = [query]
    if not isinstance(query, list) or not query or not all(isinstance(q, str) for q in query):
        raise BlockcapError(f'query={query!r} is not text; pass --query=TEXT or --query=\'["a", "b"]\'')
    if not isinstance(json, bool):
        raise BlockcapError(f"json={json!r} is not True or False")
    s = open_store(str(store), storage_options)
    found = topk(s, query, site, block_idx, k, metric, position, largest, unique, model, weights)
    name = s.site(site, block_idx).name
    if json:
        doc = {"store": str(s.location), "site": name, "metric": metric, "queries": [
            {"query": q, "matches": [{"rank": r + 1, **vars(m)} for r, m in enumerate(ms)]}
            for q, ms in zip(query, found, strict=True)
        ]}  # fmt: skip
        print(jsonlib.dumps(doc, ensure_ascii=False))
        return
    for q, ms in zip(query, found, strict=True):
        print(f"query {visible(q)} ({name}, {metric}, {len(ms)} {'best' if largest else 'worst'})")
        print(f"  {'rank':>4} {'score':>10} {'window':>7} {'position':>8}  substring")
        for r, m in enumerate(ms, 1):
            text = m.substring if len(m.substring) <= SHOWN_CHARS else "…" + m.substring[-SHOWN_CHARS:]
            print(f"  {r:>4} {m.score:>10.4f} {m.window:>7} {m.position:>8}  {visible(text)}")
