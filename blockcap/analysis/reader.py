"""Lazy read access for analysis code: slice a store and get torch tensors (or numpy arrays).

Only the chunks a read touches are read, and every one is checked against the store's commit
records (``blockcap.integrity``): a missing or altered chunk of a committed unit raises
``DamagedError`` naming the array, chunk and windows, whatever the index form. The same arrays
open with plain ``zarr.open_group``; this module adds bfloat16 decoding, text for windows,
per-head views, dedup stores read as if every window were stored, and per-token iteration.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockcap.analysis.arrays import ChunkReader, DedupArray, LazyArray, _plain
from blockcap.analysis.interop import Interop
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import STATS_FINAL, Layout, site_path, stats_path
from blockcap.core.sites import ATTENTION, DEFAULT_SITES, is_vector
from blockcap.core.spec import parse_storage_options
from blockcap.data.tokenizers import Tokenizer, from_record
from blockcap.storage.location import Location
from blockcap.storage.metadata import COMPLETE, Opened, open_location, spec_of
from blockcap.storage.stats import Stats


class IncompleteStoreWarning(UserWarning):
    """The store's run has not finished: uncommitted windows read as zeros."""


@dataclass(frozen=True)
class TokenRecord:
    """One token of one window, as the original ``raw_results()`` walked them."""

    window: int
    position: int
    substring: str  # the window's text up to and including this position
    vectors: dict[str, torch.Tensor]  # site -> (width,)


class CaptureStore(Interop):
    """A blockcap store opened for reading. Use ``open_store``."""

    def __init__(self, opened: Opened) -> None:
        self.opened = opened
        self.location = opened.location
        self.path = self.location.root if self.location.local else self.location.url
        self.group = opened.group
        self.meta: dict[str, Any] = opened.meta
        self.layout: Layout = opened.layout
        self.params: dict[str, Any] = self.meta.get("params", {})
        self.spec = spec_of(self.meta)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        record = self.meta.get("tokenizer") or {"kind": "char", "vocab": self.meta.get("vocab", "")}
        blob = None
        if record.get("kind") == "hf":
            blob = np.asarray(self.opened.array("tokenizer")[:]).tobytes()
        return from_record(record, blob)

    @property
    def complete(self) -> bool:
        return self.meta.get("state") == COMPLETE

    @property
    def blocks(self) -> tuple[int, ...]:
        return self.layout.blocks

    @property
    def sites(self) -> tuple[str, ...]:
        return self.layout.sites

    @property
    def n_windows(self) -> int:
        return self.layout.n_windows

    @property
    def sample_len(self) -> int:
        return self.layout.sample_len

    @property
    def dedup(self) -> bool:
        return self.layout.dedup

    def _lazy(self, path: str, bfloat16: bool = False) -> LazyArray:
        arr = self.opened.array(path)
        return LazyArray(arr, path, bfloat16, chunks=ChunkReader(self.opened, arr, path))

    @cached_property
    def tokens(self) -> LazyArray:
        return self._lazy("tokens")

    @cached_property
    def offsets(self) -> LazyArray:
        return self._lazy("offsets")

    @cached_property
    def sources(self) -> LazyArray:
        """(window, 4): document, input file, row and position in the document of each window's
        first dataset token (format 3 stores)."""
        if not any(a.path == "sources" for a in self.layout.arrays()):
            raise BlockcapError(
                f"store {self.location} predates window sources (format {self.layout.format_version})"
            )
        return self._lazy("sources")

    def source(self, i: int) -> dict[str, Any]:
        """Where window ``i`` comes from: its document, the input file and row, and its position there."""
        document, file, row, position = (int(x) for x in self.sources.np[self._window(i)])
        files = self.meta.get("dataset", {}).get("files") or [{}]
        return {"document": document, "file": files[file].get("path"), "row": row, "position": position}

    def committed_windows(self) -> np.ndarray:
        """Boolean mask over windows: True where the data has been written and committed."""
        mask = self.opened.index.committed_mask()
        if self.layout.dedup:  # a window is whole when every row it uses is committed
            rows = np.repeat(mask, self.layout.unit_windows)[: self.layout.n_items]
            return rows[np.asarray(self.opened.array("prefix_rows")[:])].all(axis=1)
        return np.repeat(mask, self.layout.unit_windows)[: self.n_windows]

    def site(self, name: str, block: int | None = None) -> LazyArray:
        """Lazy (window, position, width) array of ``name`` at ``block`` (the only block if omitted)."""
        block = self._block(block)
        if name not in self.sites:
            raise BlockcapError(
                f"site {name!r} was not captured in {self.location}; it has {', '.join(self.sites)}"
            )
        rows = self._lazy(site_path(block, name), self.layout.dtype_name == "bfloat16")
        return DedupArray(rows, self.prefix_rows) if self.layout.dedup else rows

    @cached_property
    def prefix_rows(self) -> LazyArray:
        return self._lazy("prefix_rows")

    def heads(self, block: int | None = None) -> LazyArray:
        """heads_output viewed as (window, position, head, head_dim)."""
        base = self.site("heads_output", block)
        split = (self.layout.dims.n_head, self.layout.dims.head_dim)
        if isinstance(base, DedupArray):
            return DedupArray(
                LazyArray(base.zarr, base.name, base.bfloat16, chunks=base.chunks), self.prefix_rows, split
            )
        return LazyArray(base.zarr, base.name, base.bfloat16, split, chunks=base.chunks)

    def stats(self, site: str, block: int | None = None) -> Stats:
        """Per-channel statistics of a site over every stored token (needs a complete store with stats)."""
        block = self._block(block)
        if not self.layout.stats or (block, site) not in self.layout.stat_outputs():
            raise BlockcapError(f"store {self.location} has no statistics for {site_path(block, site)}")
        if not self.complete:
            raise BlockcapError(
                f"store {self.location} is incomplete: its statistics are written when it completes"
            )
        values = {n: np.asarray(self.opened.array(stats_path(block, site, n))[:]) for n in STATS_FINAL}
        count = self.n_windows * self.sample_len
        worst = None  # a lossy store's worst relative error: the last value of every unit's partial
        if self.layout.keep_bits is not None:
            worst = float(np.asarray(self.opened.array(stats_path(block, site, "partial"))[:, -1]).max())
        return Stats(count=count, **values, max_rel_error=worst)

    def _block(self, block: int | None) -> int:
        if block is None:
            if len(self.blocks) != 1:
                raise BlockcapError(f"store {self.location} holds blocks {list(self.blocks)}; pass block=")
            return self.blocks[0]
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block not in self.blocks:
            raise BlockcapError(
                f"block {block!r} was not captured in {self.location}; it has {list(self.blocks)}"
            )
        return int(block)

    def _window(self, i: Any) -> int:
        i = _plain(i)
        if (
            isinstance(i, bool)
            or not isinstance(i, (int, np.integer))
            or not -self.n_windows <= i < self.n_windows
        ):
            raise IndexError(f"window {i!r} is out of range; the store has {self.n_windows} windows")
        return int(i) % self.n_windows

    def text(self, i: int) -> str:
        """The text of window ``i``."""
        return self.tokenizer.decode(self.tokens.np[self._window(i)].tolist())

    def substring(self, i: int, j: int) -> str:
        """Text of window ``i`` up to and including position ``j`` (negative counts from the end)."""
        j = _plain(j)
        T = self.sample_len
        if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not -T <= j < T:
            raise IndexError(f"position {j!r} is out of range; windows have {T} positions")
        return self.tokenizer.prefixes(self.tokens.np[self._window(i)][: int(j) % T + 1].tolist())[-1]

    def results(
        self, block: int | None = None, sites: tuple[str, ...] | None = None
    ) -> Iterator[TokenRecord]:
        """Every token in original order (window-major, then position) with its vectors.

        Reads one chunk of windows at a time, so memory stays at one chunk per site.
        """
        block = self._block(block)
        if isinstance(sites, str):
            sites = tuple(s.strip() for s in sites.split(","))
        names = (
            tuple(sites)
            if sites
            else (
                tuple(s for s in DEFAULT_SITES if s in self.sites)
                or tuple(s for s in self.sites if is_vector(s))
            )
        )
        if ATTENTION in names:
            raise BlockcapError(
                "results() yields one vector per token; attention is a (head, query, key) pattern per "
                "window: read it with site('attention', block)"
            )
        arrays = {n: self.site(n, block) for n in names}
        cw = self.tokens.chunk_windows
        for lo in range(0, self.n_windows, cw):
            hi = min(lo + cw, self.n_windows)
            toks = self.tokens.np[lo:hi]
            chunk = {n: a[lo:hi] for n, a in arrays.items()}
            for w in range(hi - lo):
                for p, text in enumerate(self.tokenizer.prefixes(toks[w].tolist())):
                    yield TokenRecord(lo + w, p, text, {n: c[w, p] for n, c in chunk.items()})

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        where = str(self.location)
        return f"CaptureStore({where!r}, {self.n_windows} windows, blocks {list(self.blocks)}, {state})"


def open_store(path: str | Path, storage_options: dict[str, Any] | str | None = None) -> CaptureStore:
    """Open a blockcap store (a path or a URL such as s3://bucket/x.zarr) for lazy reading.

    Warns if its run has not completed.
    """
    store = CaptureStore(open_location(Location(str(path), parse_storage_options(storage_options))))
    if not store.complete:
        mask = store.opened.index.committed_mask()
        warnings.warn(
            f"store {store.location} is incomplete ({int(mask.sum())} of {mask.size} units committed); "
            f"uncommitted windows read as zeros, see committed_windows()",
            IncompleteStoreWarning,
            stacklevel=2,
        )
    return store
