"""The main job: validate, load, open or create the store, capture every pending chunk, finish.

``run()`` is the library entry point; ``python -m blockcap run`` is a thin shell over it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
from tqdm import tqdm

from blockcap import __version__
from blockcap.capture import CaptureModule
from blockcap.checkpoint import BUNDLED, load_checkpoint
from blockcap.codecs import DEFAULT_CODEC, DEFAULT_DTYPE, compressors, storage_dtype
from blockcap.data import (
    SPLITS,
    TRAIN_FRACTION,
    CharTokenizer,
    Windows,
    read_text,
    resolve_dataset,
    sha256_file,
    split_tokens,
)
from blockcap.device import pick_device
from blockcap.errors import BlockcapError
from blockcap.store import (
    COMPLETE,
    DEFAULT_SITES,
    SITES,
    VECTOR_SITES,
    Layout,
    aside_path,
    choose_chunk_windows,
    create,
    is_blockcap_store,
    meta,
    open_group,
    read_committed,
    remove_partial_files,
    set_aside,
    stored_bytes,
    update_meta,
)
from blockcap.writer import SlabWriter

DEFAULT_SITES_ARG = ",".join(DEFAULT_SITES)


class Interrupted(BlockcapError):
    """The run was stopped by SIGINT/SIGTERM; the store is consistent and resumable."""


@dataclass
class Summary:
    """What a run did, for the CLI's closing lines and for callers."""

    path: Path
    status: str  # complete / already complete / resumed and completed / part k/n done, ...
    n_windows: int
    windows_computed: int
    tokens: int
    raw_bytes: int
    stored_bytes: int
    seconds: float

    def lines(self) -> list[str]:
        ratio = self.raw_bytes / max(1, self.stored_bytes)
        rate = self.windows_computed * self.tokens / max(1, self.n_windows) / max(1e-9, self.seconds)
        return [
            f"{self.status}: {self.path}",
            f"  windows {self.n_windows:,} ({self.windows_computed:,} computed now), tokens {self.tokens:,}",
            f"  bytes raw {self.raw_bytes / 1e6:,.1f} MB, stored {self.stored_bytes / 1e6:,.1f} MB, "
            f"ratio {ratio:.2f}x",
            f"  time {self.seconds:.1f} s, {rate:,.0f} tokens/s",
        ]


def parse_blocks(block_idx: Any, n_layer: int) -> tuple[int, ...]:
    """``block_idx`` as sorted unique ints: an int, a list/tuple of ints, "0,2" or "all"."""
    if isinstance(block_idx, str):
        if block_idx.strip() == "all":
            return tuple(range(n_layer))
        parts: list[Any] = [p.strip() for p in block_idx.split(",") if p.strip()]
    elif isinstance(block_idx, (list, tuple)):
        parts = list(block_idx)
    else:
        parts = [block_idx]
    blocks = []
    for p in parts:
        value = p
        if isinstance(p, str):
            try:
                value = int(p)
            except ValueError:
                value = p
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_layer:
            raise BlockcapError(
                f"block_idx={p!r} is not a block of this model; "
                f"use an integer in 0..{n_layer - 1}, a list, or all"
            )
        blocks.append(value)
    if not blocks:
        raise BlockcapError(f"block_idx={block_idx!r} names no block; use an integer in 0..{n_layer - 1}")
    return tuple(sorted(set(blocks)))


def parse_sites(sites: Any) -> tuple[str, ...]:
    """Site names in canonical order; "all" is every vector site (attention is opt-in)."""
    names = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else list(sites or ())
    names = [n for n in names if n]
    if "all" in names:
        names = [n for n in names if n != "all"] + list(VECTOR_SITES)
    bad = [n for n in names if n not in SITES]
    if bad or not names:
        raise BlockcapError(
            f"sites={sites!r} {'has unknown ' + repr(bad[0]) if bad else 'is empty'}; "
            f"use a comma list of {', '.join(SITES)} or all"
        )
    return tuple(s for s in SITES if s in names)


def _positive(name: str, value: Any, upper: int | None = None) -> int:
    hi = f"..{upper}" if upper else " or more"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper and value > upper):
        raise BlockcapError(f"{name}={value!r} is out of range; use an integer 1{hi}")
    return value


def _chunking(chunk_windows: int | None, batch_size: int, bytes_per_window: int, n_windows: int) -> int:
    if chunk_windows is None:
        return choose_chunk_windows(batch_size, bytes_per_window, n_windows)
    _positive("chunk_windows", chunk_windows)
    if chunk_windows % batch_size and batch_size % chunk_windows:
        raise BlockcapError(
            f"chunk_windows={chunk_windows} must be a multiple or a divisor of batch_size={batch_size}"
        )
    return chunk_windows


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


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


def _open_or_create(
    out: Path, layout: Layout, params: dict, attrs: dict, overwrite: bool, sole: bool
) -> tuple[zarr.Group, np.ndarray | None]:
    """(group, committed-chunk mask), or (group, None) for a new store or a complete one.

    A store replaced with ``overwrite`` is moved aside, not deleted, until the new one completes.
    ``sole``: no other process writes this store, so temp files left by a crash can be removed.
    """
    if out.exists() and not out.is_dir():
        raise BlockcapError(f"out={str(out)!r} is a file; pass a directory path for the store with --out")
    if out.exists():
        if is_blockcap_store(out):
            group = open_group(out, mode="r+")
            old = meta(group).get("params", {})
            if old == params:
                if meta(group).get("state") == COMPLETE:
                    return group, None
                if sole:
                    remove_partial_files(out)
                return group, read_committed(group)
            if not overwrite:
                diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in params.items() if old.get(k) != v)
                raise BlockcapError(
                    f"store {out} holds a capture with other parameters ({diff}); "
                    f"use another --out, or --overwrite to replace it"
                )
            set_aside(out)
        elif any(out.iterdir()):
            raise BlockcapError(
                f"out={str(out)!r} exists and is not a blockcap store; "
                f"refusing to touch it, choose another --out"
            )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise BlockcapError(
            f"out={str(out)!r}: directory {parent} does not exist; create it or choose another --out"
        )
    if not os.access(parent, os.W_OK):
        raise BlockcapError(f"out={str(out)!r}: directory {parent} is not writable; choose another --out")
    return create(out, layout, {**attrs, "params": params}), None


@dataclass
class Plan:
    """Everything a run needs, checked: model, windows, layout and the store's parameters."""

    module: CaptureModule
    windows: Windows
    layout: Layout
    params: dict[str, Any]
    attrs: dict[str, Any]
    out: Path
    device: torch.device
    batch_size: int


def plan(
    *,
    block_idx: Any,
    weights: str | None,
    dataset: str | None,
    dataset_sha256: str | None,
    out: str | None,
    sites: Any,
    sample_len: int,
    stride: int,
    batch_size: int,
    split: str,
    dtype: str,
    codec: str,
    device: str | None,
    compile: bool,
    fused: bool,
    chunk_windows: int | None,
    shard_chunks: int,
    command: str | None,
) -> Plan:
    """Check every argument and load what they name; raises BlockcapError before touching a store."""
    # Checks that need no files come first, so a typo fails at once.
    sites_t = parse_sites(sites)
    _positive("stride", stride)
    _positive("batch_size", batch_size)
    if split not in SPLITS:
        raise BlockcapError(f"split={split!r} is unknown; use one of {', '.join(SPLITS)}")
    sdtype = storage_dtype(dtype)
    compressors(codec)
    if not isinstance(sample_len, int) or isinstance(sample_len, bool):
        raise BlockcapError(f"sample_len={sample_len!r} is not an integer; use 1..block_size")
    dev = pick_device(device)

    loaded = load_checkpoint(weights)
    cfg = loaded.model.config
    blocks = parse_blocks(block_idx, cfg.n_layer)
    _positive("sample_len", sample_len, cfg.block_size)

    if isinstance(dataset_sha256, int):  # fire reads an all-digit hash as a number
        dataset_sha256 = f"{dataset_sha256:064d}"
    data_path = resolve_dataset(dataset, sha256=dataset_sha256)
    text = read_text(data_path)
    tok = CharTokenizer(loaded.vocab) if loaded.vocab is not None else CharTokenizer.from_text(text)
    if loaded.vocab is None and len(tok) != cfg.vocab_size:
        raise BlockcapError(
            f"dataset {data_path} has {len(tok)} distinct characters but weights {loaded.path} "
            f"expect {cfg.vocab_size}; use the dataset the weights were trained on"
        )
    tok.check_covers(text, f"dataset {data_path}")
    stream = split_tokens(tok.encode_tensor(text), split)
    windows = Windows(stream, sample_len, stride)
    if len(windows) == 0:
        raise BlockcapError(
            f"the {split} split of {data_path} has {len(stream)} tokens, fewer than one window "
            f"(sample_len={sample_len}); use a smaller --sample_len or a longer dataset"
        )
    layout = Layout(
        n_windows=len(windows),
        sample_len=sample_len,
        n_embed=cfg.n_embed,
        n_head=cfg.n_head,
        vocab_size=cfg.vocab_size,
        blocks=blocks,
        sites=sites_t,
        dtype=sdtype,
        codec=codec,
        chunk_windows=_chunking(
            chunk_windows, batch_size, sample_len * cfg.n_embed * sdtype.zarr_dtype.itemsize, len(windows)
        ),
        shard_chunks=_positive("shard_chunks", shard_chunks),
    )
    params = {
        "weights_sha256": loaded.sha256,
        "dataset_sha256": sha256_file(data_path),
        "split": split,
        "train_fraction": TRAIN_FRACTION,
        "sample_len": sample_len,
        "stride": stride,
        "batch_size": batch_size,
        "blocks": blocks,
        "sites": sites_t,
        "dtype": dtype,
        "codec": codec,
        "fused": fused,
        "compile": compile,
        "device_type": dev.type,
        "n_windows": len(windows),
        "chunk_windows": layout.chunk_windows,
        "shard_chunks": layout.shard_chunks,
    }
    attrs = {
        "blockcap_version": __version__,
        "torch_version": str(torch.__version__),
        "zarr_version": zarr.__version__,
        "numcodecs_version": numcodecs.__version__,
        "model_config": cfg.to_dict(),
        "weights_path": "bundled" if weights in (None, BUNDLED) else str(loaded.path),
        "weights_meta": loaded.meta,
        "vocab": tok.vocab,
        "dataset_name": data_path.name,
        "dataset_path": str(data_path.absolute()),
        "device": str(dev),
        "command": command or "",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    module = CaptureModule(loaded.model, blocks, sites_t, fused=fused).to(dev)
    if compile:
        module = torch.compile(module, fullgraph=True)
    return Plan(
        module=module,
        windows=windows,
        layout=layout,
        params=_json(params),
        attrs=_json(attrs),
        out=Path(out or f"block{'_'.join(map(str, blocks))}_internals.zarr"),
        device=dev,
        batch_size=batch_size,
    )


def parse_part(part: Any) -> tuple[int, int]:
    """``"k/n"`` as (k, n) with 0 <= k < n: this process's share of a multi-process capture."""
    try:
        k, n = (int(x) for x in str(part).split("/"))
        if 0 <= k < n:
            return k, n
    except ValueError:
        pass
    raise BlockcapError(f"part={part!r} is not k/n with 0 <= k < n; use e.g. --part=0/2 and --part=1/2")


@contextmanager
def _store_lock(out: Path, shared: bool) -> Iterator[None]:
    """Serialise store creation between processes capturing parts of one store."""
    if not shared:
        yield
        return
    with open(out.absolute().parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _batches_covering(units: list[int], unit_windows: int, batch_size: int, n: int) -> list[int]:
    """Indices of the batches whose windows overlap ``units`` (batches start at multiples of batch_size)."""
    out: set[int] = set()
    for u in units:
        first, last = u * unit_windows, min((u + 1) * unit_windows, n) - 1
        out.update(range(first // batch_size, last // batch_size + 1))
    return sorted(out)


def _capture(p: Plan, writer: SlabWriter, units: list[int], bar: tqdm) -> int:
    """Compute the batches that cover ``units``; hand each unit to the writer once it is whole.

    A unit is a chunk, or a shard of chunks. Batches keep their fixed composition (a resumed
    chunk is computed exactly as before); a batch's windows in units that are already committed
    are computed but not written again.
    """
    n, bs, uw = p.layout.n_windows, p.batch_size, p.layout.unit_windows
    pending, open_slabs = set(units), {}
    to_storage, cuda = p.layout.dtype.torch_dtype, p.device.type == "cuda"
    computed, t0 = 0, time.perf_counter()
    with _sigterm_as_interrupt(), torch.inference_mode():
        for b in _batches_covering(units, uw, bs, n):
            lo, hi = b * bs, min((b + 1) * bs, n)
            idx = p.windows.get(lo, hi)
            outs = [o.to(to_storage) for o in p.module(idx.to(p.device, non_blocking=True))]
            slabs = []
            for u in range(lo // uw, (hi - 1) // uw + 1):
                if u in pending:
                    slab = open_slabs.get(u) or open_slabs.setdefault(u, writer.new_slab(u))
                    a, z = max(lo, slab.lo) - lo, min(hi, slab.hi) - lo
                    slab.put(a + lo - slab.lo, idx[a:z], [o[a:z] for o in outs])  # async on CUDA
                    slabs.append(slab)
                    bar.update(z - a)
            if cuda:  # the writer waits for the copies into pinned memory before reading them
                event = torch.cuda.Event()
                event.record()
                for slab in slabs:
                    slab.event = event
            for slab in slabs:
                if slab.full:
                    writer.submit(open_slabs.pop(slab.unit))
            computed += hi - lo
            tokens_per_s = computed * p.layout.sample_len / (time.perf_counter() - t0)
            bar.set_postfix_str(f"{tokens_per_s:,.0f} tok/s", refresh=False)
        writer.close()
        writer.raise_error()
    return computed


def run(
    block_idx: Any = 0,
    weights: str | None = None,
    dataset: str | None = None,
    dataset_sha256: str | None = None,
    out: str | None = None,
    sites: Any = DEFAULT_SITES_ARG,
    sample_len: int = 3,
    stride: int = 96,
    batch_size: int = 64,
    split: str = "val",
    dtype: str = DEFAULT_DTYPE,
    codec: str = DEFAULT_CODEC,
    device: str | None = None,
    compile: bool = False,
    fused: bool = False,
    overwrite: bool = False,
    writers: int = 2,
    chunk_windows: int | None = None,
    shard_chunks: int = 1,
    part: str = "0/1",
    progress: bool = True,
    command: str | None = None,
) -> Summary:
    """Capture block internals for every window of a dataset into a Zarr store.

    Re-running with the same arguments resumes an interrupted store, or leaves a complete one
    untouched. Every argument is checked before a store is created or changed.

    Args:
      block_idx: block to capture: an int, a list (0,2) or all.
      weights: blockcap checkpoint or original state dict (default: the bundled model).
      dataset: text file (default: $BLOCKCAP_DATASET, else TinyShakespeare, downloaded once).
      dataset_sha256: refuse a dataset file whose sha256 differs.
      out: store path (default: block{b}_internals.zarr).
      sites: comma list of block_input, heads_output, proj_output, resid_mid, ffwd_output,
        block_output, attention; or all (every site but attention).
      sample_len: tokens per window (1..block_size).
      stride: tokens between window starts.
      batch_size: windows per forward pass.
      split: val, train or all.
      dtype: float32 (exact), float16 or bfloat16 storage.
      codec: blosc-lz4, blosc-zstd, zstd or none, optionally name:level.
      device: cpu, cuda or cuda:N (default: cuda when available).
      compile: torch.compile the capture module.
      fused: one q/k/v matmul and SDPA (faster; within a tested tolerance, not bitwise).
      overwrite: replace a store captured with other parameters.
      writers: background writer threads.
      chunk_windows: windows per chunk, a multiple or divisor of batch_size (default: ~4 MB chunks).
      shard_chunks: store this many chunks per file (Zarr v3 sharding), for object storage or
        very large runs; a shard is then the unit of writing and of resume.
      part: k/n: capture only the k-th of n interleaved shares of the chunks, so n processes
        (e.g. one per GPU) fill one store together; the last to finish marks it complete.
      progress: show a progress bar.
      command: the command line to show in the resume hint.
    """
    t0 = time.perf_counter()
    _positive("writers", writers)
    k, n_parts = parse_part(part)
    p = plan(
        block_idx=block_idx, weights=weights, dataset=dataset, dataset_sha256=dataset_sha256, out=out,
        sites=sites, sample_len=sample_len, stride=stride, batch_size=batch_size, split=split, dtype=dtype,
        codec=codec, device=device, compile=compile, fused=fused, chunk_windows=chunk_windows,
        shard_chunks=shard_chunks, command=command,
    )  # fmt: skip
    layout, n_windows = p.layout, p.layout.n_windows
    with _store_lock(p.out, n_parts > 1):
        group, committed = _open_or_create(p.out, layout, p.params, p.attrs, overwrite, sole=n_parts == 1)
    raw = sum(torch.Size(layout.site_shape(s)).numel() * 4 for _, s in layout.outputs())

    def summary(status: str, computed: int) -> Summary:
        return Summary(
            p.out, status, n_windows, computed, n_windows * sample_len, raw, stored_bytes(p.out),
            time.perf_counter() - t0,
        )  # fmt: skip

    if meta(group).get("state") == COMPLETE:
        return summary("already complete", 0)
    uw, per_unit = layout.unit_windows, layout.shard_chunks
    # Parts take interleaved runs of units, each run as long as a batch (or one unit).
    run_len = max(1, batch_size // uw)
    share = [u for u in range(layout.n_units) if (u // run_len) % n_parts == k]
    units = [u for u in share if committed is None or not committed[u * per_unit : (u + 1) * per_unit].all()]
    in_flight = writers + run_len  # slabs being filled + slabs being written
    writer = SlabWriter(group, layout, p.windows, workers=writers, max_pending=in_flight)
    mine = sum(min(uw, n_windows - u * uw) for u in share)
    todo = sum(min(uw, n_windows - u * uw) for u in units)
    label = f"capture {p.out.name}" + (f" part {part}" if n_parts > 1 else "")
    bar = tqdm(
        total=mine, initial=mine - todo, unit="win", desc=label, disable=not progress, dynamic_ncols=True
    )
    try:
        computed = _capture(p, writer, units, bar)
    except KeyboardInterrupt:
        writer.close()
        done = int(read_committed(group).sum())
        raise Interrupted(
            f"interrupted: {done} of {layout.n_chunks} chunks of {p.out} are committed, the store is "
            f"incomplete; to resume, re-run {command or 'the same command'}"
        ) from None
    except torch.OutOfMemoryError:
        raise BlockcapError(
            f"out of memory at batch_size={batch_size}; committed chunks of {p.out} are kept, but a "
            f"smaller --batch_size changes the chunking: use it with another --out or --overwrite"
        ) from None
    except OSError as e:
        raise BlockcapError(
            f"writing {p.out} failed ({e}); the store is incomplete and resumable: "
            f"fix the cause (e.g. free disk space) and re-run the same command"
        ) from None
    finally:
        writer.close()
        bar.close()
    if not read_committed(group).all():
        if n_parts > 1:
            return summary(f"part {part} done, store waiting for other parts", computed)
        raise BlockcapError(f"store {p.out} has uncommitted chunks after the run; re-run the same command")
    update_meta(group, state=COMPLETE, finished=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    shutil.rmtree(aside_path(p.out), ignore_errors=True)
    return summary("resumed and completed" if committed is not None else COMPLETE, computed)


def default_command() -> str:
    """The command line that started this process, for the resume hint."""
    return " ".join(["python -m blockcap", *sys.argv[1:]])
