"""A store's documents: the root ``blockcap`` attribute (spec, state, provenance) and every array's
``zarr.json``, rendered by zarr itself; and opening a store for reading with its commit records.

States (the ``state`` field of the root attribute): ``creating -> incomplete -> complete``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr
from zarr.core.array_spec import ArrayConfigParams
from zarr.storage import MemoryStore
from zarr.types import ArrayV3

from blockcap.core.dims import ModelDims
from blockcap.core.errors import BadValue, BlockcapError
from blockcap.core.layout import CREATE, FINISH, FORMAT, FORMAT_VERSION, Layout, record_objects
from blockcap.core.spec import MAX_COUNT, CaptureSpec
from blockcap.storage.codecs import compressors
from blockcap.storage.integrity import CheckedStore, CommitIndex, DamagedError, root_tag, store_tag
from blockcap.storage.location import PARTIAL, Location

ATTR = "blockcap"


CREATING, INCOMPLETE, COMPLETE = "creating", "incomplete", "complete"


ROOT = "zarr.json"


_WRITE_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


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
        was_dir = location.local and location.root.is_dir()  # before the listing, which it describes
        files = location.keys() + [str(p) for p in location.partial_files()]
        raw = location.get(ROOT)  # it may have been renamed into place while we listed
    if raw is None:
        if location.local and location.root.is_dir() and not files:
            if not was_dir:  # a new store's directory appeared, whole, after the listing
                raise BlockcapError(f"store {location} is being created; try again in a moment")
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
    location.commit(ROOT, render_metadata(None, meta)[ROOT])  # what it says of the rest holds


# Bounds of the root's numbers: generous for any real model and corpus, and small enough that
# nothing derived from them (a chunk, a shard, a listing) is allocated beyond what is present.
DIM_LIMITS = {"n_layer": 1 << 12, "d_model": 1 << 20, "n_head": 1 << 12, "head_dim": 1 << 16,
              "d_mlp": 1 << 22, "vocab_size": 1 << 32, "context": 1 << 24}  # fmt: skip
MAY_BE_ZERO = ("n_head", "head_dim", "d_mlp")  # unknown where only block inputs and outputs are captured
OPTIONAL_DIMS = {"n_experts": 1 << 16}  # recorded only where the model has them (ModelDims.to_dict)
MAX_OBJECT_BYTES = 1 << 34  # one chunk or shard, decoded


def _number(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BlockcapError(
            f"the store's metadata is damaged: {name} is {value!r}, not an integer in {lo}..{hi}"
        )
    return value


def check_fields(meta: dict[str, Any]) -> None:
    """Type and range of every root field a layout is built from (format 2 and later), before
    anything is derived from them; one line naming the field otherwise."""
    dims = meta.get("dims")
    if not isinstance(dims, dict) or not set(DIM_LIMITS) <= set(dims) <= set(DIM_LIMITS) | set(OPTIONAL_DIMS):
        raise BlockcapError(f"the store's metadata is damaged: dims is {dims!r}")
    for name, hi in {**DIM_LIMITS, **OPTIONAL_DIMS}.items():
        if name in dims:
            _number(f"dims.{name}", dims[name], 0 if name in MAY_BE_ZERO else 1, hi)
    _number("n_windows", meta.get("n_windows"), 1, MAX_COUNT)
    if meta.get("n_rows") is not None:
        _number("n_rows", meta["n_rows"], 1, MAX_COUNT)
    _number("tokenizer_bytes", meta.get("tokenizer_bytes", 0), 0, 1 << 32)
    if not isinstance(meta.get("params"), dict):
        raise BlockcapError(f"the store's metadata is damaged: params is {meta.get('params')!r}")
    digests = meta.get("digests", {})
    if not isinstance(digests, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64
        for k, v in digests.items()
    ):
        raise BlockcapError("the store's metadata is damaged: digests is not a map of names to digests")
    if meta.get("state") not in (CREATING, INCOMPLETE, COMPLETE):
        raise BlockcapError(f"the store's metadata is damaged: state is {meta.get('state')!r}")


def _check_layout(layout: Layout) -> None:
    """Blocks, windows and objects within what the model and memory allow."""
    bad = [b for b in layout.blocks if b >= layout.dims.n_layer]
    if bad or layout.sample_len > layout.dims.context or not isinstance(layout.chunk_windows, int):
        raise BlockcapError(
            f"the store's metadata is damaged: blocks {layout.blocks}, sample_len {layout.sample_len} or "
            f"chunk_windows {layout.chunk_windows!r} do not fit dims {layout.dims.to_dict()}"
        )
    for a in layout.arrays():
        grid = a.shards or a.chunks
        if math.prod(grid) * np.dtype(a.dtype).itemsize > MAX_OBJECT_BYTES:
            raise BlockcapError(
                f"the store's metadata is damaged: an object of {a.path} would hold "
                f"{math.prod(grid) * np.dtype(a.dtype).itemsize:,} bytes"
            )


def layout_of(meta: dict[str, Any]) -> Layout:
    """The layout a store's metadata describes, every field checked first."""
    try:
        if meta["format_version"] == 1:
            return _layout_v1(meta)
        check_fields(meta)
        try:
            spec = CaptureSpec.from_params(meta["params"])
        except BlockcapError as e:  # the store's field, not the user's option: "name value", no advice
            what = e.fact if isinstance(e, BadValue) else str(e)
            raise BlockcapError(
                f"the store's metadata is damaged: its recorded params are not a capture ({what})"
            ) from None
        layout = Layout.build(spec, ModelDims(**meta["dims"]), meta["n_windows"], meta.get("n_rows"),
                              meta.get("tokenizer_bytes", 0))  # fmt: skip
        layout = replace(layout, format_version=meta["format_version"])
    except (KeyError, TypeError, ValueError) as e:
        raise BlockcapError(
            f"the store's metadata is incomplete or damaged ({type(e).__name__}: {e})"
        ) from None
    _check_layout(layout)
    return layout


def recorded_keys(layout: Layout) -> dict[str, tuple[str, int]]:
    """Path -> (when, number of objects) of the arrays whose objects the root's digests cover."""
    return {
        a.path: (a.when, -(-a.shape[0] // a.chunks[0])) for a in layout.arrays() if a.when in (CREATE, FINISH)
    }


def tag_of(meta: dict[str, Any], layout: Layout) -> int:
    """The tag the commit records of the store ``meta`` describes carry (``integrity.root_tag``)."""
    version = meta["format_version"]
    if version == 1:
        return 0
    identity = CaptureSpec.from_params(meta["params"]).identity()
    if version == 2:
        return store_tag(identity)
    created = {p for p, (when, _) in recorded_keys(layout).items() if when == CREATE}
    covered = {
        "format_version": version, "identity": identity, "dims": meta["dims"],
        "n_windows": meta["n_windows"], "n_rows": meta.get("n_rows"),
        "tokenizer_bytes": meta.get("tokenizer_bytes", 0), "tokenizer": meta.get("tokenizer"),
        "digests": {k: v for k, v in meta.get("digests", {}).items() if k.rpartition("/c/")[0] in created},
    }  # fmt: skip
    return root_tag(covered)


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
        chunk_windows=p["chunk_windows"], shard_chunks=p.get("shard_chunks", 1), format_version=1,
    )  # fmt: skip


def spec_of(meta: dict[str, Any]) -> CaptureSpec | None:
    """The spec a store recorded (None for format 1, which predates specs)."""
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
    arrays: dict[str, ArrayV3] = field(default_factory=dict)  # the group is opened as zarr v3

    @property
    def state(self) -> str:
        state: str = self.meta.get("state", "")
        return state

    def array(self, path: str) -> ArrayV3:
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
    return record_objects(layout.unit_arrays())


def open_location(location: Location, allow_creating: bool = False) -> Opened:
    """Open a store for reading; "being created" is an error unless ``allow_creating``."""
    meta = read_meta(location)
    if meta.get("state") == CREATING and not allow_creating:
        raise BlockcapError(f"store {location} is being created; try again in a moment")
    layout = layout_of(meta)
    index = CommitIndex(
        location, layout, meta["format_version"], unit_objects(layout, meta["format_version"]),
        tag=tag_of(meta, layout),
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
