"""The main job: plan, open or create the store, capture every pending unit, finish.

``run(**kw)`` is the library entry point; ``python -m blockcap run`` is a thin shell over it.
The order is: spec (checks needing no file) -> plan (dataset, model, windows, layout: checks
needing files) -> store (create or resume, under the store's lock) -> capture -> finish.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from blockcap.core.errors import BlockcapError, Interrupted
from blockcap.core.layout import Layout
from blockcap.core.spec import CaptureSpec, RunOptions, identity_differences, split_kwargs
from blockcap.run.dist import DEFAULT_STALL_SECONDS, Group, JobError, from_env
from blockcap.run.dryrun import DryRun, check_free_space, dry_run
from blockcap.run.plan import Plan, forward_bytes, make_plan
from blockcap.run.split import SplitTrial
from blockcap.storage.lifecycle import Prepared, finish, pending_units, planned, prepare
from blockcap.storage.location import WRITE_HOOKS, Location
from blockcap.storage.lock import exclusive, held_by
from blockcap.storage.metadata import open_location, read_meta, spec_of, tag_of
from blockcap.storage.stops import stop_signals
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
        self.stack = ExitStack()
        self.stack.enter_context(stop_signals())  # stops unwind the same way everywhere
        spec: CaptureSpec | None = None
        opts: RunOptions | None = None
        error: BlockcapError | None = None
        try:
            spec, opts = split_kwargs(kw)
        except BlockcapError as e:  # under torchrun, said once for the job (every rank's is checked)
            error = e
        try:
            self.group = from_env(opts.stall_timeout if opts else DEFAULT_STALL_SECONDS)
            self.stack.callback(self.group.close)
            if spec is not None and opts is not None:  # the arguments were understood
                try:
                    self.plan = make_plan(spec, opts, self.group)
                except BlockcapError as e:
                    error = e
            self.group.agree(error)
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
        """Create the store or find the one to resume (rank 0 only; the other ranks wait for it).

        Under torchrun the ranks first agree on what they capture and where (else every rank
        stops before a write), and then each checks that the store it names is the one rank 0
        locked and opened.
        """
        p, group = self.plan, self.group
        k, n_parts = p.opts.parts
        if group.active and n_parts > 1:
            raise JobError(f"part={p.opts.part} and torchrun both split the work; use one of them")
        _check_agreement(group, p)
        outcome: tuple[Prepared, str] | BlockcapError | None = None
        if group.leader:
            try:
                token = self.stack.enter_context(exclusive(p.location, shared=n_parts > 1))
                check_free_space(p, _units_left(p))
                creation = exclusive(p.location.sibling(".create")) if n_parts > 1 else nullcontext()
                with creation:
                    outcome = (_prepare(p, sole=n_parts == 1), token)
            except BlockcapError as e:
                outcome = e
        outcome = group.broadcast(outcome)
        if isinstance(outcome, BlockcapError):
            raise JobError(str(outcome)) if group.active else outcome
        prepared, token = outcome
        if group.active:
            group.agree(None if group.leader else _same_store(p.location, token, prepared))
        self.prepared = prepared
        return prepared

    @property
    def slab_bytes(self) -> int:
        """Bytes of one write unit of every per-unit array, as the writer holds it."""
        return sum(
            int(np.prod(a.shards or a.chunks)) * np.dtype(a.dtype).itemsize * a.pieces
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
        assert prepared is not None, "Job.open() comes before Job.capture()"
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
            sources=p.windows.sources,
            tag=prepared.tag,
            row_positions=getattr(p.schedule, "row_position", None),
            row_weights=getattr(p.schedule, "row_weight", None),
        )
        writer = SlabWriter(location, layout, source, mine, p.opts.writers, self.slabs_in_flight)
        group.phase = "capture"  # from here the watchdog expects progress: a batch or a write
        WRITE_HOOKS.append(group.progress)
        try:
            computed, split = _capture(p, writer, mine, bar, group)
            prepared.meta = {**prepared.meta, "split": split}  # provenance, written when finishing
        except BlockcapError as e:
            group.announce_failure(str(e))
            raise
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
            WRITE_HOOKS.remove(group.progress)
            group.phase = "finish"
        if p.opts.verbose and group.active:
            print(f"rank {group.rank}: {computed:,} items computed in {time.perf_counter() - self.t0:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
        computed = group.sum([computed])[0]  # also the barrier: every rank has written its units
        status: str | BlockcapError | None = None
        if group.leader:
            try:
                status = _finish(p, prepared, n_parts)
            except BlockcapError as e:
                status = e
        status = group.broadcast(status)
        if isinstance(status, BlockcapError):
            raise JobError(str(status)) if group.active else status
        return self.summary(status, computed)


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


# what every rank must agree on before anything is written, and how to name a difference
FACTS = {"target": "the target store", "capture": "what to capture", "tag": "the store's contents (model, "
         "dataset, windows or tokenizer)", "part": "part"}  # fmt: skip


def _check_agreement(group: Group, p: Plan) -> None:
    """Every rank resolves the same target, spec, dataset, model and layout, or every rank stops."""
    if not group.active:
        return
    target = str(p.location.root) if p.location.local else p.location.url  # absolute, links resolved
    facts = {"target": target, "capture": p.spec.identity(),
             "tag": tag_of(planned(p.meta, p.objects), p.layout), "part": p.opts.part}  # fmt: skip
    every = group.gather(facts)
    for rank, theirs in enumerate(every):
        for name, value in theirs.items():
            ours = every[0][name]
            if value == ours:
                continue
            if name == "capture":
                detail = ", ".join(identity_differences(ours, value))
            else:
                detail = f"{ours} vs {value}"
            raise JobError(
                f"rank {rank} disagrees with rank 0 on {FACTS[name]} ({detail}); every rank must run the "
                f"same command on the same inputs and store (an absolute path on a file system every node "
                f"shares, or a URL); nothing was written"
            )


def _same_store(location: Location, token: str, prepared: Prepared) -> BlockcapError | None:
    """On a rank other than 0: why the store it names is not the one rank 0 locked and opened."""
    if not held_by(location, token):
        return BlockcapError(
            f"no lock of rank 0 beside {location} here: the path does not name the same store on every "
            f"node (use a file system every node shares, or a URL); nothing was written"
        )
    try:
        run_id = read_meta(location).get("run_id")
    except BlockcapError as e:
        return BlockcapError(f"cannot read the store rank 0 opened ({e})")
    if run_id != prepared.meta.get("run_id"):
        return BlockcapError(f"another store than rank 0 opened is at {location} here; nothing was written")
    return None


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
