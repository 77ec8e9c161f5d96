"""Background unit writer: encodes and writes finished units while the next batches compute.

A *slab* holds one write unit (a chunk of windows, a shard of chunks, or a chunk of rows of a
dedup store) of every per-unit array: on the CPU the outputs of the batches that lie inside the
unit, as they are (the writer assembles them, off the forward's thread), and a buffer (pinned on
CUDA) that batches copy their rows into when the unit is only part of a batch. Worker threads
encode each array's object (``ChunkEncoder``) and write it; the committer thread
(``blockcap.storage.committer``) then makes the unit's objects durable and only then writes its
commit record with the digest of every object, so a crash never counts a unit whose bytes are
missing (``blockcap.integrity``). A semaphore bounds the slabs in flight, and with them memory.

One pass per object: statistics read the slab once (in cache-sized blocks), the encoder
compresses it straight into a buffer its thread reuses, with the checksum appended in place,
and that checksum is the object's digest; the buffer is written as it is. Nothing of a unit's
size is allocated per unit except the slab itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from blockcap.core.layout import ArrayDef, Layout, object_key, object_keys, pad_rows, site_path, stats_path
from blockcap.storage.codecs import ChunkEncoder
from blockcap.storage.committer import Committer
from blockcap.storage.integrity import encode_record
from blockcap.storage.libc import function
from blockcap.storage.location import Location
from blockcap.storage.precision import round_bits
from blockcap.storage.stats import partial, widen


@dataclass
class Slab:
    """One write unit (items ``lo:hi``) of tokens and of every captured array."""

    unit: int
    lo: int
    hi: int
    tokens: torch.Tensor | None = None  # (n, T), windows only
    sites: list[torch.Tensor] = field(default_factory=list)  # per layout.outputs(), storage dtype
    parts: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)  # whole batches: (row, outs)
    event: torch.cuda.Event | None = None  # recorded after the device-to-host copies
    filled: int = 0

    @property
    def full(self) -> bool:
        return self.filled == self.hi - self.lo

    def put(self, row: int, tokens: torch.Tensor | None, outs: list[torch.Tensor], whole_batch: bool) -> None:
        """Add items ``row:row+n`` of the unit from a batch (``outs`` already in storage dtype).

        A batch that lies inside the unit (on the CPU) is kept as it is: the writer copies it, off
        the forward's thread, if the unit has other parts. A unit that is part of a batch is
        copied out, so the batch's outputs are freed once routed (memory: the slabs in flight,
        not the batches they came from).
        """
        n, size = outs[0].shape[0], self.hi - self.lo
        if tokens is not None and n == size:
            self.tokens = tokens
        elif tokens is not None:
            if self.tokens is None:
                self.tokens = torch.empty((size, *tokens.shape[1:]), dtype=tokens.dtype)
            self.tokens[row : row + n] = tokens
        if whole_batch and not outs[0].is_cuda:
            self.parts.append((row, outs))
        else:
            if not self.sites:
                self.sites = [
                    torch.empty((size, *o.shape[1:]), dtype=o.dtype, pin_memory=o.is_cuda) for o in outs
                ]
            for buf, o in zip(self.sites, outs, strict=True):
                buf[row : row + n].copy_(o, non_blocking=True)
        self.filled += n


_ASSEMBLY = threading.local()


def _assembly(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """This thread's reusable buffer for assembling one site of a unit from its batches."""
    size = int(np.prod(shape)) * dtype.itemsize
    buf = getattr(_ASSEMBLY, "buf", None)
    if buf is None or buf.size < size:
        buf = _ASSEMBLY.buf = np.empty(size, np.uint8)
    return buf[:size].view(dtype).reshape(shape)


_MALLOC_TRIM = function("malloc_trim", [ctypes.c_size_t])
COMMITS_WAITING = 16  # units written and not yet committed, at most: what a crash would redo
TRIM_EVERY = 8  # units between returns of freed heap pages to the system (see _release_memory)


def _release_memory() -> None:
    """Hand freed heap pages back to the system every ``TRIM_EVERY`` units (glibc keeps them).

    glibc raises its mmap threshold after large frees, so later multi-megabyte buffers come from
    the heap and their pages stay resident: measured, peak memory grew with the run's length.
    Not after every unit: the pages handed back fault in again on the next unit's buffers, which
    cost 15 % of the writer's throughput when trimming every unit.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _set_policy(tids: set[int], policy: int) -> None:
    for tid in tids:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(tid, policy, os.sched_param(0))


class _Background:
    """The writer threads' CPU priority while a run computes: idle or normal, as the run's core
    split says (``blockcap.run.split``).

    At idle priority, on a machine whose cores torch keeps busy, encoding runs in the gaps instead
    of preempting torch's worker threads, whose barriers stall whenever one of them is
    descheduled. When torch is given a core fewer, or no trial measured that idling pays (a GPU
    run, one thread), the writers run at normal priority (idle threads starve behind any other
    busy process). Restored when the run ends.
    """

    def __init__(self) -> None:
        self.tids: dict[int, bool] = {}  # thread -> idle
        self.idle = True
        self.lock = threading.Lock()

    def claim(self) -> None:
        with self.lock:
            tid = threading.get_native_id()
            if self.tids.get(tid) is not self.idle:
                _set_policy({tid}, getattr(os, "SCHED_IDLE" if self.idle else "SCHED_OTHER", 0))
                self.tids[tid] = self.idle

    def release(self) -> None:
        with self.lock:
            _set_policy(set(self.tids), getattr(os, "SCHED_OTHER", 0))
            self.tids.clear()


def as_float32(data: np.ndarray, dtype_name: str) -> np.ndarray:
    """Stored values as float32 (bfloat16 bit patterns widened), for statistics."""
    return widen(data, dtype_name == "bfloat16")


@dataclass
class UnitSource:
    """What the writer needs besides the slab: where windows come from, and a dedup store's row facts."""

    offsets: Callable[[int, int], np.ndarray]  # windows lo:hi -> start offsets
    sources: Callable[[int, int], np.ndarray]  # windows lo:hi -> (document, file, row, position)
    tag: int  # the store's tag for its commit records (``metadata.tag_of``)
    row_positions: np.ndarray | None = None  # dedup: position of each row's token
    row_weights: np.ndarray | None = None  # dedup: how many (window, position) pairs use each row


class SlabWriter:
    """Threads that write slabs into the store, at most ``max_pending`` slabs queued or in flight.

    Use as a context manager; ``add_batch`` routes a computed batch into the slabs of ``units``.
    """

    def __init__(
        self, location: Location, layout: Layout, source: UnitSource, units: list[int], workers: int,
        max_pending: int,
    ) -> None:  # fmt: skip
        self.location = location
        self.layout = layout
        self.source = source
        self.pending = set(units)
        self.open: dict[int, Slab] = {}
        self.arrays = layout.unit_arrays()
        self.encoders = {a.path: ChunkEncoder(a.codec) for a in self.arrays}
        self.record_encoder = ChunkEncoder("none")
        self.committed = next(a for a in layout.arrays() if a.path == "committed")
        # lossy precision: each vector site is rounded as it is encoded; its partial takes the error
        self.sites = {site_path(b, s): i for i, (b, s) in enumerate(layout.outputs())}
        self.partials = {site_path(b, s): stats_path(b, s, "partial") for b, s in layout.stat_outputs()}
        self.rounded = self.partials if layout.keep_bits is not None else {}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockcap-writer")
        self.background = _Background()
        self.slots = threading.BoundedSemaphore(max_pending)
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.committer = Committer(location, COMMITS_WAITING, self._failed)
        self.units_written = 0

    def __enter__(self) -> SlabWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slab(self, unit: int) -> Slab:
        """The open slab of ``unit``; a new one waits while too many are pending (or a writer failed)."""
        if unit not in self.open:
            while not self.slots.acquire(timeout=0.1):
                self.raise_error()
            self.raise_error()
            self.open[unit] = Slab(unit, *self.layout.unit_range(unit))
        return self.open[unit]

    def add_batch(self, lo: int, hi: int, tokens: torch.Tensor | None, outs: list[torch.Tensor]) -> int:
        """Route items ``lo:hi`` of a batch into the slabs of pending units; returns the items taken.

        Items of units that are not pending (already committed) are dropped: a batch keeps its
        fixed composition even when only some of its units are redone.
        """
        uw, taken, slabs = self.layout.unit_windows, 0, []
        for u in range(lo // uw, (hi - 1) // uw + 1):
            if u not in self.pending:
                continue
            slab = self._slab(u)
            a, z = max(lo, slab.lo) - lo, min(hi, slab.hi) - lo
            part = None if tokens is None else tokens[a:z]
            slab.put(a + lo - slab.lo, part, [o[a:z] for o in outs], whole_batch=z - a == hi - lo)
            slabs.append(slab)
            taken += z - a
        if outs and outs[0].is_cuda:  # the writer waits for the copies into pinned memory
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves Event.__new__ unannotated
            event.record()
            for slab in slabs:
                slab.event = event
        for slab in slabs:
            if slab.full:
                self.pool.submit(self._write, self.open.pop(slab.unit))
        return taken

    def _small(self, slab: Slab) -> dict[str, np.ndarray]:
        """The unit's token ids, window offsets and sources (not in a dedup store's units)."""
        if self.layout.dedup:
            return {}
        assert slab.tokens is not None  # a window schedule's batches carry their token ids
        tokens = slab.tokens.numpy().astype(self._dtype("tokens"), copy=False)
        small = {"tokens": tokens, "offsets": self.source.offsets(slab.lo, slab.hi)}
        if "sources" in self.encoders:
            small["sources"] = self.source.sources(slab.lo, slab.hi)
        return small

    def _site(self, slab: Slab, i: int) -> np.ndarray:
        """Site ``i`` of the unit as one array: a kept batch's outputs or the slab's buffer as they are,
        else its kept batches copied into the buffer (or this thread's assembly buffer)."""
        to_numpy = self.layout.dtype.to_numpy
        size = slab.hi - slab.lo
        if not slab.parts:
            return to_numpy(slab.sites[i])
        if not slab.sites and len(slab.parts) == 1:
            return to_numpy(slab.parts[0][1][i])
        first = to_numpy(slab.parts[0][1][i])
        out = to_numpy(slab.sites[i]) if slab.sites else _assembly((size, *first.shape[1:]), first.dtype)
        for row, outs in slab.parts:
            x = to_numpy(outs[i])
            out[row : row + x.shape[0]] = x
        return out

    def _partial(self, slab: Slab, x: np.ndarray) -> np.ndarray:
        """The statistics partial row of one site's data of ``slab``."""
        T, bf16 = self.layout.sample_len, self.layout.dtype_name == "bfloat16"
        if self.layout.dedup:
            assert self.source.row_positions is not None and self.source.row_weights is not None
            rows = slice(slab.lo, slab.hi)
            row = partial(x, self.source.row_positions[rows], T, self.source.row_weights[rows], bf16)
        else:
            row = partial(x.reshape(-1, x.shape[-1]), np.tile(np.arange(T), x.shape[0]), T, bfloat16=bf16)
        if self.rounded:
            row = np.append(row, 0.0)  # the unit's worst relative error, filled in as it is rounded
        return row[None]

    def _dtype(self, path: str) -> str:
        return next(a.dtype for a in self.arrays if a.path == path)

    def _encode(self, a: ArrayDef, data: np.ndarray, slab: Slab, piece: int) -> tuple[memoryview, int]:
        """(object, digest) of ``a``'s data of ``slab`` (its ``piece``-th along queries, padded as
        zarr pads an edge chunk), in this thread's scratch buffer."""
        enc = self.encoders[a.path]
        if a.pieces > 1:  # the encoder makes the slice contiguous; only a short last piece is padded
            q = a.chunks[2]
            data = pad_rows(data[:, :, piece * q : (piece + 1) * q], q, axis=2)
        if a.shards is not None:
            return enc.encode_shard(pad_rows(data, a.shards[0]), a.chunks[0], slab.hi - slab.lo)
        return enc.encode(pad_rows(data, a.chunks[0]))

    def _write(self, slab: Slab) -> None:
        try:
            self.background.claim()
            if slab.event is not None:
                slab.event.synchronize()
            data = self._small(slab)
            digests = []
            for a in self.arrays:  # sites come before their partials in the record's order
                if a.path in self.sites:
                    values = self._site(slab, self.sites[a.path])
                    if a.path in self.partials:
                        data[self.partials[a.path]] = self._partial(slab, values)
                    if a.path in self.rounded:
                        bits = self.layout.keep_bits
                        assert bits is not None  # else nothing is rounded
                        values, data[self.rounded[a.path]][0, -1] = round_bits(values, bits)
                else:
                    values = data[a.path]
                for piece, key in enumerate(object_keys(a, slab.unit)):
                    blob, value = self._encode(a, values, slab, piece)
                    self.location.put(key, blob)
                    digests.append(value)
            record = self.record_encoder.chunk(encode_record(slab.unit, self.source.tag, digests)[None])
            self.committer.submit(object_key(self.committed, slab.unit), bytes(record))
            del slab, data
            with self.lock:
                self.units_written += 1
                trim = self.units_written % TRIM_EVERY == 0
            if trim:
                _release_memory()
        except BaseException as e:
            self._failed(e)
        finally:
            self.slots.release()

    def _failed(self, e: BaseException) -> None:
        with self.lock:
            self.error = self.error or e

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for every submitted slab to be written (or to fail), then stop the threads."""
        self.pool.shutdown(wait=True)
        self.committer.close()
        self.background.release()
