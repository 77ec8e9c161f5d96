"""What a run would produce, measured on its first batch: sizes, objects, time; and the free-space check.

The compression ratio and the speed come from running the first batch on this device and
encoding its items with the store's codec, so the estimate reflects the real model, data and
machine. Nothing is created.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from blockcap.core.errors import BlockcapError
from blockcap.core.layout import COMMIT, UNIT, site_path
from blockcap.core.sites import is_vector
from blockcap.run.plan import Plan
from blockcap.run.schedule import Batch
from blockcap.storage.codecs import ChunkEncoder
from blockcap.storage.metadata import render_metadata
from blockcap.storage.precision import round_bits


@dataclass(frozen=True)
class Estimate:
    n_windows: int
    tokens: int
    raw_bytes: int  # every captured array in its storage dtype
    stored_bytes: int  # expected after compression
    ratio: float  # raw / stored on the first batch
    objects: int  # files or objects the store will hold
    site_objects: int  # of which hold captured sites (a write unit's object of each)
    object_bytes: int  # expected stored bytes of the largest object (a write unit's widest site)
    seconds: float  # compute and encoding of every batch, from the first one
    batches: int
    first_batch: float  # seconds to read and compute the first batch


def _timed_batch(p: Plan) -> tuple[float, float, list[torch.Tensor], Batch]:
    """Seconds to read and compute the first batch, seconds for a batch (after one warm-up call),
    its outputs in storage dtype, the batch."""
    t_first = time.perf_counter()
    batch = p.schedule.batch(0)
    with torch.inference_mode():
        p.module(batch.ids.to(p.device))  # warm-up: lazy initialisation, compilation
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        t0 = time.perf_counter()
        first = t0 - t_first
        outs = list(p.module(batch.ids.to(p.device)))
        outs = [
            o.to(p.layout.dtype.torch_dtype).cpu() for o in (batch.select(outs) if batch.select else outs)
        ]
    return first, time.perf_counter() - t0, outs, batch


def estimate(p: Plan) -> Estimate:
    """Measure the first batch of plan ``p`` and extrapolate to the whole run."""
    first, seconds, outs, batch = _timed_batch(p)
    layout = p.layout
    arrays = {a.path: a for a in layout.arrays()}
    raw = stored = largest = 0
    t0 = time.perf_counter()
    for (b, s), out in zip(layout.outputs(), outs, strict=True):
        a = arrays[site_path(b, s)]
        data = layout.dtype.to_numpy(out)
        if layout.keep_bits is not None and is_vector(s):
            data = round_bits(data, layout.keep_bits)[0]
        ratio = len(ChunkEncoder(a.codec).chunk(data)) / max(1, data.nbytes)
        full = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        raw += full
        stored += int(full * ratio)
        largest = max(largest, int(full * ratio * min(1.0, layout.unit_windows / a.shape[0]) / a.pieces))
    encode_seconds = time.perf_counter() - t0
    n_batches = -(-p.schedule.n_items // max(1, batch.hi - batch.lo)) if batch.hi > batch.lo else 1
    objects = len(render_metadata(layout, {}))  # zarr.json documents of the groups and arrays
    for a in layout.arrays():
        per_object = a.shards[0] if a.shards else a.chunks[0]
        objects += layout.n_units * a.pieces if a.when in (UNIT, COMMIT) else -(-a.shape[0] // per_object)
    return Estimate(
        n_windows=layout.n_windows, tokens=layout.n_windows * layout.sample_len, raw_bytes=raw,
        stored_bytes=stored, ratio=raw / max(1, stored), objects=objects, object_bytes=largest,
        site_objects=layout.n_units * sum(arrays[site_path(b, s)].pieces for b, s in layout.outputs()),
        seconds=(seconds + encode_seconds) * n_batches, batches=n_batches, first_batch=first,
    )  # fmt: skip


def report_lines(p, e: Estimate) -> list[str]:
    layout, data = p.layout, e.site_objects
    lines = [
        f"dry run: {p.location} would hold {e.n_windows:,} windows x {layout.sample_len} tokens "
        f"({e.tokens:,} tokens)" + (f", {layout.n_rows:,} distinct prefix rows" if layout.dedup else ""),
        "  arrays:",
    ]
    corpus = p.corpus
    lines.insert(
        1,
        (
            f"  dataset: {corpus.cache.n_documents:,} documents, {corpus.cache.n_tokens:,} tokens, "
            f"{sum(f.size for f in corpus.files) / 1e6:,.1f} MB in {len(corpus.files):,} input files; "
            f"tokens {'read from' if corpus.reused else 'written to'} cache {corpus.cache.key} in "
            f"{corpus.seconds:,.1f} s"
        ),
    )
    stats = [a for a in layout.arrays() if "/stats/" in a.path]
    for a in layout.arrays():
        if a not in stats:
            lines.append(f"    {a.path:34} {str(a.shape):24} {a.dtype:8} chunks {a.chunks}")
    if stats:
        lines.append(f"    and {len(stats)} small statistics arrays (block*/stats/...)")
    lines += [
        f"  bytes: raw {e.raw_bytes / 1e6:,.1f} MB, expected stored {e.stored_bytes / 1e6:,.1f} MB "
        f"(ratio {e.ratio:.2f}x, {p.spec.codec} on the first batch)",
        f"  objects: {e.objects:,}; {layout.n_units:,} write unit{'s' * (layout.n_units > 1)} of "
        f"{layout.unit_windows:,} {'rows' if layout.dedup else 'windows'} with {data:,} site objects, "
        f"{e.stored_bytes / max(1, data) / 1e6:,.1f} MB on average, the largest "
        f"{e.object_bytes / 1e6:,.1f} MB",
        f"  time on {p.device}: about {e.seconds:,.1f} s for {e.batches:,} batches (measured on the first); "
        f"first batch after {corpus.seconds + e.first_batch:,.1f} s (tokens {corpus.seconds:,.1f} s)",
    ]
    return lines


def check_free_space(p, pending_units: int) -> None:
    """Refuse to start when a local target lacks the space the pending units need (unless ``force``)."""
    free = p.location.free_bytes()
    if free is None or p.opts.force or pending_units == 0:
        return
    share = pending_units / max(1, p.layout.n_units)
    upper = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in p.layout.arrays()) * share
    if upper <= free:  # even uncompressed it fits: no need to measure
        return
    need = estimate(p).stored_bytes * share
    if need > free:
        raise BlockcapError(
            f"out={p.location} needs about {_bytes(need)}, but its file system has {_bytes(free)} free; "
            f"free some space, choose another out=PATH, or pass force=True"
        )


def _bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps a digit before the point (``12.3 MB``)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} bytes"


@dataclass(frozen=True)
class DryRun:
    """The report of ``run(dry_run=True)``."""

    estimate: Estimate
    report: list[str]

    def lines(self) -> list[str]:
        return self.report


def dry_run(p) -> DryRun:
    e = estimate(p)
    return DryRun(e, report_lines(p, e))
