"""A store's lifecycle: creating, resuming, finishing (documents in ``metadata``, the lock in ``lock``,
replacement in ``aside``).

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

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from blockcap.core.errors import BlockcapError
from blockcap.core.layout import (
    CREATE,
    FORMAT,
    FORMAT_VERSION,
    STATS_FINAL,
    Layout,
    object_key,
    object_keys,
    pad_rows,
    stats_path,
)
from blockcap.core.spec import CaptureSpec
from blockcap.storage.aside import (
    aside_of,
    check_aside_is_ours,
    discard,
    discard_aside,
    restamp_aside,
    set_aside,
)
from blockcap.storage.codecs import ChunkEncoder, digest
from blockcap.storage.integrity import CHECKSUM_FAILS, COMMITTED, DAMAGED, CommitIndex
from blockcap.storage.location import Location
from blockcap.storage.metadata import (
    COMPLETE,
    CREATING,
    INCOMPLETE,
    ROOT,
    Opened,
    layout_of,
    now,
    open_location,
    put_root,
    read_meta,
    render_metadata,
    spec_of,
    tag_of,
    unit_objects,
)
from blockcap.storage.stats import Stats, merge


# --- writing ------------------------------------------------------------------------------------------
def create(
    location: Location, layout: Layout, meta: dict[str, Any], objects: dict[str, bytes]
) -> dict[str, Any]:
    """Create (or finish creating) a store: root first, then arrays, then ``objects``, then ``incomplete``.

    Every step rewrites whole documents with the same content, so it is safe to repeat after a
    kill at any point. Returns the metadata as written.
    """
    meta = {**planned(meta, objects), "state": CREATING}
    docs = render_metadata(layout, meta)
    location.put_first(ROOT, docs.pop(ROOT))
    location.put_many({**docs, **objects})
    meta["state"] = INCOMPLETE
    put_root(location, meta)
    return meta


def planned(meta: dict[str, Any], objects: dict[str, bytes]) -> dict[str, Any]:
    """A new store's root fields as ``create`` writes them (its tag is ``tag_of`` these)."""
    digests = {key: digest(blob) for key, blob in objects.items()}
    return {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "digests": digests}


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
        bad |= {u for u in units if not present.issuperset(object_keys(a, u))}
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
    location.sync()  # "complete" itself on disk before the run says so
    discard_aside(location, meta["run_id"])
    return meta


# --- opening a store for a capture ---------------------------------------------------------------------
@dataclass
class Prepared:
    """A store ready to capture into: its metadata, the units still to compute, its records' tag."""

    meta: dict[str, Any]
    todo: list[int]
    status: str  # "new", "resumed" or "complete"
    tag: int = 0


def prepare(
    location: Location, layout: Layout, spec: CaptureSpec, meta: dict[str, Any], objects: dict[str, bytes],
    overwrite: bool, sole: bool,
) -> Prepared:  # fmt: skip
    """Create the store, or find the one the same spec already started, per the lifecycle above.

    ``sole``: no other process writes the store now, so temporary files left by a kill can go.
    """
    tag = tag_of(planned(meta, objects), layout)
    if sole:  # what a kill left beside the store or beside its set-aside copy
        for trash in location.stale_trash() + aside_of(location).stale_trash():
            Location(str(trash)).remove_tree()
    location.check_parent()
    if not location.is_empty():
        try:
            old = read_meta(location)
            old_layout = layout_of(old)  # first: it names a damaged store's params as damage
            old_spec, old_tag = spec_of(old), tag_of(old, old_layout)
        except BlockcapError as e:
            if sole and _lost_root_of(location, layout, tag):
                new = create(location, layout, meta, objects)  # the data stays; every unit is checked
                return Prepared(new, pending_units(open_location(location))[0], "resumed", tag)
            reason = str(e) if "damaged" in str(e) else f"{location} exists and is not a blockcap store"
            raise BlockcapError(f"{reason}; refusing to touch it; choose another out=PATH") from None
        current = old.get("format_version") == FORMAT_VERSION
        if current and old_spec is not None and old_spec.identity() == spec.identity():
            if old_tag != tag:  # same capture, but the root says otherwise about what the bytes mean
                if sole and _lost_root_of(location, layout, tag):
                    new = create(
                        location, layout, {**meta, "run_id": old.get("run_id", meta["run_id"])}, objects
                    )
                    return Prepared(new, pending_units(open_location(location))[0], "resumed", tag)
                raise BlockcapError(
                    f"store {location}: its root document zarr.json does not match this capture (model "
                    f"sizes, window count, tokenizer or creation objects differ: edited or damaged); "
                    f"refusing to touch it; choose another out=PATH"
                )
            return _continue(location, layout, old, meta, objects, sole, overwrite, tag)
        if not overwrite:
            if not current:
                version = old.get("format_version")
                raise BlockcapError(
                    f"store {location} was written by an older blockcap (format {version}); "
                    f"capture into another out=PATH, or replace it with overwrite=True"
                )
            assert old_spec is not None  # a store of the current format records its spec
            raise BlockcapError(_other_capture(location, spec, old_spec))
        if old.get("state") == COMPLETE:
            set_aside(location, old, meta["run_id"])
        else:  # ours and never completed: nothing finished is lost
            check_aside_is_ours(location)
            discard(location)
    if overwrite:  # this run now replaces whatever an earlier overwrite set aside
        check_aside_is_ours(location)
        restamp_aside(location, meta["run_id"])
    return Prepared(create(location, layout, meta, objects), list(range(layout.n_units)), "new", tag)


def _other_capture(location: Location, spec: CaptureSpec, old: CaptureSpec) -> str:
    """Why a store of ``old`` is not resumed by ``spec``: its inputs changed, or its parameters."""
    changed = spec.differences(old)
    inputs = {"dataset_sha256": "dataset", "model_sha256": "model weights"}
    names = [f.split(" ", 1)[0] for f in changed]
    if names and all(n in inputs for n in names):
        what = " and ".join(inputs[n] for n in names)
        return (
            f"store {location} was started on other {what} ({', '.join(changed)}): the files changed "
            f"since; restore them to resume, or capture into another out=PATH, or overwrite=True"
        )
    return (
        f"store {location} holds a capture with other parameters ({', '.join(changed)}); use another "
        f"out=PATH, or overwrite=True to replace it"
    )


def _lost_root_of(location: Location, layout: Layout, tag: int) -> bool:
    """Whether ``location`` is a store of this capture whose root document was lost, damaged or
    edited: a commit record carries its ``tag``, and every other readable one does too."""
    objects = unit_objects(layout, FORMAT_VERSION)
    index = CommitIndex(location, layout, FORMAT_VERSION, objects, tag=tag)
    records = index.load_all().values()
    return any(r.status == COMMITTED for r in records) and all(
        r.status != DAMAGED or r.reason == CHECKSUM_FAILS for r in records
    )


def _continue(
    location: Location, layout: Layout, old: dict[str, Any], meta: dict[str, Any], objects: dict[str, bytes],
    sole: bool, overwrite: bool, tag: int,
) -> Prepared:  # fmt: skip
    """Resume the store this spec started: finish creating it, or list the units left."""
    keep: dict[str, Any] = {k: old[k] for k in ("run_id", "started") if k in old}
    if old.get("state") == COMPLETE:
        if intact(location, layout, old):
            discard_aside(location, old["run_id"])
            return Prepared(old, [], "complete", tag)
        old = {**old, "state": INCOMPLETE}  # data went missing: repair it like an interrupted run
        put_root(location, old)
    if overwrite:
        check_aside_is_ours(location)
        restamp_aside(location, old["run_id"])
    if sole:
        location.remove_partial_files()
    if old.get("state") == CREATING:
        new = create(location, layout, {**meta, **keep}, objects)
        return Prepared(new, list(range(layout.n_units)), "new", tag)
    repair_metadata(location, layout, old)
    for key, blob in objects.items():  # objects written at creation: restore any that went missing
        if location.get(key) != blob:
            location.put(key, blob)
    todo, _ = pending_units(open_location(location))
    return Prepared(old, todo, "resumed", tag)
