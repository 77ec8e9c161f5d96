"""Lazy arrays over a store's objects: numpy-style indexing that reads only the chunks it touches,
each checked against the store's commit records before it is decoded."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zarr

from blockcap.core.errors import BlockcapError
from blockcap.core.layout import chunk_key, object_key
from blockcap.storage.codecs import ChunkDecoder
from blockcap.storage.integrity import DamagedError
from blockcap.storage.metadata import Opened


def _plain(k: Any) -> Any:
    """A torch tensor (or 0-d one) as numpy; everything else unchanged."""
    if isinstance(k, torch.Tensor):
        return k.item() if k.ndim == 0 and not k.dtype.is_floating_point else k.cpu().numpy()
    return k


def _normalize(key: Any, ndim: int, name: str) -> tuple[Any, ...]:
    key = tuple(_plain(k) for k in (key if isinstance(key, tuple) else (key,)))
    if any(k is None for k in key):
        raise IndexError(f"{name}: new axes (None) are not supported; index the result instead")
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError(f"{name}: an index can only have a single ellipsis")
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        used = sum(
            np.ndim(k) if isinstance(k, np.ndarray) and k.dtype == bool else 1
            for k in key
            if k is not Ellipsis
        )
        key = key[:i] + (slice(None),) * max(0, ndim - used) + key[i + 1 :]
    return key or (slice(None),)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """This process's reader threads (a forked child, e.g. a DataLoader worker, gets its own)."""
    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS.clear()
        _POOLS[pid] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="blockcap-reader")
    return _POOLS[pid]


class ChunkReader:
    """Whole objects of an array straight from the store: read, commit check, decode. The one read
    path of every blockcap array, format 1 (from its own metadata, sharded or not) included.

    Shapes, dtype and codec come from the store's layout, not from the array's metadata document,
    so an altered ``zarr.json`` cannot change what blockcap reads (``verify`` reports it). Every
    object is read whole and checked against its digest, a shard included (a read of one window
    of a sharded store fetches its shard). zarr's own read path costs about a millisecond a chunk
    here (its event loop, copies); objects are fetched and decoded two at a time (decoding
    releases the GIL), each chunk that a read covers whole straight into the result.
    """

    def __init__(self, opened: Opened, array: zarr.Array, path: str) -> None:
        self.opened = opened
        self.path = path
        found = next((a for a in opened.layout.arrays() if a.path == path), None)
        self.spec = spec = found if opened.index.version >= 2 else None
        if spec is not None:
            self.shape, chunks = spec.shape, spec.chunks
            per = (spec.shards[0] // spec.chunks[0]) if spec.shards else 1
            self.decoder = ChunkDecoder(spec.codec, np.dtype(spec.dtype), chunks, per)
        else:  # format 1: its own metadata
            self.shape = tuple(array.shape)
            decoder = ChunkDecoder.for_array(array)
            if decoder is None:
                raise BlockcapError(
                    f"array {path}: its codecs are not ones blockcap wrote; read it with zarr"
                )
            self.decoder, chunks = decoder, decoder.chunk_shape
        self.rows = int(chunks[0])
        self.dtype = self.decoder.dtype
        self.pieces = 1 if spec is None else spec.pieces

    def _object(self, unit: int, chunks: list[int], dests: list[np.ndarray | None]) -> list[np.ndarray]:
        """Chunks ``chunks`` of write unit ``unit`` (a chunk, or a shard of ``shard_chunks`` chunks), each
        decoded into its ``dests`` entry when there is one; an attention pattern split along queries
        is read piece by piece, each piece placed at its query rows."""
        if self.pieces == 1:
            return self._piece(unit, 0, chunks, dests)
        full = [np.empty((self.rows, *self.shape[1:]), self.dtype) if d is None else d for d in dests]
        q, T = self.decoder.chunk_shape[2], self.shape[2]
        for j in range(self.pieces):
            for whole, part in zip(full, self._piece(unit, j, chunks, [None] * len(chunks)), strict=True):
                whole[:, :, j * q : (j + 1) * q] = part[:, :, : T - j * q]
        return full

    def _piece(
        self, unit: int, piece: int, chunks: list[int], dests: list[np.ndarray | None]
    ) -> list[np.ndarray]:
        """Chunks ``chunks`` of object ``piece`` of write unit ``unit``, as ``_object``."""
        key = (
            chunk_key(self.path, len(self.shape), unit)
            if self.spec is None
            else object_key(self.spec, unit, piece)
        )
        data = self.opened.index.check(key, self.opened.location.get(key), whole=True)
        if data is None:  # never committed: the fill value
            return [self._fill(d) for d in dests]
        k = self.decoder.shard_chunks
        try:
            if k == 1:
                return [self.decoder.decode(data, dests[0])]
            inner = self.decoder.decode_shard(data, [c - unit * k for c in chunks], dests)
            return [self._fill(d) if x is None else x for x, d in zip(inner, dests, strict=True)]
        except ValueError as e:
            lo, hi = chunks[0] * self.rows, min((chunks[-1] + 1) * self.rows, self.shape[0])
            raise DamagedError(
                f"{self.path}: object {key} (windows {lo}..{hi - 1}) is damaged ({e})"
            ) from None

    def _fill(self, dest: np.ndarray | None) -> np.ndarray:
        if dest is None:
            return np.zeros(self.decoder.chunk_shape, self.dtype)
        dest[...] = 0
        return dest

    def read(self, lo: int, hi: int, rows: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo:hi``, or only ``rows`` (sorted, unique), as zarr would return them; into ``out``
        (C-contiguous, of their shape and dtype) when given."""
        want = np.arange(lo, hi) if rows is None else rows
        if out is None:
            out = np.empty((len(want), *self.shape[1:]), self.dtype)
        chunks = np.unique(want // self.rows).tolist()
        k, R = self.decoder.shard_chunks, self.rows
        bounds = {c: np.searchsorted(want, [c * R, (c + 1) * R]).tolist() for c in chunks}
        # a chunk the read covers whole (never the array's padded last one) is decoded in place
        direct = {c: out[a:z] if rows is None and z - a == R else None for c, (a, z) in bounds.items()}
        units = sorted({c // k for c in chunks})
        groups = [[c for c in chunks if c // k == u] for u in units]
        dests = [[direct[c] for c in g] for g in groups]
        for group, datas in zip(groups, _pool().map(self._object, units, groups, dests), strict=True):
            for c, data in zip(group, datas, strict=True):
                if direct[c] is None:
                    a, z = bounds[c]
                    out[a:z] = data[want[a:z] - c * R]
        return out


class LazyArray:
    """A store array that reads on indexing: ``a[k]`` is a torch tensor, ``a.np[k]`` a numpy array.

    Indexing follows numpy (ints, negative ints, slices with any step, integer lists, arrays and
    tensors, boolean masks, ``...``) or raises IndexError; only the windows it selects are read.
    """

    def __init__(
        self, array: zarr.Array, name: str, bfloat16: bool = False, split_last: tuple[int, int] | None = None,
        *, chunks: ChunkReader,
    ) -> None:  # fmt: skip
        self.zarr = array
        self.name = name
        self.bfloat16 = bfloat16
        self.split_last = split_last  # view the last axis as (a, b): per-head views
        self.chunks = chunks

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.zarr.shape)
        return (*shape[:-1], *self.split_last) if self.split_last else shape

    @property
    def chunk_windows(self) -> int:
        return int(self.zarr.chunks[0])

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bfloat16 else torch.from_numpy(np.empty(0, self.zarr.dtype)).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, lo: int, hi: int, rows: np.ndarray | None) -> np.ndarray:
        """Rows ``lo:hi`` of the array, or only ``rows`` (sorted, unique) when given."""
        return self.chunks.read(lo, hi, rows)

    def read_into(self, lo: int, hi: int, out: np.ndarray) -> None:
        """Items ``lo:hi`` of a stored array decoded straight into ``out`` (C-contiguous, of their size and
        the stored dtype): no copy of their own (a plain store's site; not a dedup store's view)."""
        self.chunks.read(lo, hi, None, out.reshape(hi - lo, *self.chunks.shape[1:]))

    def _rows(self, lo: int, hi: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Axis-0 items ``lo:hi`` (or ``rows`` among them), in this view's shape."""
        data = self._read(lo, hi, rows)
        return data.reshape(*data.shape[:-1], *self.split_last) if self.split_last else data

    def _select(self, key: Any) -> np.ndarray:
        key = _normalize(key, len(self.shape), self.name)
        n, k0, rest = self.shape[0], key[0], key[1:]
        if isinstance(k0, (int, np.integer)) and not isinstance(k0, (bool, np.bool_)):
            i = int(k0)
            if not -n <= i < n:
                raise IndexError(f"{self.name}: index {i} is out of bounds for axis 0 with size {n}")
            i %= n
            return self._rows(i, i + 1)[(0, *rest)]
        if isinstance(k0, slice):
            picked = np.arange(n)[k0]
            if picked.size == 0:
                return np.empty((0, *self.shape[1:]), self.zarr.dtype)[(slice(None), *rest)]
            lo, hi = int(picked.min()), int(picked.max()) + 1
            first, last, step = picked[0] - lo, picked[-1] - lo, k0.step or 1
            local = (
                slice(first, last + 1, step)
                if step > 0
                else slice(first, last - 1 if last > 0 else None, step)
            )
            return self._rows(lo, hi)[(local, *rest)]
        arr = np.asarray(k0)
        if arr.dtype == bool:
            if arr.shape[0] != n or arr.ndim > len(self.shape):
                raise IndexError(
                    f"{self.name}: boolean index of shape {arr.shape} does not match {self.shape}"
                )
            picked = np.flatnonzero(arr.reshape(n, -1).any(axis=1))
            local_mask = arr[picked]
            return self._gather(picked)[(local_mask, *rest)]
        if arr.dtype.kind not in "iu" or (arr.size == 0 and arr.dtype == object):
            raise IndexError(
                f"{self.name}: only integers, slices, ..., integer or boolean arrays are valid indices"
            )
        flat = arr.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            bad = int(flat[(flat < -n) | (flat >= n)][0])
            raise IndexError(f"{self.name}: index {bad} is out of bounds for axis 0 with size {n}")
        picked, inverse = np.unique(flat % n if flat.size else flat, return_inverse=True)
        return self._gather(picked)[(inverse.reshape(arr.shape), *rest)]

    def _gather(self, picked: np.ndarray) -> np.ndarray:
        """Items ``picked`` (sorted, unique): one contiguous read when they are dense, else only those."""
        if picked.size == 0:
            return np.empty((0, *self.shape[1:]), self.zarr.dtype)
        lo, hi = int(picked[0]), int(picked[-1]) + 1
        if hi - lo <= 2 * picked.size or hi - lo <= self.chunk_windows:
            return self._rows(lo, hi)[picked - lo]
        return self._rows(lo, hi, picked)

    def __getitem__(self, key: Any) -> torch.Tensor:
        data = np.asarray(self._select(key))  # 0-d stays 0-d, as in numpy
        t = torch.from_numpy(
            data.copy()
            if any(s < 0 for s in data.strides)
            else np.ascontiguousarray(data)
            if data.ndim
            else data
        )
        return t.view(torch.bfloat16) if self.bfloat16 else t

    @property
    def np(self) -> _NumpyView:
        """Numpy indexing: bfloat16 comes back widened to float32 (numpy has no bfloat16)."""
        return _NumpyView(self)

    def __repr__(self) -> str:
        return f"LazyArray({self.name!r}, shape={self.shape}, dtype={self.dtype})"


class DedupArray(LazyArray):
    """A dedup store's site, read as (window, position, width): each token's row looked up."""

    def __init__(
        self, rows: LazyArray, prefix_rows: LazyArray, split_last: tuple[int, int] | None = None
    ) -> None:
        super().__init__(rows.zarr, rows.name, rows.bfloat16, split_last, chunks=rows.chunks)
        self.prefix_rows = prefix_rows

    @property
    def shape(self) -> tuple[int, ...]:
        width = self.split_last or (self.zarr.shape[-1],)
        return (*self.prefix_rows.shape, *width)

    @property
    def chunk_windows(self) -> int:
        return self.prefix_rows.chunk_windows

    def _rows(self, lo: int, hi: int, rows: np.ndarray | None = None) -> np.ndarray:
        which = self.prefix_rows._rows(lo, hi, rows)  # (n, T) row ids
        need, inverse = np.unique(which, return_inverse=True)
        if need.size == 0:
            return np.empty((*which.shape, *self.shape[2:]), self.zarr.dtype)
        data = self._read(
            int(need[0]), int(need[-1]) + 1, need if need.size < (need[-1] - need[0] + 1) // 2 else None
        )
        if data.shape[0] != need.size:
            data = data[need - need[0]]
        data = data[inverse.reshape(which.shape)]
        return data.reshape(*data.shape[:-1], *self.split_last) if self.split_last else data


class _NumpyView:
    def __init__(self, lazy: LazyArray) -> None:
        self.lazy = lazy

    def __getitem__(self, key: Any) -> np.ndarray:
        t = self.lazy[key]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
