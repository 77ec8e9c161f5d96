"""The main job: resolve the spec, open or create the store, capture every pending unit, finish.

``run(**kw)`` is the library entry point; ``python -m blockcap run`` is a thin shell over it.
The order is: spec (checks needing no file) -> plan (dataset, model, windows, layout: checks
needing files) -> store (create or resume, under the store's lock) -> capture -> finish.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
from tqdm import tqdm

from blockcap.capture import Adapter, load_model
from blockcap.core.dims import ModelDims
from blockcap.core.encoding import storage_dtype
from blockcap.core.errors import BlockcapError, Interrupted
from blockcap.core.layout import Layout, choose_chunk_windows
from blockcap.core.sites import ATTENTION
from blockcap.core.spec import CaptureSpec, RunOptions, resolve_blocks, split_kwargs
from blockcap.core.version import __version__
from blockcap.data.sources import dataset_sha256, read_text, resolve_dataset, token_stream
from blockcap.data.windows import Windows, split_tokens
from blockcap.run.device import free_memory, pick_device
from blockcap.run.dist import Group, from_env
from blockcap.run.dryrun import DryRun, check_free_space, dry_run
from blockcap.run.schedule import DedupSchedule, WindowSchedule
from blockcap.storage.integrity import store_tag
from blockcap.storage.location import Location
from blockcap.storage.store import (
    Prepared,
    create_time_objects,
    exclusive,
    finish,
    open_location,
    pending_units,
    prepare,
    spec_of,
)
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


@dataclass
class Plan:
    """Everything a run needs, checked: the resolved spec, model, schedule, layout and target."""

    spec: CaptureSpec  # resolved: blocks, chunking, hashes and device type concrete
    opts: RunOptions
    adapter: Adapter
    module: torch.nn.Module
    schedule: WindowSchedule | DedupSchedule
    windows: Windows
    layout: Layout
    location: Location
    meta: dict[str, Any]  # a new store's metadata
    objects: dict[str, bytes]  # written when the store is created
    device: torch.device

    @property
    def raw_bytes(self) -> int:
        """Bytes of every captured array as float32, for the compression ratio."""
        return sum(int(np.prod(self.layout.site_shape(s))) * 4 for _, s in self.layout.outputs())


def _bytes_per_item(spec: CaptureSpec, adapter: Adapter, itemsize: int) -> int:
    """Bytes of one item (a window, or a row of a dedup store) of the largest captured array."""
    T, dims = spec.sample_len, adapter.dims
    sizes = [
        dims.n_head * T * T if s == ATTENTION else dims.width(s) * (1 if spec.dedup else T)
        for s in spec.sites
    ]
    return max(sizes) * itemsize


def forward_bytes(spec: CaptureSpec, dims: ModelDims, windows: int = 1) -> int:
    """A rough upper bound of one forward pass's tensors for ``windows`` windows (float32)."""
    T, itemsize = spec.sample_len, 4
    per_window = itemsize * T * (12 * dims.d_model + 2 * dims.d_mlp + 3 * dims.n_head * T)
    per_window += itemsize * T * sum(dims.n_head * T if s == ATTENTION else dims.width(s) for s in spec.sites)
    return per_window * windows


def _check_batch_memory(spec: CaptureSpec, dims: ModelDims, n_windows: int, device: torch.device) -> None:
    """Refuse a batch that cannot fit in memory."""
    per_window = forward_bytes(spec, dims)
    windows = min(spec.batch_size, n_windows)
    free = free_memory(device)
    if windows * per_window > free:
        raise BlockcapError(
            f"batch_size={spec.batch_size} needs about {windows * per_window / 1e9:,.1f} GB for one forward "
            f"pass, more than the {free / 1e9:,.1f} GB free on {device}; "
            f"use batch_size={max(1, free // per_window)} or less"
        )


def make_plan(spec: CaptureSpec, opts: RunOptions, group: Group) -> Plan:
    """Load what the spec names and check it all; raises BlockcapError before any store is touched."""
    device = pick_device(spec.device)
    if device.type == "cuda" and group.active and spec.device in (None, "cuda"):
        device = torch.device("cuda", group.local_rank)
    data_path = resolve_dataset(spec.dataset, spec.dataset_sha256)
    adapter = load_model(spec, lambda: read_text(data_path, spec.text_column))
    if spec.model_sha256 and spec.model_sha256 != adapter.model_sha256:
        raise BlockcapError(
            f"model_sha256={spec.model_sha256} does not match the model's weights ({adapter.model_sha256})"
        )
    dims = adapter.dims
    blocks = resolve_blocks(spec.block_idx, dims.n_layer)
    adapter.check_sites(spec.sites, blocks)
    if spec.sample_len > dims.context:
        raise BlockcapError(
            f"sample_len={spec.sample_len} is longer than the model's context of {dims.context} tokens; "
            f"use 1..{dims.context}"
        )
    stream = token_stream(data_path, adapter.tokenizer, spec.text_column)
    if int(stream.max()) >= dims.vocab_size:
        raise BlockcapError(
            f"the tokenizer gives ids up to {int(stream.max())} but the model's embedding has "
            f"{dims.vocab_size} rows; the tokenizer does not belong to this model"
        )
    windows = Windows(split_tokens(stream, spec.split), spec.sample_len, spec.stride)
    if len(windows) == 0:
        raise BlockcapError(
            f"the {spec.split} split of {data_path} has {len(windows.tokens)} tokens, fewer than one "
            f"window (sample_len={spec.sample_len}); use a smaller sample_len or a longer dataset"
        )
    _check_batch_memory(spec, dims, len(windows), device)
    schedule = (
        DedupSchedule(windows, spec.batch_size) if spec.dedup else WindowSchedule(windows, spec.batch_size)
    )
    cw, bs = spec.chunk_windows, spec.batch_size
    if cw and not spec.dedup and bs < len(windows) and cw % bs and bs % cw:
        raise BlockcapError(  # else a chunk would straddle batches and a resume could change bits
            f"chunk_windows={cw} must be a multiple or a divisor of batch_size={bs}"
        )
    itemsize = storage_dtype(spec.dtype).zarr_dtype.itemsize
    chunk = spec.chunk_windows or (
        choose_chunk_windows(1, _bytes_per_item(spec, adapter, itemsize), schedule.n_items)
        if spec.dedup
        else choose_chunk_windows(spec.batch_size, _bytes_per_item(spec, adapter, itemsize), schedule.n_items)
    )
    n_chunks = -(-schedule.n_items // chunk)
    if spec.shard_chunks > n_chunks:
        raise BlockcapError(
            f"shard_chunks={spec.shard_chunks} is more chunks than the run has ({n_chunks}); "
            f"use 1..{n_chunks}"
        )
    resolved = replace(
        spec, block_idx=blocks, chunk_windows=chunk, dataset_sha256=dataset_sha256(data_path),
        model_sha256=adapter.model_sha256, device=device.type,
    )  # fmt: skip
    tok_record, tok_blob = adapter.tokenizer.record()
    layout = Layout.build(
        resolved, dims, len(windows), schedule.n_items if spec.dedup else None, len(tok_blob or b"")
    )
    location = Location(opts.out or f"block{'_'.join(map(str, blocks))}_internals.zarr", opts.storage_options)
    location.check_parent()
    create_arrays: dict[str, np.ndarray] = {}
    if tok_blob:
        create_arrays["tokenizer"] = np.frombuffer(tok_blob, np.uint8)
    if spec.dedup:
        create_arrays["tokens"] = windows.get(0, len(windows)).numpy()
        create_arrays["offsets"] = windows.offsets(0, len(windows))
        create_arrays["prefix_rows"] = schedule.prefix_rows
    meta = {
        "run_id": uuid.uuid4().hex[:12],
        "params": resolved.to_params(),
        "dims": dims.to_dict(),
        "n_windows": len(windows),
        **({"n_rows": schedule.n_items} if spec.dedup else {}),
        "tokenizer_bytes": layout.tokenizer_bytes,
        "tokenizer": tok_record,
        "model": adapter.provenance,
        "dataset": {"name": data_path.name, "path": str(data_path.absolute()), "tokens": int(stream.size)},
        "versions": {
            "blockcap": __version__,
            "torch": str(torch.__version__),
            "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__,
        },  # fmt: skip
        "device": str(device),
        "command": opts.command or "",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    adapter.to(device, getattr(torch, spec.model_dtype))
    module = adapter.capture_module(blocks, spec.sites, spec.fused).to(device)
    if spec.compile:
        module = torch.compile(module, fullgraph=True)
    return Plan(
        resolved, opts, adapter, module, schedule, windows, layout, location, meta,
        create_time_objects(layout, create_arrays), device,
    )  # fmt: skip


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


def _my_units(todo: list[int], run_length: int, worker: int, workers: int) -> list[int]:
    """This worker's share of ``todo``: interleaved runs of ``run_length`` units (units sharing a batch)."""
    return [u for u in todo if (u // run_length) % workers == worker]


def _capture(p: Plan, writer: SlabWriter, units: list[int], bar: tqdm, group: Group) -> int:
    """Compute the batches that cover ``units`` and hand their items to the writer. Returns items computed.

    Under torchrun every rank loops the same number of rounds so that the progress reductions
    (every ``PROGRESS_EVERY`` rounds) stay collective.
    """
    schedule, storage = p.schedule, p.layout.dtype.torch_dtype
    batches = schedule.batches_for(units, p.layout.unit_windows)
    rounds = group.max(len(batches))
    done, shown, computed, t0 = 0, 0, 0, time.perf_counter()
    with torch.inference_mode():
        for r in range(rounds):
            if r < len(batches):
                batch = schedule.batch(batches[r])
                outs = list(p.module(batch.ids.to(p.device, non_blocking=True)))
                outs = [o.to(storage) for o in (batch.select(outs) if batch.select else outs)]
                done += writer.add_batch(batch.lo, batch.hi, batch.tokens, outs)
                computed += batch.hi - batch.lo
            if not group.active or r % PROGRESS_EVERY == PROGRESS_EVERY - 1 or r == rounds - 1:
                total = group.sum([done])[0]
                bar.update(total - shown)
                shown = total
                rate = total * p.spec.sample_len / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        writer.close()
        writer.raise_error()
    return computed


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
        prepared = group.share(prepared)
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
        share = _my_units(list(range(layout.n_units)), run_length, worker, workers)
        mine = _my_units(prepared.todo, run_length, worker, workers)
        total = _items(layout, range(layout.n_units)) if group.active else _items(layout, share)
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
            computed = _capture(p, writer, mine, bar, group)
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
        return self.summary(group.share(status), computed)


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
