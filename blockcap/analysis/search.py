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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from blockcap.analysis.arrays import LazyArray
from blockcap.analysis.queries import query_matrix, query_texts, text_vectors
from blockcap.analysis.reader import CaptureStore
from blockcap.analysis.scan import (
    Best,
    DedupSource,
    Hits,
    Scorer,
    WindowSource,
    candidates,
    no_hits,
    prefetched,
    threads_beside_reader,
)
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import is_vector

METRICS = ("cosine", "l2", "dot")
NEAREST_METRICS = ("cosine", "l2")  # what ``nearest`` always took; ``topk`` adds dot


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
    texts = query_texts(queries)
    if texts is None:
        q = query_matrix(queries, arr)
    else:
        q = text_vectors(store, texts, site, store.blocks[0] if block is None else block, model, weights)
    k = int(k)
    source: Any = (
        DedupSource(store, arr, pos, unique, k) if store.dedup else WindowSource(store, arr, pos, unique)
    )
    best = Best(
        len(q), k, unique and not store.dedup, no_hits(arr.shape[1], store.dedup)
    )  # dedup rows: distinct
    scorer = Scorer(q, metric, largest)
    with threads_beside_reader():
        for span in prefetched(source.jobs()):
            best.merge(candidates(span, scorer, k, best.threshold))
    return _matches(store, source.finish(best), len(q))


def _matches(store: CaptureStore, hits: Hits, nq: int) -> list[list[Match]]:
    """The hits as Matches, with their text (a dedup store's windows are read now, one by one)."""
    tokens = hits.tokens
    if tokens is None:
        windows, at = np.unique(hits.window, return_inverse=True)
        tokens = store.tokens.np[windows][at.reshape(-1)] if windows.size else np.zeros((0, 0), np.int64)
    out: list[list[Match]] = [[] for _ in range(nq)]
    decode = _char_decoder(store.tokenizer) or (lambda ids: store.tokenizer.prefixes(ids.tolist())[-1])
    for q, w, p, score, ids in zip(hits.query, hits.window, hits.position, hits.score, tokens, strict=True):
        out[q].append(Match(int(w), int(p), float(score), decode(ids[: p + 1])))
    return out


def _char_decoder(tokenizer: Any) -> Any:
    """For a character tokenizer, a decoder of id arrays in one table lookup (no per-id Python)."""
    if getattr(tokenizer, "kind", None) != "char":
        return None
    codes = np.frombuffer("".join(tokenizer.vocab).encode("utf-32-le"), np.uint32)
    return lambda ids: codes[ids].tobytes().decode("utf-32-le")


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
