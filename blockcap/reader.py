"""Lazy read access for analysis code: slice a store and get torch tensors (or numpy arrays).

Only the chunks a slice touches are read. The same arrays open with plain ``zarr.open_group``;
this module adds bfloat16 decoding, text for windows, per-head views and per-token iteration.
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
import zarr

from blockcap.data import CharTokenizer
from blockcap.errors import BlockcapError
from blockcap.store import (
    COMPLETE,
    DEFAULT_SITES,
    damaged_chunks,
    meta,
    open_group,
    read_committed,
    site_path,
)


class IncompleteStoreWarning(UserWarning):
    """The store's run has not finished: uncommitted windows read as zeros."""


class LazyArray:
    """A zarr array that reads on slicing; ``a[k]`` is a torch tensor, ``a.np[k]`` a numpy array.

    A read that hits a damaged chunk raises a BlockcapError naming the array and the chunk.
    """

    def __init__(self, array: zarr.Array, name: str, split_last: tuple[int, int] | None = None) -> None:
        self.zarr = array
        self.name = name
        self.bfloat16 = array.attrs.get("blockcap_dtype") == "bfloat16"
        self.split_last = split_last  # view the last axis as (a, b): per-head views

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.zarr.shape)
        return (*shape[:-1], *self.split_last) if self.split_last else shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bfloat16 else torch.from_numpy(np.empty(0, self.zarr.dtype)).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, key: Any) -> np.ndarray:
        if self.split_last:
            key = key if isinstance(key, tuple) else (key,)
            if len(key) > self.zarr.ndim - 1 or Ellipsis in key:
                raise IndexError(f"{self.name}: a per-head view is sliced over window and position only")
        try:
            return np.asarray(self.zarr[key])
        except (IndexError, TypeError):
            raise
        except Exception as e:
            raise BlockcapError(f"{self.name}: {self._locate_damage(key)} is damaged ({e})") from None

    def _locate_damage(self, key: Any) -> str:
        """Name the first unreadable chunk among those ``key`` touches."""
        first = key[0] if isinstance(key, tuple) else key
        rows = (
            range(self.zarr.shape[0])[first]
            if isinstance(first, slice)
            else [int(first) % self.zarr.shape[0]]
        )
        cw = self.zarr.chunks[0]
        return next(
            (where for where, _ in damaged_chunks(self.zarr, sorted({r // cw for r in rows}))), "a chunk"
        )

    def __getitem__(self, key: Any) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(self._read(key)))
        if self.bfloat16:
            t = t.view(torch.bfloat16)
        return t.unflatten(-1, self.split_last) if self.split_last else t

    @property
    def np(self) -> _NumpyView:
        """Numpy indexing: bfloat16 comes back widened to float32 (numpy has no bfloat16)."""
        return _NumpyView(self)


class _NumpyView:
    def __init__(self, lazy: LazyArray) -> None:
        self.lazy = lazy

    def __getitem__(self, key: Any) -> np.ndarray:
        t = self.lazy[key]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@dataclass(frozen=True)
class TokenRecord:
    """One token of one window, as the original ``raw_results()`` walked them."""

    window: int
    position: int
    substring: str  # the window's characters up to and including this position
    vectors: dict[str, torch.Tensor]  # site -> (n_embed,)


class CaptureStore:
    """A blockcap store opened for reading. Use ``open_store``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.group = open_group(self.path)
        self.meta: dict[str, Any] = meta(self.group)
        self.params: dict[str, Any] = self.meta.get("params", {})
        self.vocab: str = self.meta.get("vocab", "")
        if not self.complete:
            mask = read_committed(self.group)
            warnings.warn(
                f"store {self.path} is incomplete ({int(mask.sum())} of {mask.size} chunks committed); "
                f"uncommitted windows read as zeros, see committed_windows()",
                IncompleteStoreWarning,
                stacklevel=2,
            )

    @cached_property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer(self.vocab)

    @property
    def complete(self) -> bool:
        return self.meta.get("state") == COMPLETE

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(self.params.get("blocks", ()))

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.params.get("sites", ()))

    @property
    def n_windows(self) -> int:
        return int(self.group["tokens"].shape[0])

    @cached_property
    def tokens(self) -> LazyArray:
        return LazyArray(self.group["tokens"], "tokens")

    @cached_property
    def offsets(self) -> LazyArray:
        return LazyArray(self.group["offsets"], "offsets")

    def committed_windows(self) -> np.ndarray:
        """Boolean mask over windows: True where the data has been written."""
        cw = self.group["tokens"].chunks[0]
        return np.repeat(read_committed(self.group), cw)[: self.n_windows]

    def site(self, name: str, block: int | None = None) -> LazyArray:
        """Lazy (window, position, embed) array of ``name`` at ``block`` (the only block if omitted)."""
        block = self._block(block)
        if name not in self.sites:
            raise BlockcapError(
                f"site {name!r} was not captured in {self.path}; it has {', '.join(self.sites)}"
            )
        return LazyArray(self.group[site_path(block, name)], site_path(block, name))

    def heads(self, block: int | None = None) -> LazyArray:
        """heads_output viewed as (window, position, head, head_size)."""
        n_head = int(self.meta["model_config"]["n_head"])
        base = self.site("heads_output", block)
        width = base.shape[-1]
        return LazyArray(base.zarr, base.name, split_last=(n_head, width // n_head))

    def _block(self, block: int | None) -> int:
        if block is None:
            if len(self.blocks) != 1:
                raise BlockcapError(f"store {self.path} holds blocks {list(self.blocks)}; pass block=")
            return self.blocks[0]
        if block not in self.blocks:
            raise BlockcapError(f"block {block} was not captured in {self.path}; it has {list(self.blocks)}")
        return block

    def text(self, i: int) -> str:
        """The characters of window ``i``."""
        return self.tokenizer.decode(self.tokens.np[i].tolist())

    def substring(self, i: int, j: int) -> str:
        """Characters of window ``i`` up to and including position ``j``."""
        return self.text(i)[: j + 1]

    def results(
        self, block: int | None = None, sites: tuple[str, ...] | None = None
    ) -> Iterator[TokenRecord]:
        """Every token in original order (window-major, then position) with its vectors.

        Reads one chunk of windows at a time, so memory stays at one chunk per site.
        """
        block = self._block(block)
        names = (
            sites
            or tuple(s for s in DEFAULT_SITES if s in self.sites)
            or tuple(s for s in self.sites if s != "attention")
        )
        arrays = {n: self.site(n, block) for n in names}
        cw = self.group["tokens"].chunks[0]
        for lo in range(0, self.n_windows, cw):
            hi = min(lo + cw, self.n_windows)
            toks = self.tokens.np[lo:hi]
            chunk = {n: a[lo:hi] for n, a in arrays.items()}
            for w in range(hi - lo):
                text = self.tokenizer.decode(toks[w].tolist())
                for p in range(len(text)):
                    yield TokenRecord(lo + w, p, text[: p + 1], {n: c[w, p] for n, c in chunk.items()})

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return (
            f"CaptureStore({str(self.path)!r}, {self.n_windows} windows, blocks {list(self.blocks)}, {state})"
        )


def open_store(path: str | Path) -> CaptureStore:
    """Open a blockcap store for lazy reading (warns if its run has not completed)."""
    return CaptureStore(path)
