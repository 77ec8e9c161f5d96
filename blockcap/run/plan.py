"""Planning a run: load what the spec names, check it all, and decide the layout and target.

Every check that needs a file happens here, before any store is touched (the spec's own checks
happen on construction). The result, a ``Plan``, is everything ``Job`` needs.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr

from blockcap.capture import Adapter, load_model
from blockcap.core.dims import ModelDims
from blockcap.core.encoding import storage_dtype
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import (
    OBJECT_TARGET,
    TARGET_CHUNK_BYTES,
    Layout,
    choose_chunk_windows,
    choose_query_chunk,
    choose_shard_chunks,
)
from blockcap.core.sites import ATTENTION
from blockcap.core.spec import CaptureSpec, RunOptions, resolve_blocks, resolve_sites
from blockcap.core.version import __version__
from blockcap.data.corpus import Corpus, corpus_windows, open_corpus
from blockcap.data.sources import characters, resolve_dataset
from blockcap.data.windows import Windows
from blockcap.run.device import free_memory, pick_device
from blockcap.run.dist import Group
from blockcap.run.schedule import DedupSchedule, WindowSchedule
from blockcap.storage.lifecycle import create_time_objects
from blockcap.storage.location import Location
from blockcap.storage.metadata import read_meta


@dataclass
class Plan:
    """Everything a run needs, checked: the resolved spec, model, schedule, layout and target."""

    spec: CaptureSpec  # resolved: blocks, chunking, hashes and device type concrete
    opts: RunOptions
    adapter: Adapter
    module: Callable[[torch.Tensor], Sequence[torch.Tensor]]  # the capture module, compiled with ``compile``
    schedule: WindowSchedule | DedupSchedule
    windows: Windows
    layout: Layout
    location: Location
    meta: dict[str, Any]  # a new store's metadata
    objects: dict[str, bytes]  # written when the store is created
    device: torch.device
    corpus: Corpus  # the dataset's inputs and token cache

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


def _recorded_query_chunk(location: Location, sample_len: int, overwrite: bool) -> tuple[bool, int | None]:
    """(found, value): the ``query_chunk`` a store already at ``location`` was written with (None:
    whole windows), so that the command that made it resumes it: a store of a blockcap before
    ``query_chunk``, or one moved between a local disk and object storage (whose targets differ),
    keeps its layout. Not found when there is no store there, it is being replaced, or its value
    is not one a capture of ``sample_len`` could have (``prepare`` then judges the store)."""
    if overwrite:
        return False, None
    try:
        params = read_meta(location).get("params")
    except BlockcapError:  # no store there, or not one: prepare() says so
        return False, None
    value = params.get("query_chunk") if isinstance(params, dict) else "?"
    if value is None or (type(value) is int and 1 <= value <= sample_len):
        return True, value
    return False, None


def make_plan(spec: CaptureSpec, opts: RunOptions, group: Group) -> Plan:
    """Load what the spec names and check it all; raises BlockcapError before any store is touched."""
    device = pick_device(spec.device)
    if device.type == "cuda" and group.active and spec.device in (None, "cuda"):
        device = torch.device("cuda", group.local_rank)
    dataset = resolve_dataset(spec.dataset, spec.dataset_sha256)
    adapter = load_model(spec, lambda: characters(dataset, spec.text_column))
    if spec.model_sha256 and spec.model_sha256 != adapter.model_sha256:
        raise BlockcapError(
            f"model_sha256={spec.model_sha256} does not match the model's weights ({adapter.model_sha256})"
        )
    dims = adapter.dims
    blocks = resolve_blocks(spec.block_idx, dims.n_layer)
    spec = replace(spec, sites=resolve_sites(spec.sites, adapter.absent_sites(blocks)))
    adapter.check_sites(spec.sites, blocks)
    if spec.sample_len > dims.context:
        raise BlockcapError(
            f"sample_len={spec.sample_len} is longer than the model's context of {dims.context} tokens; "
            f"use 1..{dims.context}"
        )
    corpus = open_corpus(
        dataset, adapter.tokenizer, spec.text_column, spec.dataset_sha256, opts.token_cache,
        opts.dataset_storage_options, progress=opts.progress and group.leader, build=group.local_rank == 0,
    )  # fmt: skip
    spec = replace(spec, separator=spec.separator or corpus.default_separator())
    windows = corpus_windows(corpus, spec, dims.vocab_size)
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
    if spec.shard_chunks is not None and spec.shard_chunks > n_chunks:
        raise BlockcapError(
            f"shard_chunks={spec.shard_chunks} is more chunks than the run has ({n_chunks}); "
            f"use 1..{n_chunks}"
        )
    out = opts.out or f"block{'_'.join(map(str, blocks))}_internals.zarr"
    location = Location(
        out, opts.storage_options, durable=opts.fsync
    ).resolved()  # named once: links resolved
    query = spec.query_chunk
    if query is None and ATTENTION in spec.sites:
        found, query = _recorded_query_chunk(location, spec.sample_len, opts.overwrite)
        if not found:
            target = TARGET_CHUNK_BYTES if location.local else OBJECT_TARGET
            query = choose_query_chunk(dims.n_head, spec.sample_len, itemsize, chunk, target)
    resolved = replace(
        spec, block_idx=blocks, chunk_windows=chunk, dataset_sha256=corpus.sha256,
        model_sha256=adapter.model_sha256, device=device.type, shard_chunks=spec.shard_chunks or 1,
        query_chunk=None if query is None or query >= spec.sample_len else query,
    )  # fmt: skip
    tok_record, tok_blob = adapter.tokenizer.record()
    build = (dims, len(windows), schedule.n_items if spec.dedup else None, len(tok_blob or b""))
    layout = Layout.build(resolved, *build)
    if spec.shard_chunks is None and not location.local:  # object storage: objects of a good size
        resolved = replace(resolved, shard_chunks=choose_shard_chunks(layout))
        layout = Layout.build(resolved, *build)
    location.check_parent()
    create_arrays: dict[str, np.ndarray] = {}
    if tok_blob:
        create_arrays["tokenizer"] = np.frombuffer(tok_blob, np.uint8)
    if spec.dedup:
        create_arrays["tokens"] = windows.get(0, len(windows)).numpy()
        create_arrays["offsets"] = windows.offsets(0, len(windows))
        create_arrays["sources"] = windows.sources(0, len(windows))
        assert isinstance(schedule, DedupSchedule)  # chosen by spec.dedup above
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
        "dataset": corpus.record(),
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
    capture = adapter.capture_module(blocks, spec.sites, spec.fused).to(device)
    module = torch.compile(capture, fullgraph=True) if spec.compile else capture
    return Plan(
        resolved, opts, adapter, module, schedule, windows, layout, location, meta,
        create_time_objects(layout, create_arrays), device, corpus,
    )  # fmt: skip
