"""A store's lifecycle: metadata, opening, creating, resuming, finishing, setting aside, locking.

States (the ``state`` field of the root ``blockcap`` attribute)::

    creating -> incomplete -> complete

* Creation writes the root document first (state ``creating``, with the spec), then every array's
  metadata, then the objects known up front, then the root again as ``incomplete``. A kill at any
  point leaves a store that the same command recognises and finishes creating; a reader sees
  "being created". Nothing else ever writes a store's root before it is ours.
* Units are written and committed by the writer (``blockcap.writer``, ``blockcap.integrity``).
* Finishing merges the statistics, writes them, then the root as ``complete``, then removes the
  store this run replaced. Each step is idempotent, so a kill while finishing is finished by the
  next run (or by ``finalize``).
* ``overwrite`` never deletes the last complete copy: a complete store is renamed (local) or
  copied (object storage) to ``<out>.replaced``, marked with the run that replaced it, and deleted
  only once that run completes. blockcap deletes only stores it recognises as its own.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.storage import MemoryStore

from blockcap.core.dims import ModelDims
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import (
    CREATE,
    FORMAT,
    FORMAT_VERSION,
    STATS_FINAL,
    Layout,
    object_key,
    pad_rows,
    stats_path,
)
from blockcap.core.spec import CaptureSpec
from blockcap.storage.codecs import ChunkEncoder, compressors, digest
from blockcap.storage.integrity import (
    CHECKSUM_FAILS,
    COMMITTED,
    DAMAGED,
    CheckedStore,
    CommitIndex,
    DamagedError,
    store_tag,
)
from blockcap.storage.location import PARTIAL, Location, _wrote
from blockcap.storage.stats import Stats, merge

ATTR = "blockcap"
CREATING, INCOMPLETE, COMPLETE = "creating", "incomplete", "complete"
ASIDE = ".replaced"
ROOT = "zarr.json"
_WRITE_CONFIG = {"write_empty_chunks": True}


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --- metadata documents ---------------------------------------------------------------------------
def render_metadata(layout: Layout | None, meta: dict[str, Any]) -> dict[str, bytes]:
    """Every ``zarr.json`` of a store (root and arrays), as zarr itself writes them.

    Rendered into memory and written by the caller through ``Location.put``, in an order of its
    choosing; ``layout`` None renders the root document alone.
    """
    docs: dict[str, Any] = {}
    group = zarr.open_group(MemoryStore(docs), mode="w", zarr_format=3, attributes={ATTR: meta})
    for a in layout.arrays() if layout is not None else []:
        group.create_array(
            a.path, shape=a.shape, chunks=a.chunks, shards=a.shards, dtype=a.dtype,
            compressors=compressors(a.codec), fill_value=0, dimension_names=a.dims,
            attributes=a.attrs, config=_WRITE_CONFIG,
        )  # fmt: skip
    return {k: v.to_bytes() for k, v in docs.items() if k.endswith(ROOT)}


def read_meta(location: Location) -> dict[str, Any]:
    """The root ``blockcap`` attribute, with one-line errors for everything that is not a store."""
    if location.is_file():
        raise BlockcapError(f"store {location} is a file, not a Zarr store directory")
    raw = location.get(ROOT)
    if raw is None:
        files = location.keys() + [str(p) for p in location.partial_files()]
        raw = location.get(ROOT)  # it may have been renamed into place while we listed
    if raw is None:
        if location.local and location.root.is_dir() and not files:
            raise BlockcapError(f"{location} is an empty directory, not a blockcap store")
        if not files:
            raise BlockcapError(f"store {location} does not exist; capture one with blockcap's run")
        if all(f.endswith(PARTIAL) for f in files):
            raise BlockcapError(f"store {location} is being created; try again in a moment")
        raise BlockcapError(f"{location} is not a Zarr v3 store (no zarr.json); pass a blockcap store")
    try:
        doc = json.loads(raw)
        meta = doc["attributes"][ATTR] if isinstance(doc, dict) else None
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, KeyError) and isinstance(doc, dict):
            raise BlockcapError(
                f"{location} is a Zarr group but not a blockcap store (no '{ATTR}' attribute)"
            ) from None
        raise BlockcapError(f"{location}: its metadata document zarr.json is damaged ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BlockcapError(f"{location} is a Zarr group but not a blockcap store (no '{ATTR}' attribute)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BlockcapError(
            f"{location}: its metadata document zarr.json is damaged (format_version {version!r})"
        )
    if version > FORMAT_VERSION:
        raise BlockcapError(
            f"{location} has store format {version}, newer than this blockcap's {FORMAT_VERSION}; "
            f"upgrade blockcap"
        )
    return meta


def put_root(location: Location, meta: dict[str, Any]) -> None:
    location.put(ROOT, render_metadata(None, meta)[ROOT])


def layout_of(meta: dict[str, Any]) -> Layout:
    """The layout a store's metadata describes."""
    try:
        if meta["format_version"] == 1:
            return _layout_v1(meta)
        spec = CaptureSpec.from_params(meta["params"])
        return Layout.build(spec, ModelDims(**meta["dims"]), meta["n_windows"], meta.get("n_rows"),
                            meta.get("tokenizer_bytes", 0))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise BlockcapError(
            f"the store's metadata is incomplete or damaged ({type(e).__name__}: {e})"
        ) from None


def _layout_v1(meta: dict[str, Any]) -> Layout:
    """Format 1 (blockcap 0.1): char GPT, uint8 flags per chunk, no statistics."""
    p, cfg = meta["params"], meta["model_config"]
    dims = ModelDims(
        n_layer=cfg["n_layer"], d_model=cfg["n_embed"], n_head=cfg["n_head"],
        head_dim=cfg["n_embed"] // cfg["n_head"], d_mlp=4 * cfg["n_embed"], vocab_size=cfg["vocab_size"],
        context=cfg["block_size"],
    )  # fmt: skip
    return Layout(
        n_windows=p["n_windows"], sample_len=p["sample_len"], blocks=tuple(p["blocks"]),
        sites=tuple(p["sites"]), dims=dims, dtype_name=p["dtype"], codec=p["codec"],
        chunk_windows=p["chunk_windows"], shard_chunks=p.get("shard_chunks", 1),
    )  # fmt: skip


def spec_of(meta: dict[str, Any]) -> CaptureSpec | None:
    """The spec a format-2 store recorded (None for format 1, which predates specs)."""
    return CaptureSpec.from_params(meta["params"]) if meta["format_version"] >= 2 else None


# --- opening for reading ----------------------------------------------------------------------------
@dataclass
class Opened:
    """A store opened for reading: metadata, layout, commit records and zarr access checked by them."""

    location: Location
    meta: dict[str, Any]
    layout: Layout
    index: CommitIndex
    group: zarr.Group
    arrays: dict[str, zarr.Array] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return self.meta.get("state", "")

    def array(self, path: str) -> zarr.Array:
        """An array by path (opened once), with a one-line error when its metadata is missing or damaged."""
        if path in self.arrays:
            return self.arrays[path]
        try:
            arr = self.group[path]
        except Exception as e:  # zarr raises KeyError, FileNotFoundError or JSON errors here
            raise DamagedError(
                f"array {path}: its metadata document is missing or damaged ({type(e).__name__})"
            ) from None
        if not isinstance(arr, zarr.Array):
            raise DamagedError(f"array {path}: its metadata document is missing or damaged (found a group)")
        self.arrays[path] = arr
        return arr


def unit_objects(layout: Layout, version: int) -> list[str]:
    """The arrays whose objects a commit record of this format covers, in its order."""
    if version == 1:
        return ["tokens", "offsets", *(f"block{b}/{s}" for b, s in layout.outputs())]
    return [a.path for a in layout.unit_arrays()]


def open_location(location: Location, allow_creating: bool = False) -> Opened:
    """Open a store for reading; "being created" is an error unless ``allow_creating``."""
    meta = read_meta(location)
    if meta.get("state") == CREATING and not allow_creating:
        raise BlockcapError(f"store {location} is being created; try again in a moment")
    layout = layout_of(meta)
    spec = spec_of(meta)
    index = CommitIndex(
        location, layout, meta["format_version"], unit_objects(layout, meta["format_version"]),
        tag=store_tag(spec.identity()) if spec else 0,
        digests=meta.get("digests", {}) if meta.get("state") != CREATING else {},
        complete=meta.get("state") == COMPLETE,
    )  # fmt: skip
    try:
        group = zarr.open_group(
            CheckedStore(location.zarr_store(read_only=True), index), mode="r", zarr_format=3
        )
    except Exception as e:
        raise BlockcapError(f"{location} is not a readable Zarr v3 group ({type(e).__name__}: {e})") from None
    return Opened(location, meta, layout, index, group)


# --- writing ------------------------------------------------------------------------------------------
def create(
    location: Location, layout: Layout, meta: dict[str, Any], objects: dict[str, bytes]
) -> dict[str, Any]:
    """Create (or finish creating) a store: root first, then arrays, then ``objects``, then ``incomplete``.

    Every step rewrites whole documents with the same content, so it is safe to repeat after a
    kill at any point. Returns the metadata as written.
    """
    digests = {key: digest(blob) for key, blob in objects.items()}
    meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "state": CREATING, "digests": digests}
    docs = render_metadata(layout, meta)
    location.put_first(ROOT, docs.pop(ROOT))
    location.put_many({**docs, **objects})
    meta["state"] = INCOMPLETE
    put_root(location, meta)
    return meta


def create_time_objects(layout: Layout, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The objects of the arrays written at creation (tokenizer, a dedup store's window index)."""
    out = {}
    for a in layout.arrays():
        if a.when != CREATE or a.path not in arrays:
            continue
        data = arrays[a.path]
        enc = ChunkEncoder(a.codec)
        rows = a.chunks[0]
        for c in range(-(-a.shape[0] // rows)):
            out[object_key(a, c)] = enc.chunk(pad_rows(data[c * rows : (c + 1) * rows], rows).astype(a.dtype))
    return out


def damaged_metadata(location: Location, layout: Layout, meta: dict[str, Any]) -> dict[str, bytes]:
    """Array metadata documents that are missing, unreadable or say something else than at creation."""
    bad = {}
    for key, doc in render_metadata(layout, meta).items():
        if key == ROOT:
            continue
        raw = location.get(key)
        try:
            same = raw is not None and json.loads(raw) == json.loads(doc)
        except ValueError:
            same = False
        if not same:
            bad[key] = doc
    return bad


def repair_metadata(location: Location, layout: Layout, meta: dict[str, Any]) -> int:
    """Rewrite the damaged array metadata documents; returns how many."""
    bad = damaged_metadata(location, layout, meta)
    for key, doc in bad.items():
        location.put(key, doc)
    return len(bad)


def missing_objects(location: Location, layout: Layout, units: list[int]) -> set[int]:
    """Which of ``units`` lack an object of some per-unit array (one listing per array)."""
    bad = set()
    for a in layout.unit_arrays():
        present = set(location.keys(f"{a.path}/c"))
        bad |= {u for u in units if object_key(a, u) not in present}
    return bad


def intact(location: Location, layout: Layout, meta: dict[str, Any]) -> bool:
    """Whether a complete store still has every object it had: metadata, units with their commit
    records, and the objects recorded in its root (one listing per array; contents are verify's)."""
    units = list(range(layout.n_units))
    records = set(location.keys("committed/c"))
    digested = meta.get("digests", {})
    paths = {key.rpartition("/c/")[0] for key in digested}
    present = {k for path in paths for k in location.keys(f"{path}/c")}
    return (
        not damaged_metadata(location, layout, meta)
        and not missing_objects(location, layout, units)
        and all(f"committed/c/{u}/0" in records for u in units)
        and all(key in present for key in digested)
    )


def pending_units(opened: Opened) -> tuple[list[int], list[int]]:
    """(units to compute, committed units whose data is gone): everything not whole and committed."""
    records = opened.index.load_all()
    committed = [u for u, r in records.items() if r.status == COMMITTED]
    lost = sorted(missing_objects(opened.location, opened.layout, committed))
    todo = sorted(set(records) - set(committed) | set(lost))
    return todo, lost


def final_stats(opened: Opened) -> dict[tuple[int, str], Stats]:
    """Merge the per-unit statistics partials of every output (all units must be committed)."""
    layout, out = opened.layout, {}
    for b, site in layout.stat_outputs():
        partials = np.asarray(opened.array(stats_path(b, site, "partial"))[:])
        out[(b, site)] = merge(list(partials), layout.dims.width(site), layout.sample_len)
    return out


def finish(location: Location, meta: dict[str, Any]) -> dict[str, Any]:
    """Mark a store complete once every unit is committed and whole; idempotent.

    Writes the merged statistics, then the root as ``complete``, then removes the store this
    run replaced (if any). Raises BlockcapError naming what is missing otherwise.
    """
    if meta.get("state") == COMPLETE:
        discard_aside(location, meta["run_id"])
        return meta
    opened = open_location(location)
    todo, lost = pending_units(opened)
    if todo:
        what = f"{len(lost)} committed units have missing data, " if lost else ""
        raise BlockcapError(
            f"store {location} is not finished: {what}{len(todo)} of {opened.layout.n_units} units "
            f"still to capture (first: unit {todo[0]}); re-run the capture to finish it"
        )
    arrays = {a.path: a for a in opened.layout.arrays()}
    written = {}
    for (b, site), st in final_stats(opened).items():
        for name in STATS_FINAL:
            a = arrays[stats_path(b, site, name)]
            blob = ChunkEncoder(a.codec).chunk(np.asarray(getattr(st, name), dtype="<f8"))
            location.put(object_key(a, 0), blob)
            written[object_key(a, 0)] = digest(blob)
    meta = {**meta, "state": COMPLETE, "finished": now(), "digests": {**meta.get("digests", {}), **written}}
    put_root(location, meta)
    discard_aside(location, meta["run_id"])
    return meta


# --- replacing and discarding ------------------------------------------------------------------------
def aside_of(location: Location) -> Location:
    return location.sibling(ASIDE)


def _ours(location: Location) -> dict[str, Any] | None:
    """The store's metadata if ``location`` holds a blockcap store, else None."""
    try:
        return read_meta(location)
    except BlockcapError:
        return None


def discard(location: Location) -> None:
    """Delete a store blockcap wrote (callers have checked that it is one)."""
    location.remove_tree()


def discard_aside(location: Location, run_id: str) -> None:
    """Delete ``<out>.replaced`` if the run ``run_id`` set it aside (it is then a finished replacement)."""
    aside = aside_of(location)
    meta = _ours(aside)
    if meta is not None and meta.get("replaced_by") == run_id:
        discard(aside)


def set_aside(location: Location, meta: dict[str, Any], run_id: str) -> None:
    """Keep the complete store at ``location`` as ``<out>.replaced`` until run ``run_id`` completes.

    Any older set-aside store is deleted first (the store being set aside is newer and complete).
    Local stores are renamed; object stores are copied (root last, so a partial copy is never
    mistaken for a store) and then deleted.
    """
    aside = aside_of(location)
    check_aside_is_ours(location)
    if not aside.is_empty():
        discard(aside)
    marked = {**meta, "replaced_by": run_id}
    put_root(location, marked)  # marked while still in place: a kill here leaves it usable
    if location.local:
        location.rename_to(aside)
        return
    location.copy_to(aside, [k for k in location.keys() if k != ROOT])  # noqa: SIM118 - a listing
    put_root(aside, marked)  # the root last: a partial copy is never taken for a store
    discard(location)


def restamp_aside(location: Location, run_id: str) -> None:
    """Hand the set-aside store to run ``run_id`` (which now replaces it) so it completes the job."""
    aside = aside_of(location)
    meta = _ours(aside)
    if meta is not None and meta.get("replaced_by") != run_id:
        put_root(aside, {**meta, "replaced_by": run_id})


def check_aside_is_ours(location: Location) -> None:
    aside = aside_of(location)
    if aside.is_file() or (not aside.is_empty() and (_ours(aside) or {}).get("replaced_by") is None):
        raise BlockcapError(
            f"{aside} is in the way and was not set aside by blockcap; move it, or choose another out=PATH"
        )


# --- one writer per store ------------------------------------------------------------------------------
class StoreInUse(BlockcapError):
    """Another process is writing the store."""


@contextmanager
def exclusive(
    location: Location, shared: bool = False, hint: str = "wait for it to finish, or choose another out=PATH"
) -> Iterator[None]:
    """Hold the store's lock for a run: exclusive, or ``shared`` among ``part`` processes.

    A POSIX advisory lock on ``.<name>.lock`` beside a local store: the kernel drops it when the
    process dies, so a killed run never blocks a later one, and the file is removed after a
    successful run. Object stores have no lock (see docs/design.md).
    """
    if not location.local:
        yield
        return
    real = location.root.resolve()  # one lock for the store, whatever symlink names it
    path = real.parent / f".{real.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BlockcapError(
                f"cannot create the lock file {path} ({e.strerror}); choose another out=PATH"
            ) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreInUse(f"store {location} is in use by {holder}; {hint}") from None
        if _same_file(fd, path):  # not unlinked by a finishing holder between open and lock
            break
        os.close(fd)
    os.ftruncate(fd, 0)  # parts share the lock: the line names the latest of them
    os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}".encode(), 0)
    _wrote("lock", str(path))
    try:
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder removes the file
            if _same_file(fd, path):
                path.unlink()
                _wrote("unlock", str(path))
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def _same_file(fd: int, path: Any) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


# --- opening a store for a capture ---------------------------------------------------------------------
@dataclass
class Prepared:
    """A store ready to capture into: its metadata and the units still to compute."""

    meta: dict[str, Any]
    todo: list[int]
    status: str  # "new", "resumed" or "complete"


def prepare(
    location: Location, layout: Layout, spec: CaptureSpec, meta: dict[str, Any], objects: dict[str, bytes],
    overwrite: bool, sole: bool,
) -> Prepared:  # fmt: skip
    """Create the store, or find the one the same spec already started, per the lifecycle above.

    ``sole``: no other process writes the store now, so temporary files left by a kill can go.
    """
    if sole:  # what a kill left beside the store or beside its set-aside copy
        for trash in location.stale_trash() + aside_of(location).stale_trash():
            Location(str(trash)).remove_tree()
    location.check_parent()
    if not location.is_empty():
        try:
            old = read_meta(location)
        except BlockcapError as e:
            if sole and _lost_root_of(location, layout, spec):
                new = create(location, layout, meta, objects)  # the data stays; every unit is checked
                return Prepared(new, pending_units(open_location(location))[0], "resumed")
            reason = str(e) if "damaged" in str(e) else f"{location} exists and is not a blockcap store"
            raise BlockcapError(f"{reason}; refusing to touch it; choose another out=PATH") from None
        old_spec = spec_of(old)
        if old_spec is not None and old_spec.identity() == spec.identity():
            return _continue(location, layout, old, meta, objects, sole, overwrite)
        if not overwrite:
            if old_spec is None:
                raise BlockcapError(
                    f"store {location} was written by an older blockcap (format 1); "
                    f"capture into another out=PATH, or replace it with overwrite=True"
                )
            raise BlockcapError(
                f"store {location} holds a capture with other parameters "
                f"({', '.join(spec.differences(old_spec))}); use another out=PATH, "
                f"or overwrite=True to replace it"
            )
        if old.get("state") == COMPLETE:
            set_aside(location, old, meta["run_id"])
        else:  # ours and never completed: nothing finished is lost
            check_aside_is_ours(location)
            discard(location)
    if overwrite:  # this run now replaces whatever an earlier overwrite set aside
        check_aside_is_ours(location)
        restamp_aside(location, meta["run_id"])
    return Prepared(create(location, layout, meta, objects), list(range(layout.n_units)), "new")


def _lost_root_of(location: Location, layout: Layout, spec: CaptureSpec) -> bool:
    """Whether ``location`` is a store of ``spec`` whose root document was lost or damaged: a commit
    record carries ``spec``'s tag (a digest of its identity), and every other readable one does too."""
    objects = unit_objects(layout, FORMAT_VERSION)
    index = CommitIndex(location, layout, FORMAT_VERSION, objects, tag=store_tag(spec.identity()))
    records = index.load_all().values()
    return any(r.status == COMMITTED for r in records) and all(
        r.status != DAMAGED or r.reason == CHECKSUM_FAILS for r in records
    )


def _continue(
    location: Location, layout: Layout, old: dict[str, Any], meta: dict[str, Any], objects: dict[str, bytes],
    sole: bool, overwrite: bool,
) -> Prepared:  # fmt: skip
    """Resume the store this spec started: finish creating it, or list the units left."""
    keep = {k: old[k] for k in ("run_id", "started") if k in old}
    if old.get("state") == COMPLETE:
        if intact(location, layout, old):
            discard_aside(location, old["run_id"])
            return Prepared(old, [], "complete")
        old = {**old, "state": INCOMPLETE}  # data went missing: repair it like an interrupted run
        put_root(location, old)
    if overwrite:
        check_aside_is_ours(location)
        restamp_aside(location, old["run_id"])
    if sole:
        location.remove_partial_files()
    if old.get("state") == CREATING:
        new = create(location, layout, {**meta, **keep}, objects)
        return Prepared(new, list(range(layout.n_units)), "new")
    repair_metadata(location, layout, old)
    for key, blob in objects.items():  # objects written at creation: restore any that went missing
        if location.get(key) != blob:
            location.put(key, blob)
    todo, _ = pending_units(open_location(location))
    return Prepared(old, todo, "resumed")
