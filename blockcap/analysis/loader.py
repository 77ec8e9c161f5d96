"""Token vectors of a site as a shuffled stream of training batches (e.g. for sparse autoencoders).

``loader(store, site)`` is a ``torch.utils.data.IterableDataset`` yielding ready batches, so use
it with ``DataLoader(ds, batch_size=None, num_workers=N)``. The store is read in *units* of
whole chunks (a few MB); each epoch visits the units in a seeded random order, worker ``i`` of
``N`` taking every N-th, and mixes their vectors through a bounded in-memory buffer.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from blockcap.analysis.arrays import LazyArray
from blockcap.analysis.reader import CaptureStore, open_store
from blockcap.analysis.scan import prefetched
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import is_vector
from blockcap.core.spec import positive
from blockcap.storage.location import Location
from blockcap.storage.metadata import open_location

READ_BYTES = 4 << 20  # float32 bytes a unit holds, at least one chunk
NORMALIZE = (None, "stats")


class ActivationLoader(IterableDataset):
    """Batches of ``(batch, width)`` float32 token vectors; see ``loader``."""

    def __init__(
        self, store: CaptureStore, site: str, block: int | None, batch_size: int, shuffle: bool, seed: int,
        positions: Any, normalize: str | None, drop_last: bool, buffer_mb: float, with_ids: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        arr = store.site(site, block)
        if not is_vector(site):
            raise BlockcapError(
                f"site={site!r} holds a pattern per window, not a vector per token; pick a vector site"
            )
        n, T, C = arr.shape
        self.site, self.block = site, block
        self.batch_size = positive("batch_size", batch_size)
        for name, value in (("shuffle", shuffle), ("drop_last", drop_last), ("with_ids", with_ids)):
            if not isinstance(value, bool):
                raise BlockcapError(f"{name}={value!r} is not True or False")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise BlockcapError(f"seed={seed!r} is not an integer 0 or more")
        if isinstance(buffer_mb, bool) or not isinstance(buffer_mb, (int, float)) or not buffer_mb >= 0:
            raise BlockcapError(f"buffer_mb={buffer_mb!r} is not a size in MB (0 or more)")
        if normalize not in NORMALIZE:
            raise BlockcapError(f"normalize={normalize!r} is unknown; use None or 'stats'")
        self.shuffle, self.seed, self.drop_last, self.with_ids = shuffle, seed, drop_last, with_ids
        self.positions = _positions(positions, T)
        self.buffer_rows = int(buffer_mb * 2**20) // (4 * C)
        self.scale = _stats_scale(store, site, block) if normalize else None
        self.committed = store.committed_windows()
        self.unit = arr.chunk_windows * max(1, READ_BYTES // (4 * T * C * arr.chunk_windows))
        if store.dedup:  # any window range reads only its rows: units need not follow the row chunks
            self.unit = max(1, READ_BYTES // (4 * T * C))
        self.units = [lo for lo in range(0, n, self.unit) if self.committed[lo : lo + self.unit].any()]
        self.n_vectors = int(self.committed.sum()) * self.positions.size
        self._epoch = multiprocessing.RawValue("q", 0)  # shared memory: persistent workers see set_epoch
        self._where = (str(store.location), store.location.storage_options)
        self._store: CaptureStore | None = store
        self._site: LazyArray | None = None
        # the shuffle buffer, kept for the next epoch: a fresh one costs its page faults again
        # (measured 24-372 ms for 256 MB, against 0.4 s for an epoch of the benchmark's widest site)
        self._kept: list[tuple[np.ndarray, ...]] = []  # at most one; pop and append are atomic

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``: call before iterating (workers, persistent ones too, read it then)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise BlockcapError(f"epoch={epoch!r} is not an integer 0 or more")
        self._epoch.value = epoch

    def __getstate__(self) -> dict[str, Any]:
        """Workers started by pickling (spawn) reopen the store rather than receive it."""
        return {**self.__dict__, "_store": None, "_site": None, "_kept": []}

    @property
    def store(self) -> CaptureStore:
        if self._store is None:
            self._store = CaptureStore(open_location(Location(*self._where)))
        return self._store

    def _part_units(self) -> tuple[list[int], np.random.Generator]:
        """This worker's units in visiting order, and its generator for mixing."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order, epoch = np.asarray(self.units), self.epoch
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order[worker::workers].tolist(), np.random.default_rng([self.seed, epoch, worker, workers])

    def _array(self) -> LazyArray:
        if self._site is None:
            self._site = self.store.site(self.site, self.block)
        return self._site

    def _rows_of(self, lo: int) -> int:
        return int(self.committed[lo : lo + self.unit].sum()) * self.positions.size

    def _whole(self, lo: int) -> bool:
        """Unit ``lo`` is every position of committed windows of a plain float32 site: its vectors
        can be decoded straight into the shuffle buffer."""
        arr = self._array()
        return (
            not self.store.dedup and not arr.bfloat16 and arr.chunks.dtype == np.float32
            and self.positions.size == arr.shape[1] and bool(self.committed[lo : lo + self.unit].all())
        )  # fmt: skip

    def _read(self, lo: int, into: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
        """The unit's vectors (chosen positions of committed windows); with ids also their token ids
        and (window, position); written into ``into`` (a ``_whole`` unit) when given. Numpy
        throughout: single-threaded copies, whatever torch's threads."""
        hi = min(lo + self.unit, self.committed.size)
        keep = np.flatnonzero(self.committed[lo:hi])
        if into is not None:
            self._array().read_into(lo, hi, into[0])
            x = into[0]
        else:
            data = self._array().np[lo:hi].astype(np.float32, copy=False)
            if keep.size < hi - lo:
                data = data[keep]
            if self.positions.size < data.shape[1]:
                data = data[:, self.positions]
            x = data.reshape(-1, data.shape[-1])
        if self.scale is not None:
            x -= self.scale[0]
            x /= self.scale[1]
        if not self.with_ids:
            return (x,)
        ids = self.store.tokens.np[lo:hi][keep][:, self.positions].astype(np.int64).reshape(-1)
        where = np.stack(
            [np.repeat(lo + keep, self.positions.size), np.tile(self.positions, keep.size)], axis=1
        )
        if into is not None:
            into[1][:], into[2][:] = ids, where
        return x, ids, where

    def __iter__(self) -> Iterator[Any]:
        units, rng = self._part_units()
        out = _Batches(self.batch_size)
        rows = sum(int(self.committed[lo : lo + self.unit].sum()) for lo in units) * self.positions.size
        try:  # an iteration beside this one (another thread's too) finds none and makes its own
            kept: tuple[np.ndarray, ...] | None = self._kept.pop()
        except IndexError:
            kept = None
        mixer = _Mixer(min(self.buffer_rows, rows), rng, out, self._like(), kept) if self.shuffle else None
        reads = prefetched(self._reads(units, mixer))
        try:
            for parts in reads:
                if parts is None:  # decoded into the buffer's free rows: nothing to emit yet
                    continue
                for batch in mixer.add(parts) if mixer is not None else out.take(parts, None):
                    yield self._batch(batch)
            for batch in mixer.drain() if mixer is not None else ():
                yield self._batch(batch)
        finally:  # kept once nothing reads it or decodes into it (a read ahead is waited for, e.g. on Ctrl-C)
            reads.close()
            if mixer is not None and mixer.rows is not None:
                self._kept.append(mixer.rows)
                del self._kept[1:]  # one kept, the earliest: no check-then-act between threads
        if not self.drop_last:
            for batch in out.rest():
                yield self._batch(batch)

    def _reads(
        self, units: list[int], mixer: _Mixer | None
    ) -> Iterator[Callable[[], tuple[np.ndarray, ...] | None]]:
        """A read of each unit, in order, for a thread that decodes ahead while this one mixes.

        While every unit so far has been, a unit is decoded straight into rows of the filling
        buffer that it reserves (its read returns None); after the first that is not, none is:
        mixing evicts rows at random, which must never be rows still being decoded.
        """
        reserving = mixer is not None
        for lo in units:
            into = (
                mixer.reserve(self._rows_of(lo))
                if mixer is not None and reserving and self._whole(lo)
                else None
            )
            reserving = into is not None
            yield partial(self._read, lo) if into is None else partial(self._read_into, lo, into)

    def _read_into(self, lo: int, into: tuple[np.ndarray, ...]) -> None:
        self._read(lo, into)

    def _like(self) -> tuple[np.ndarray, ...]:
        """Empty arrays of the shapes and dtypes that ``_read`` returns."""
        width = self._array().shape[-1]
        x = np.empty((0, width), np.float32)
        return (x, np.empty(0, np.int64), np.empty((0, 2), np.int64)) if self.with_ids else (x,)

    def _batch(self, arrays: tuple[np.ndarray, ...]) -> Any:
        tensors = tuple(torch.from_numpy(a) for a in arrays)
        return tensors if self.with_ids else tensors[0]


class _Batches:
    """Rows copied straight into batch arrays (one copy per row); each batch comes out when full."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.current: tuple[np.ndarray, ...] | None = None
        self.fill = 0

    def take(self, src: tuple[np.ndarray, ...], rows: np.ndarray | None) -> Iterator[tuple[np.ndarray, ...]]:
        """Append ``src[rows]`` (all of ``src`` when None), yielding every batch this fills."""
        n, done = (src[0].shape[0] if rows is None else rows.size), 0
        while done < n:
            if self.current is None:
                self.current = tuple(np.empty((self.size, *a.shape[1:]), a.dtype) for a in src)
                self.fill = 0
            k = min(self.size - self.fill, n - done)
            for dst, a in zip(self.current, src, strict=True):
                part = dst[self.fill : self.fill + k]
                if rows is None:
                    part[...] = a[done : done + k]
                else:
                    np.take(a, rows[done : done + k], axis=0, out=part, mode="clip")  # clip: no buffering
            self.fill, done = self.fill + k, done + k
            if self.fill == self.size:
                yield self.current
                self.current = None

    def rest(self) -> Iterator[tuple[np.ndarray, ...]]:
        if self.current is not None and self.fill:
            yield tuple(a[: self.fill] for a in self.current)


class _Mixer:
    """A shuffle buffer of ``capacity`` rows: each row arriving at a full buffer evicts a random one.

    While it fills, units are decoded straight into its free rows (``reserve``): one copy fewer.
    """

    def __init__(
        self, capacity: int, rng: np.random.Generator, out: _Batches, like: tuple[np.ndarray, ...],
        kept: tuple[np.ndarray, ...] | None = None,
    ) -> None:  # fmt: skip
        self.capacity, self.rng, self.out, self.like = capacity, rng, out, like
        self.kept = kept  # an earlier epoch's buffer, used when it fits
        self.rows: tuple[np.ndarray, ...] | None = None  # allocated on first use
        self.fill = 0

    def reserve(self, m: int) -> tuple[np.ndarray, ...] | None:
        """The next ``m`` free rows, counted as filled (the caller writes them); None when full."""
        if self.fill + m > self.capacity:
            return None
        buf = self._buffer(self.like)
        self.fill += m
        return tuple(b[self.fill - m : self.fill] for b in buf)

    def add(self, new: tuple[np.ndarray, ...]) -> Iterator[tuple[np.ndarray, ...]]:
        m = new[0].shape[0]
        buf = self._buffer(new)
        if m > self.capacity:  # more than the buffer holds: keep a random ``capacity`` of both, emit the rest
            pool = tuple(np.concatenate([b[: self.fill], n]) for b, n in zip(buf, new, strict=True))
            order = self.rng.permutation(pool[0].shape[0])
            for b, p in zip(buf, pool, strict=True):
                b[:] = p[order[: self.capacity]]
            self.fill = self.capacity
            yield from self.out.take(pool, order[self.capacity :])
            return
        free = min(m, self.capacity - self.fill)
        for b, n in zip(buf, new, strict=True):
            b[self.fill : self.fill + free] = n[:free]
        self.fill += free
        if free < m:
            slots = self.rng.choice(self.capacity, m - free, replace=False)
            yield from self.out.take(buf, slots)  # copied out before they are overwritten
            for b, n in zip(buf, new, strict=True):
                b[slots] = n[free:]

    def drain(self) -> Iterator[tuple[np.ndarray, ...]]:
        if self.rows is not None and self.fill:
            yield from self.out.take(self.rows, self.rng.permutation(self.fill))

    def _buffer(self, like: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        if self.rows is None:
            shapes = [((self.capacity, *a.shape[1:]), a.dtype) for a in like]
            kept, self.kept = self.kept, None
            fits = kept is not None and [(b.shape, b.dtype) for b in kept] == shapes
            self.rows = kept if kept is not None and fits else tuple(np.empty(*s) for s in shapes)
        return self.rows


def _positions(positions: Any, T: int) -> np.ndarray:
    """The positions to read, sorted and unique (negatives count from the end); None: all."""
    if positions is None:
        return np.arange(T)
    try:
        items = [positions] if isinstance(positions, (int, np.integer)) else list(positions)
        values = [int(p) for p in items if not isinstance(p, bool) and int(p) == p]
    except (TypeError, ValueError):
        items, values = [positions], []
    if not values or len(values) != len(items) or any(not -T <= p < T for p in values):
        raise BlockcapError(
            f"positions={positions!r} is not a position or list of positions in {-T}..{T - 1}; use e.g. [-1]"
        )
    return np.unique(np.asarray(values) % T)


def _stats_scale(store: CaptureStore, site: str, block: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel from the store's statistics; a constant channel keeps std 1."""
    st = store.stats(site, block)
    return st.mean.astype(np.float32), np.where(st.std > 0, st.std, 1.0).astype(np.float32)


def loader(
    store: CaptureStore | str | Path, site: str = "ffwd_output", block: int | None = None,
    batch_size: int = 4096, shuffle: bool = True, seed: int = 0, positions: Any = None,
    normalize: str | None = None, drop_last: bool = False, buffer_mb: float = 256,
    with_ids: bool = False,
) -> ActivationLoader:  # fmt: skip
    """Every committed token vector of ``site`` once per epoch, in batches of ``batch_size``.

    ``DataLoader(loader(...), batch_size=None, num_workers=N)``: each worker reads a disjoint
    set of units, in parallel with the others; the last batch of each worker may be short
    (``drop_last`` drops it). Batches are float32 ``(batch, width)`` tensors, or with
    ``with_ids`` tuples ``(vectors, token_ids, where)`` with ``where`` the (window, position) of
    each row. ``positions``: one position or a list (negatives from the end; default all).
    ``normalize="stats"``: ``(x - mean) / std`` per channel from the store's statistics.

    Shuffling (``shuffle=True``): units are visited in an order drawn from ``(seed, epoch)``
    (``set_epoch`` before each epoch reshuffles), and rows leave a buffer of ``buffer_mb`` MB
    at random as new rows arrive. The buffer is the trade-off: rows in one batch come from
    about ``buffer_mb / unit size`` units, so a larger buffer mixes more (batches look more
    like uniform samples of the store) but costs that much memory per worker (at most its share
    of the site), held from the first epoch for as long as the loader lives (the next epoch
    reuses it), and a longer wait for the first batch; ``buffer_mb=0`` only shuffles within
    each unit (a few windows). The order is reproducible for a given seed, epoch and number of
    workers.
    """
    if not isinstance(store, CaptureStore):
        store = open_store(store)
    return ActivationLoader(store, site, block, batch_size, shuffle, seed, positions, normalize, drop_last,
                            buffer_mb, with_ids)  # fmt: skip
