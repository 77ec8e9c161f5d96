"""Background chunk writer: compresses and writes filled slabs while the next ones are computed.

A *slab* holds ``unit`` consecutive windows of every array (a whole number of chunks). The
compute loop fills a free slab, hands it over, and takes the next free one; with a fixed pool
of slabs, memory is bounded however large the dataset. Each slab's chunks are recorded as
committed only after all its arrays are written, so a crash never counts a chunk it lost.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from blockcap.codecs import StorageDtype
from blockcap.store import Layout, mark_committed, site_path, token_dtype


@dataclass
class Slab:
    """Host buffers for one unit of windows, reused from a pool."""

    tokens: np.ndarray  # (unit, T)
    offsets: np.ndarray  # (unit,)
    sites: list[torch.Tensor]  # one per layout.outputs(), storage dtype, pinned on CUDA
    event: torch.cuda.Event | None = None  # recorded after the device-to-host copies
    lo: int = 0
    hi: int = 0


class SlabWriter:
    """A pool of slabs and the threads that write them into the store's arrays."""

    def __init__(
        self, group: zarr.Group, layout: Layout, unit: int, workers: int = 2, pin: bool = False
    ) -> None:
        self.layout = layout
        self.dtype: StorageDtype = layout.dtype
        self.tokens = group["tokens"]
        self.offsets = group["offsets"]
        self.arrays = [group[site_path(b, s)] for b, s in layout.outputs()]
        self.group = group
        self.free: queue.Queue[Slab] = queue.Queue()
        for _ in range(workers + 1):
            self.free.put(self._new_slab(unit, pin))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockcap-writer")
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.windows_written = 0

    def _new_slab(self, unit: int, pin: bool) -> Slab:
        L = self.layout
        sites = [
            torch.empty((unit, *L.site_shape(s)[1:]), dtype=self.dtype.torch_dtype, pin_memory=pin)
            for _, s in L.outputs()
        ]
        return Slab(
            np.empty((unit, L.sample_len), token_dtype(L.vocab_size)), np.empty(unit, np.int64), sites
        )

    def take(self) -> Slab:
        """A free slab to fill; blocks while all are in flight, raises a writer's error."""
        while True:
            self.raise_error()
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue

    def submit(self, slab: Slab) -> None:
        """Write ``slab`` (windows ``slab.lo:slab.hi``) in the background."""
        self.pool.submit(self._write, slab)

    def _write(self, slab: Slab) -> None:
        try:
            if slab.event is not None:
                slab.event.synchronize()
            lo, hi, n = slab.lo, slab.hi, slab.hi - slab.lo
            self.tokens[lo:hi] = slab.tokens[:n]
            self.offsets[lo:hi] = slab.offsets[:n]
            for arr, buf in zip(self.arrays, slab.sites, strict=True):
                arr[lo:hi] = self.dtype.to_numpy(buf[:n])
            cw = self.layout.chunk_windows
            mark_committed(self.group, lo // cw, -(-hi // cw))
            with self.lock:
                self.windows_written += n
        except BaseException as e:
            with self.lock:
                self.error = self.error or e
        finally:
            self.free.put(slab)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for every submitted slab to be written (or to fail), then stop the threads."""
        self.pool.shutdown(wait=True)
