"""The main job: plan, open or create the store, capture every pending unit, finish.

``run(**kw)`` is the library entry point; ``python -m blockcap run`` is a thin shell over it.
The order is: spec (checks needing no file) -> plan (dataset, model, windows, layout: checks
needing files) -> store (create or resume, under the store's lock) -> capture -> finish.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from blockcap.core.errors import BlockcapError, Interrupted
from blockcap.core.layout import Layout
from blockcap.core.spec import split_kwargs
from blockcap.run.dist import Group, from_env
from blockcap.run.dryrun import DryRun, check_free_space, dry_run
from blockcap.run.plan import Plan, forward_bytes, make_plan
from blockcap.run.split import SplitTrial
from blockcap.storage.integrity import store_tag
from blockcap.storage.lifecycle import Prepared, finish, pending_units, prepare
from blockcap.storage.lock import exclusive
from blockcap.storage.metadata import open_location, spec_of
from blockcap.storage.writer import SlabWriter, UnitSource

PROGRESS_EVERY = 8  # batches between progress reductions across ranks


@dataclass
class Summary:
    """What a run did, for the CLI's closing lines and for callers."""

    path: str
    status: str  # complete / already complete / resumed and completed / part k/n done, ...
    n_windows: int
    windows_computed: int
    tokens: int
    raw_bytes: int
    stored_bytes: int
    seconds: float
    dedup: bool = False  # then windows_computed counts distinct prefixes

    def lines(self) -> list[str]:
        ratio = self.raw_bytes / max(1, self.stored_bytes)
        rate = self.windows_computed * self.tokens / max(1, self.n_windows) / max(1e-9, self.seconds)
        what = "distinct prefixes computed" if self.dedup else "computed"
        return [
            f"{self.status}: {self.path}",
            f"  windows {self.n_windows:,} ({self.windows_computed:,} {what} now), tokens {self.tokens:,}",
            f"  bytes raw {self.raw_bytes / 1e6:,.1f} MB, stored {self.stored_bytes / 1e6:,.1f} MB, "
            f"ratio {ratio:.2f}x",
            f"  time {self.seconds:.1f} s, {rate:,.0f} {'distinct-prefix ' if self.dedup else ''}tokens/s",
        ]


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt in the main thread, so both stop the same clean way."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def part_units(todo: list[int], run_length: int, worker: int, workers: int) -> list[int]:
    """This worker's share of ``todo``: interleaved runs of ``run_length`` units (units sharing a batch)."""
    return [u for u in todo if (u // run_length) % workers == worker]


def _capture(p: Plan, writer: SlabWriter, units: list[int], bar: tqdm, group: Group) -> tuple[int, dict]:
    """Compute the batches that cover ``units`` and hand their items to the writer. Returns items
    computed and the split of cores chosen (``blockcap.run.split``).

    Under torchrun every rank loops the same number of rounds so that the progress reductions
    (every ``PROGRESS_EVERY`` rounds) stay collective.
    """
    schedule, storage = p.schedule, p.layout.dtype.torch_dtype
    batches = schedule.batches_for(units, p.layout.unit_windows)
    rounds = group.max(len(batches))
    done, shown, computed, t0 = 0, 0, 0, time.perf_counter()
    per_unit = -(-p.layout.unit_windows // p.spec.batch_size)  # batches that fill one unit
    split = SplitTrial(p.device, len(batches), max(2, per_unit), writer.background)
    try:
        with torch.inference_mode():
            for r in range(rounds):
                if r < len(batches):
                    split.before(r)
                    batch = schedule.batch(batches[r])
                    outs = list(p.module(batch.ids.to(p.device, non_blocking=True)))
                    outs = [o.to(storage) for o in (batch.select(outs) if batch.select else outs)]
                    done += writer.add_batch(batch.lo, batch.hi, batch.tokens, outs)
                    computed += batch.hi - batch.lo
                    split.after(r, batch.hi - batch.lo)
                if not group.active or r % PROGRESS_EVERY == PROGRESS_EVERY - 1 or r == rounds - 1:
                    total = group.sum([done])[0]
                    bar.update(total - shown)
                    shown = total
                    rate = total * p.spec.sample_len / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            writer.close()
            writer.raise_error()
    finally:
        split.restore()
    return computed, split.record()


class Job:
    """One capture in phases: plan (on construction: every check, nothing written), ``open`` (create
    or resume the store, under its lock), ``capture`` (compute, write and commit every pending
    unit, then finish). ``run`` drives all three; benchmarks time ``capture`` alone.
    """

    def __init__(self, **kw: Any) -> None:
        self.t0 = time.perf_counter()
        spec, opts = split_kwargs(kw)
        self.stack = ExitStack()
        self.stack.enter_context(_sigterm_as_interrupt())  # stops unwind the same way everywhere
        self.group = from_env()
        self.stack.callback(self.group.close)
        try:
            self.plan = make_plan(spec, opts, self.group)
        except BaseException:
            self.close()
            raise
        self.prepared: Prepared | None = None

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stack.close()

    def open(self) -> Prepared:
        """Create the store or find the one to resume (rank 0 only; the other ranks wait for it)."""
        p, group = self.plan, self.group
        k, n_parts = p.opts.parts
        if group.active and n_parts > 1:
            raise BlockcapError(f"part={p.opts.part} and torchrun both split the work; use one of them")
        prepared: Prepared | BlockcapError | None = None
        if group.leader:
            self.stack.enter_context(exclusive(p.location, shared=n_parts > 1))
            try:
                check_free_space(p, _units_left(p))
                creation = exclusive(p.location.sibling(".create")) if n_parts > 1 else nullcontext()
                with creation:
                    prepared = _prepare(p, sole=n_parts == 1)
            except BlockcapError as e:
                prepared = e
        prepared = group.broadcast(prepared)
        if isinstance(prepared, BlockcapError):
            raise prepared
        self.prepared = prepared
        return prepared

    @property
    def slab_bytes(self) -> int:
        """Bytes of one write unit of every per-unit array, as the writer holds it."""
        return sum(
            int(np.prod(a.shards or a.chunks)) * np.dtype(a.dtype).itemsize
            for a in self.plan.layout.unit_arrays()
        )

    @property
    def slabs_in_flight(self) -> int:
        """Slabs the writer holds at most: being written, plus those one batch is filling."""
        return self.plan.opts.writers + self.plan.schedule.run_length(self.plan.layout.unit_windows)

    @property
    def batch_bytes(self) -> int:
        p = self.plan
        return forward_bytes(p.spec, p.adapter.dims, min(p.spec.batch_size, p.layout.n_windows))

    def summary(self, status: str, computed: int) -> Summary:
        p, layout = self.plan, self.plan.layout
        return Summary(
            str(p.location), status, layout.n_windows, computed, layout.n_windows * layout.sample_len,
            p.raw_bytes, sum(p.location.sizes().values()), time.perf_counter() - self.t0, layout.dedup,
        )  # fmt: skip

    def capture(self) -> Summary:
        """Compute, write and commit this process's pending units; finish the store when all are in."""
        p, group, prepared = self.plan, self.group, self.prepared
        if prepared.status == "complete":
            return self.summary("already complete", 0)
        layout, location = p.layout, p.location
        k, n_parts = p.opts.parts
        worker, workers = (group.rank, group.world) if group.active else (k, n_parts)
        run_length = p.schedule.run_length(layout.unit_windows)
        part = part_units(list(range(layout.n_units)), run_length, worker, workers)
        mine = part_units(prepared.todo, run_length, worker, workers)
        total = _items(layout, range(layout.n_units)) if group.active else _items(layout, part)
        todo_items = group.sum([_items(layout, mine)])[0]
        label = f"capture {location.name}" + (f" part {p.opts.part}" if n_parts > 1 else "")
        bar = tqdm(
            total=total, initial=total - todo_items, unit="row" if layout.dedup else "win", desc=label,
            disable=not p.opts.progress or not group.leader, dynamic_ncols=True,
        )  # fmt: skip
        source = UnitSource(
            offsets=p.windows.offsets,
            tag=store_tag(p.spec.identity()),
            row_positions=getattr(p.schedule, "row_position", None),
            row_weights=getattr(p.schedule, "row_weight", None),
        )
        writer = SlabWriter(location, layout, source, mine, p.opts.writers, self.slabs_in_flight)
        try:
            computed, split = _capture(p, writer, mine, bar, group)
            prepared.meta = {**prepared.meta, "split": split}  # provenance, written when finishing
        except KeyboardInterrupt:
            writer.close()
            raise Interrupted(
                f"interrupted: the store {location} is incomplete and every finished unit is committed; "
                f"to resume, re-run {p.opts.command or 'the same command'}"
            ) from None
        except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's failure
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            raise BlockcapError(
                f"out of memory at batch_size={p.spec.batch_size}; committed units of {location} are "
                f"kept, but a smaller batch_size changes the chunking: use it with another out=PATH or "
                f"overwrite=True"
            ) from None
        except OSError as e:
            raise BlockcapError(
                f"writing {location} failed ({e}); the store is incomplete and resumable: "
                f"fix the cause (e.g. free disk space) and re-run the same command"
            ) from None
        finally:
            writer.close()
            bar.close()
        if p.opts.verbose and group.active:
            print(f"rank {group.rank}: {computed:,} items computed in {time.perf_counter() - self.t0:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
        computed = group.sum([computed])[0]  # also the barrier: every rank has written its units
        status = _finish(p, prepared, n_parts) if group.leader else None
        return self.summary(group.broadcast(status), computed)


def run(**kw: Any) -> Summary | DryRun:
    """Capture block internals for every window of a dataset into a Zarr store.

    Keywords are the fields of ``CaptureSpec`` (what to capture) and ``RunOptions`` (how); see
    their help texts or ``python -m blockcap run --help``. Re-running with the same spec resumes
    an interrupted store, or leaves a complete one untouched. Every argument is checked before a
    store is created or changed.
    """
    with Job(**kw) as job:
        if job.plan.opts.dry_run:
            return dry_run(job.plan)
        job.open()
        return job.capture()


def _items(layout: Layout, units: Any) -> int:
    return sum(min(layout.unit_windows, layout.n_items - u * layout.unit_windows) for u in units)


def _units_left(p: Plan) -> int:
    """Units a run of ``p`` would compute, known without writing: all of them unless it resumes."""
    try:
        opened = open_location(p.location)
    except BlockcapError:
        return p.layout.n_units
    old = spec_of(opened.meta)
    if old is None or old.identity() != p.spec.identity():
        return p.layout.n_units
    return len(pending_units(opened)[0])


def _prepare(p: Plan, sole: bool) -> Prepared:
    try:
        return prepare(p.location, p.layout, p.spec, p.meta, p.objects, p.opts.overwrite, sole)
    except OSError as e:
        raise BlockcapError(
            f"creating {p.location} failed ({e}); fix the cause (e.g. free disk space) and re-run the "
            f"same command"
        ) from None


def _finish(p: Plan, prepared: Prepared, n_parts: int) -> str:
    """Mark the store complete when every unit is in; parts that are not the last only report."""
    if n_parts > 1:
        todo, _ = pending_units(open_location(p.location))
        if todo:
            return f"part {p.opts.part} done, {len(todo)} units left to other parts"
    try:
        finish(p.location, prepared.meta)
    except OSError as e:
        raise BlockcapError(f"finishing {p.location} failed ({e}); re-run the same command") from None
    return "resumed and completed" if prepared.status == "resumed" else "complete"
