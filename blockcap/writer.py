"""Background chunk writer: encodes and writes finished chunks while the next batches compute.

A *slab* is one chunk of windows of every array: views of a batch's outputs when the chunk lies
in one batch on the CPU, else a buffer (pinned on CUDA) that batches copy their rows into.
Worker threads write each array's chunk and only then set the chunk's ``committed`` flag, so a
crash never counts a chunk whose bytes are missing. A semaphore bounds the slabs in flight,
and with them memory.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import zarr

from blockcap.data import Windows
from blockcap.store import Layout, mark_committed, site_path


@dataclass
class Slab:
    """One write unit (windows ``lo:hi``) of tokens and of every captured array."""

    unit: int
    lo: int
    hi: int
    tokens: torch.Tensor | None = None  # (n, T)
    sites: list[torch.Tensor] = field(default_factory=list)  # per layout.outputs(), storage dtype
    event: torch.cuda.Event | None = None  # recorded after the device-to-host copies
    filled: int = 0

    @property
    def full(self) -> bool:
        return self.filled == self.hi - self.lo

    def put(self, row: int, tokens: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """Add rows ``row:row+n`` of the chunk from a batch (``outs`` already in storage dtype)."""
        n = tokens.shape[0]
        if n == self.hi - self.lo and not outs[0].is_cuda:  # the whole chunk: keep views
            self.tokens, self.sites = tokens, outs
        else:
            if self.tokens is None:
                size = self.hi - self.lo
                self.tokens = torch.empty((size, *tokens.shape[1:]), dtype=tokens.dtype)
                self.sites = [
                    torch.empty((size, *o.shape[1:]), dtype=o.dtype, pin_memory=o.is_cuda) for o in outs
                ]
            self.tokens[row : row + n] = tokens
            for buf, o in zip(self.sites, outs, strict=True):
                buf[row : row + n].copy_(o, non_blocking=True)
        self.filled += n


def _set_policy(tids: set[int], policy: int) -> None:
    for tid in tids:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(tid, policy, os.sched_param(0))


class _Background:
    """Python helper threads (ours, zarr's event loop and codec threads) at idle CPU priority.

    On a machine whose cores torch keeps busy, encoding then runs in the gaps instead of
    preempting torch's worker threads, whose barriers stall whenever one of them is descheduled.
    With spare cores (a GPU run) idle priority costs nothing. Restored when the run ends.
    """

    def __init__(self) -> None:
        self.tids: set[int] = set()
        self.lock = threading.Lock()

    NAMES = ("blockcap-writer", "zarr_", "asyncio_")  # ours, zarr's loop, its executor threads

    def claim(self) -> None:
        with self.lock:
            mine = {t.native_id for t in threading.enumerate() if t.name.startswith(self.NAMES)}
            new = mine - {None} - self.tids
            _set_policy(new, getattr(os, "SCHED_IDLE", 0))
            self.tids |= new

    def release(self) -> None:
        with self.lock:
            _set_policy(self.tids, getattr(os, "SCHED_OTHER", 0))
            self.tids.clear()


class SlabWriter:
    """Threads that write slabs into the store, at most ``max_pending`` slabs queued or in flight."""

    def __init__(
        self, group: zarr.Group, layout: Layout, windows: Windows, workers: int, max_pending: int
    ) -> None:
        self.layout = layout
        self.windows = windows
        self.group = group
        self.tokens = group["tokens"]
        self.offsets = group["offsets"]
        self.arrays = [group[site_path(b, s)] for b, s in layout.outputs()]
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockcap-writer")
        self.background = _Background()
        self.slots = threading.BoundedSemaphore(max_pending)
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def new_slab(self, unit: int) -> Slab:
        """An empty slab for write unit ``unit`` (a chunk or a shard); blocks while too many are
        pending, raises a writer's error."""
        while not self.slots.acquire(timeout=0.1):
            self.raise_error()
        self.raise_error()
        uw = self.layout.unit_windows
        return Slab(unit, unit * uw, min((unit + 1) * uw, self.layout.n_windows))

    def submit(self, slab: Slab) -> None:
        self.pool.submit(self._write, slab)

    def _write(self, slab: Slab) -> None:
        try:
            self.background.claim()
            if slab.event is not None:
                slab.event.synchronize()
            lo, hi = slab.lo, slab.hi
            self.tokens[lo:hi] = slab.tokens.numpy().astype(self.tokens.dtype, copy=False)
            self.offsets[lo:hi] = self.windows.offsets(lo, hi).numpy()
            for arr, buf in zip(self.arrays, slab.sites, strict=True):
                arr[lo:hi] = self.layout.dtype.to_numpy(buf)
            cw = self.layout.chunk_windows
            mark_committed(self.group, lo // cw, -(-hi // cw))
        except BaseException as e:
            with self.lock:
                self.error = self.error or e
        finally:
            self.slots.release()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for every submitted slab to be written (or to fail), then stop the threads."""
        self.pool.shutdown(wait=True)
        self.background.release()
