"""Top-k nearest neighbours over a captured site, streamed chunk by chunk.

The original analysis looked up, for a token's vector, the most similar tokens of the dataset.
Here the store is scanned one chunk at a time (memory: one chunk plus k), so it works on stores
far larger than memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockcap.errors import BlockcapError
from blockcap.reader import CaptureStore

METRICS = ("cosine", "l2")


@dataclass(frozen=True)
class Match:
    """One neighbour: where it is, how close (higher is closer), and its text so far."""

    window: int
    position: int
    score: float  # cosine similarity, or minus the Euclidean distance
    substring: str


def _scores(x: torch.Tensor, q: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return (x @ q) / x.norm(dim=1).clamp_min(1e-12)
    return -torch.cdist(x, q[None]).squeeze(1)


def nearest(
    store: CaptureStore,
    query: torch.Tensor,
    site: str = "ffwd_output",
    block: int | None = None,
    k: int = 10,
    metric: str = "cosine",
) -> list[Match]:
    """The ``k`` tokens whose ``site`` vectors are closest to ``query``, best first.

    Only committed windows are searched, so a store still being written can be queried.
    """
    if metric not in METRICS:
        raise BlockcapError(f"metric={metric!r} is unknown; use one of {', '.join(METRICS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BlockcapError(f"k={k!r} is out of range; use an integer 1 or more")
    arr = store.site(site, block)
    n, T, C = arr.shape
    q = query.detach().float().flatten()
    if q.numel() != C:
        raise BlockcapError(f"query has {q.numel()} values but {arr.name} vectors have {C}")
    if metric == "cosine":
        q = q / q.norm().clamp_min(1e-12)
    committed = torch.from_numpy(store.committed_windows())
    best_scores, best_rows = torch.empty(0), torch.empty(0, dtype=torch.long)
    cw = arr.chunk_windows
    for lo in range(0, n, cw):
        hi = min(lo + cw, n)
        if not committed[lo:hi].any():
            continue
        scores = _scores(arr[lo:hi].float().reshape(-1, C), q, metric)
        scores[~committed[lo:hi].repeat_interleave(T)] = float("-inf")
        rows = torch.arange(lo * T, hi * T)
        best_scores, top = torch.cat([best_scores, scores]).topk(min(k, len(best_scores) + len(scores)))
        best_rows = torch.cat([best_rows, rows])[top]
    return [
        Match(int(r) // T, int(r) % T, float(s), store.substring(int(r) // T, int(r) % T))
        for s, r in zip(best_scores, best_rows, strict=True)
        if s > float("-inf")
    ]
