"""Which forward passes compute which stored items, in a fixed order.

A batch always has the same composition, whatever is left to do: a resumed or distributed
capture recomputes a unit exactly as an uninterrupted run did (batch composition can change
matmul blocking, and with it the last bit).

* ``WindowSchedule``: items are windows; batch ``b`` is windows ``b*bs .. (b+1)*bs``.
* ``DedupSchedule``: items are the rows of distinct prefixes. Distinct windows, sorted, are the
  batches' inputs; a prefix is computed by the first sorted window that starts with it, so window
  ``u`` contributes rows for its positions from ``lcp(u-1, u)`` on, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from blockcap.data.windows import Windows

Select = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class Batch:
    index: int
    lo: int  # items lo:hi come out of this batch
    hi: int
    ids: torch.Tensor  # (B, T) token ids to run
    tokens: torch.Tensor | None  # the items' windows, for the writer (None for dedup rows)
    select: Select | None  # batch outputs -> item rows (None: the outputs are the items)


class WindowSchedule:
    """Every window computed and stored (the default)."""

    def __init__(self, windows: Windows, batch_size: int) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.n_items = len(windows)

    def batches_for(self, units: list[int], unit_items: int) -> list[int]:
        """Batches whose windows overlap ``units`` (batches start at multiples of batch_size)."""
        bs, out = self.batch_size, set[int]()
        for u in units:
            first, last = u * unit_items, min((u + 1) * unit_items, self.n_items) - 1
            out.update(range(first // bs, last // bs + 1))
        return sorted(out)

    def batch(self, b: int) -> Batch:
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n_items)
        ids = self.windows.get(lo, hi)
        return Batch(b, lo, hi, ids, ids, None)

    def run_length(self, unit_items: int) -> int:
        """Units that share batches, kept together when units are shared among processes."""
        return max(1, self.batch_size // unit_items)


class DedupSchedule:
    """Each distinct prefix computed and stored once (``dedup``)."""

    def __init__(self, windows: Windows, batch_size: int) -> None:
        all_ids = windows.get(0, len(windows)).numpy()
        self.batch_size = batch_size
        unique, inverse = np.unique(all_ids, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        m, T = unique.shape
        lcp = np.zeros(m, dtype=np.int64)
        if m > 1:
            same = unique[1:] == unique[:-1]
            lcp[1:] = np.where(same.all(axis=1), T, np.argmin(same, axis=1))
        counts = T - lcp
        self.row_start = np.concatenate([[0], np.cumsum(counts)])  # rows of unique window u start here
        self.n_items = int(self.row_start[-1])
        # row index of (unique window u, position p): its own row when p >= lcp[u], else u-1's
        row_of = np.empty((m, T), dtype=np.int64)
        for u in range(m):
            own = np.arange(lcp[u], T)
            row_of[u, own] = self.row_start[u] + own - lcp[u]
            if lcp[u]:
                row_of[u, : lcp[u]] = row_of[u - 1, : lcp[u]]
        self.unique = torch.from_numpy(np.ascontiguousarray(unique, dtype=np.int64))
        self.prefix_rows = row_of[inverse]  # (n_windows, T)
        self.row_window = np.repeat(np.arange(m), counts)  # unique window computing each row
        self.row_position = np.arange(self.n_items) - self.row_start[self.row_window] + lcp[self.row_window]
        self.row_weight = np.bincount(self.prefix_rows.reshape(-1), minlength=self.n_items).astype(np.float64)
        self.n_unique = m

    def batches_for(self, units: list[int], unit_items: int) -> list[int]:
        bs, out = self.batch_size, set[int]()
        for u in units:
            lo, hi = u * unit_items, min((u + 1) * unit_items, self.n_items)
            out.update(range(self.row_window[lo] // bs, self.row_window[hi - 1] // bs + 1))
        return sorted(out)

    def batch(self, b: int) -> Batch:
        ulo, uhi = b * self.batch_size, min((b + 1) * self.batch_size, self.n_unique)
        lo, hi = int(self.row_start[ulo]), int(self.row_start[uhi])
        w = torch.from_numpy(self.row_window[lo:hi] - ulo)
        p = torch.from_numpy(self.row_position[lo:hi])

        def select(outs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [o[w.to(o.device), p.to(o.device)] for o in outs]

        return Batch(b, lo, hi, self.unique[ulo:uhi], None, select)

    def run_length(self, unit_items: int) -> int:
        """Units one batch can fill: up to ``batch_size * T`` rows, not aligned with units."""
        return self.batch_size * self.unique.shape[1] // unit_items + 2
