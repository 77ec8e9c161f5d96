"""The store layout, a public contract: array names, shapes, chunking, attributes, when written.

::

    <out>/                      Zarr v3 group, attribute "blockcap" = spec, provenance, state
      tokens                    uint8/16/32 (window, position)
      offsets                   int64       (window,)
      sources                   int64       (window, 4)   document, input file, row, position (format 3)
      committed                 uint32      (unit, 2 + objects)   commit record of each write unit
      tokenizer                 uint8       (byte,)   tokenizer.json of a Hugging Face tokenizer
      block{b}/{site}           float       (window, position, width)
      block{b}/attention        float       (window, head, query, key)   only when asked
      block{b}/stats/{site}/    float64     partial (unit, ...); mean, var, min, max (width,);
                                            norm_mean (position,)   with stats
    dedup stores: block{b}/{site} is (row, width), one row per distinct prefix, and
      prefix_rows               uint32      (window, position) -> row

A *write unit* is a chunk of windows (a shard of chunks when sharded; a chunk of rows with dedup).
Every per-unit array has one object per unit, except an attention pattern too large for one
object: it is split along its query axis (``query_chunk`` rows a chunk), one object per piece.
A unit is written as whole objects and then committed by one record holding a digest of each;
see ``blockcap.integrity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

from blockcap.core.dims import ModelDims
from blockcap.core.encoding import StorageDtype, storage_dtype, token_dtype
from blockcap.core.sites import ATTENTION, TRANSFORMER_LENS, VECTOR_SITES, WIDTH_DIM, is_vector
from blockcap.core.spec import EXACT, CaptureSpec, parse_precision

FORMAT = "blockcap-store"
FORMAT_VERSION = 3  # 1: blockcap 0.1, 2: 0.2; older stores open, read and verify
TARGET_CHUNK_BYTES = 4 << 20
OBJECT_TARGET = 16 << 20  # object storage: a unit's objects average this many raw bytes (8 MB stored at 2x)
OBJECT_MAX = 64 << 20  # object storage: no object above this, as long as one chunk fits
CREATE, UNIT, COMMIT, FINISH = "create", "unit", "commit", "finish"  # when an array's objects are written
STATS_FINAL = ("mean", "var", "min", "max", "norm_mean")
SMALL_CODEC = "zstd"  # index, token, source and statistics arrays: small, compress well
SOURCE_FIELDS = ("document", "file", "row", "position")  # columns of ``sources``


def site_path(block: int, site: str) -> str:
    return f"block{block}/{site}"


def stats_path(block: int, site: str, name: str) -> str:
    return f"block{block}/stats/{site}/{name}"


def choose_chunk_windows(
    batch_size: int, bytes_per_window: int, n_windows: int, target: int = TARGET_CHUNK_BYTES
) -> int:
    """Windows per chunk: about ``target`` bytes, and a multiple or a divisor of the batch size.

    Either way every batch fills whole chunks (or a chunk is filled by whole batches), so writes
    are chunk-aligned and a chunk is always computed from the same batches, which makes resumed
    runs bitwise identical to uninterrupted ones. Never longer than the whole run needs, so a
    small store is not padded to a large chunk. Constant time in ``batch_size``.
    """
    want = max(1, target // max(1, bytes_per_window))
    if batch_size >= n_windows:  # one batch covers the run: every chunk lies inside it
        return min(want, n_windows)
    if want >= batch_size:
        return min(want // batch_size, -(-n_windows // batch_size)) * batch_size
    small = [d for d in range(1, math.isqrt(batch_size) + 1) if batch_size % d == 0]
    return max(d for d in small + [batch_size // d for d in small] if d <= want)


def choose_query_chunk(
    n_head: int, sample_len: int, itemsize: int, chunk_windows: int, target: int
) -> int | None:
    """Query rows per attention object, when a write unit's pattern is larger than ``target`` bytes
    (None: whole windows). A pattern grows with the square of the window (32 heads x 2048 tokens
    is 512 MB a window in float32), so no choice of windows per chunk keeps its objects small."""
    total = chunk_windows * n_head * sample_len * sample_len * itemsize
    return None if total <= target else -(-sample_len // -(-total // target))  # pieces of equal size


def choose_shard_chunks(layout: Layout) -> int:
    """Chunks per shard on object storage: the fewest for which a write unit's objects (its commit
    record included) average ``OBJECT_TARGET`` raw bytes, the largest at most ``OBJECT_MAX``.

    Object stores bill and list per object and read each with one request's latency, so a store
    of small objects is slow and costly there; a local disk reads a 4 MB chunk as fast, and a
    read of one window fetches (and checks) its whole object, so local stores stay unsharded.
    """
    arrays = layout.unit_arrays()
    per_chunk = [  # the arrays along the unit axis (a unit's statistics partial is one small row)
        int(np.prod(a.chunks)) * np.dtype(a.dtype).itemsize for a in arrays if "/stats/" not in a.path
    ]
    unit_bytes = sum(int(np.prod(a.chunks)) * np.dtype(a.dtype).itemsize * a.pieces for a in arrays)
    k = -(-OBJECT_TARGET * (sum(a.pieces for a in arrays) + 1) // max(1, unit_bytes))
    return max(1, min(k, OBJECT_MAX // max(1, max(per_chunk)), layout.n_chunks))


@dataclass(frozen=True)
class ArrayDef:
    """One array of the store."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    dims: tuple[str, ...]
    codec: str
    when: str  # CREATE, UNIT, COMMIT or FINISH
    shards: tuple[int, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def pieces(self) -> int:
        """Objects per write unit: one per chunk along the query axis of an attention pattern."""
        return -(-self.shape[2] // self.chunks[2]) if self.dims[2:3] == ("query",) else 1


@dataclass(frozen=True)
class Layout:
    """Everything that fixes the store's arrays."""

    n_windows: int
    sample_len: int
    blocks: tuple[int, ...]
    sites: tuple[str, ...]
    dims: ModelDims
    dtype_name: str
    codec: str
    chunk_windows: int  # items (windows, or rows with dedup) per chunk
    shard_chunks: int = 1
    stats: bool = False
    n_rows: int | None = None  # distinct prefixes of a dedup store
    tokenizer_bytes: int = 0
    format_version: int = FORMAT_VERSION  # what an older store's arrays look like is kept here
    precision: str = EXACT  # keep_bits:N rounds the vector sites (format 3)
    query_chunk: int | None = None  # attention split along queries into chunks of this many rows

    @property
    def dtype(self) -> StorageDtype:
        return storage_dtype(self.dtype_name)

    @property
    def dedup(self) -> bool:
        return self.n_rows is not None

    @property
    def n_items(self) -> int:
        """Length of the unit axis: windows, or rows of a dedup store."""
        return self.n_rows if self.n_rows is not None else self.n_windows

    @property
    def n_chunks(self) -> int:
        return -(-self.n_items // self.chunk_windows)

    @property
    def unit_windows(self) -> int:
        """Items written and committed together: a chunk, or a whole shard."""
        return self.chunk_windows * self.shard_chunks

    @property
    def n_units(self) -> int:
        return -(-self.n_items // self.unit_windows)

    def unit_range(self, unit: int) -> tuple[int, int]:
        return unit * self.unit_windows, min((unit + 1) * self.unit_windows, self.n_items)

    def outputs(self) -> list[tuple[int, str]]:
        """(block, site) of every captured array, in capture order."""
        return [(b, s) for b in self.blocks for s in self.sites]

    def stat_outputs(self) -> list[tuple[int, str]]:
        return [(b, s) for b, s in self.outputs() if self.stats and is_vector(s)]

    def site_shape(self, site: str) -> tuple[int, ...]:
        T = self.sample_len
        if site == ATTENTION:
            return (self.n_windows, self.dims.n_head, T, T)
        if self.n_rows is not None:  # dedup
            return (self.n_rows, self.dims.width(site))
        return (self.n_windows, T, self.dims.width(site))

    @property
    def keep_bits(self) -> int | None:
        """Mantissa bits kept by a lossy ``precision`` (None: exact)."""
        return parse_precision(self.precision, self.dtype_name)

    def partial_width(self, site: str) -> int:
        """Per-unit statistics row: count, mean, m2, min, max (width each), norm sum and count (T each),
        and with a lossy precision the unit's worst relative error."""
        return 1 + 4 * self.dims.width(site) + 2 * self.sample_len + (self.keep_bits is not None)

    def _unit_grid(self, shape: tuple[int, ...], query: bool = False) -> dict[str, Any]:
        rest = shape[1:]
        if query and self.query_chunk is not None:  # (head, query, key): queries split
            rest = (shape[1], min(self.query_chunk, shape[2]), shape[3])
        chunks = (self.chunk_windows, *rest)
        shards = (self.unit_windows, *rest) if self.shard_chunks > 1 else None
        return {"chunks": chunks, "shards": shards}

    def arrays(self) -> list[ArrayDef]:
        """Every array, in creation order; the per-unit ones in the order of the commit record."""
        n, T = self.n_windows, self.sample_len
        per_window = CREATE if self.dedup else UNIT  # a dedup store's window index is written up front
        # a dedup store's window index is chunked like its rows: a window range reads a few row chunks
        window_grid: dict[str, Any] = (
            {"chunks": (min(n, self.chunk_windows), T)} if self.dedup else self._unit_grid((n, T))
        )
        tok = str(token_dtype(self.dims.vocab_size))
        out = [
            ArrayDef("tokens", (n, T), tok, dims=("window", "position"), codec=SMALL_CODEC,
                     when=per_window, **window_grid),
            ArrayDef("offsets", (n,), "int64", dims=("window",), codec=SMALL_CODEC, when=per_window,
                     **{k: v[:1] if v else v for k, v in window_grid.items()}),
        ]  # fmt: skip
        if self.format_version >= 3:  # where each window comes from: document, input file, row, position
            out.append(
                ArrayDef("sources", (n, 4), "int64", dims=("window", "source"), codec=SMALL_CODEC,
                         when=per_window, attrs={"fields": list(SOURCE_FIELDS)},
                         **{k: (v[0], 4) if v else v for k, v in window_grid.items()})
            )  # fmt: skip
        if self.dedup:
            out.append(
                ArrayDef("prefix_rows", (n, T), "uint32", dims=("window", "position"), codec=SMALL_CODEC,
                         when=CREATE, attrs={"description": "row of block{b}/{site} holding this token"},
                         **window_grid)
            )  # fmt: skip
        if self.tokenizer_bytes:
            b = self.tokenizer_bytes
            out.append(ArrayDef("tokenizer", (b,), "uint8", (b,), ("byte",), SMALL_CODEC, CREATE))
        for b, site in self.outputs():
            shape = self.site_shape(site)
            dims = (
                ("window", "head", "query", "key")
                if site == ATTENTION
                else (("row",) if self.dedup else ("window", "position")) + (WIDTH_DIM[VECTOR_SITES[site]],)
            )
            attrs = {"blockcap_dtype": self.dtype_name, "site": site, "block": b}
            if site in TRANSFORMER_LENS:  # router_logits has no TransformerLens name
                attrs["transformer_lens"] = TRANSFORMER_LENS[site].format(b=b)
            if self.keep_bits is not None and is_vector(site):
                attrs["precision"] = self.precision
            grid = self._unit_grid(shape, query=site == ATTENTION)
            zdtype = str(self.dtype.zarr_dtype)
            out.append(ArrayDef(site_path(b, site), shape, zdtype, dims=dims, codec=self.codec, when=UNIT,
                                attrs=attrs, **grid))  # fmt: skip
        for b, site in self.stat_outputs():
            w = self.partial_width(site)
            out.append(ArrayDef(stats_path(b, site, "partial"), (self.n_units, w), "float64", (1, w),
                                ("unit", "value"), SMALL_CODEC, UNIT))  # fmt: skip
        objects = record_objects(out_units(out))
        out.append(
            ArrayDef("committed", (self.n_units, 3 + len(objects)), "uint32", (1, 3 + len(objects)),
                     ("unit", "field"), "none", COMMIT,
                     attrs={"description": "per unit: magic, unit, store tag, digest of each unit object",
                            "objects": objects, "unit_items": self.unit_windows})
        )  # fmt: skip
        for b, site in self.stat_outputs():
            width = self.dims.width(site)
            for name in STATS_FINAL:
                size, dim = (T, "position") if name == "norm_mean" else (width, WIDTH_DIM[VECTOR_SITES[site]])
                out.append(ArrayDef(stats_path(b, site, name), (size,), "float64", (size,), (dim,),
                                    SMALL_CODEC, FINISH))  # fmt: skip
        return out

    def unit_arrays(self) -> list[ArrayDef]:
        """The arrays written per write unit (an object each, or one per piece), in commit-record order."""
        return out_units(self.arrays())

    @classmethod
    def build(
        cls, spec: CaptureSpec, dims: ModelDims, n_windows: int, n_rows: int | None = None,
        tokenizer_bytes: int = 0,
    ) -> Layout:  # fmt: skip
        """The layout of a resolved spec (blocks and chunking concrete) on a model of ``dims``."""
        if spec.chunk_windows is None:
            raise ValueError("the spec's chunking is not resolved yet")
        return cls(
            n_windows=n_windows, sample_len=spec.sample_len, blocks=spec.blocks, sites=spec.sites,
            dims=dims, dtype_name=spec.dtype, codec=spec.codec, chunk_windows=spec.chunk_windows,
            shard_chunks=spec.shard_chunks or 1, stats=spec.stats, n_rows=n_rows,
            tokenizer_bytes=tokenizer_bytes, precision=spec.precision, query_chunk=spec.query_chunk,
        )  # fmt: skip


def out_units(arrays: list[ArrayDef]) -> list[ArrayDef]:
    return [a for a in arrays if a.when == UNIT]


def record_objects(units: list[ArrayDef]) -> list[str]:
    """The array of each digest in a commit record, in order: an array split into pieces once per piece."""
    return [a.path for a in units for _ in range(a.pieces)]


CHUNK_KEYS = DefaultChunkKeyEncoding(separator="/")  # zarr's own: every array is created with it


def chunk_key(path: str, ndim: int, chunk: int) -> str:
    """The store key of chunk (or shard) ``chunk`` along axis 0 of the ``ndim``-d array at ``path``."""
    return f"{path}/{CHUNK_KEYS.encode_chunk_key((chunk, *[0] * (ndim - 1)))}"


def object_key(array: ArrayDef, chunk: int, piece: int = 0) -> str:
    """The store key of chunk (or shard) ``chunk`` along axis 0 of ``array`` (its ``piece``-th along
    the query axis, for an attention pattern split along queries)."""
    if piece:
        return f"{array.path}/{CHUNK_KEYS.encode_chunk_key((chunk, 0, piece, 0))}"
    return chunk_key(array.path, len(array.shape), chunk)


def object_keys(array: ArrayDef, unit: int) -> list[str]:
    """The store keys of write unit ``unit``'s objects of ``array``, in commit-record order."""
    return [object_key(array, unit, j) for j in range(array.pieces)]


def pad_rows(data: np.ndarray, rows: int, axis: int = 0) -> np.ndarray:
    """``data`` padded with zeros along ``axis`` to ``rows`` (zarr stores edge chunks whole: the
    last chunk of windows along axis 0, the last piece of queries along an attention pattern's 2)."""
    if data.shape[axis] == rows:
        return data
    out = np.zeros((*data.shape[:axis], rows, *data.shape[axis + 1 :]), dtype=data.dtype)
    out[(slice(None),) * axis + (slice(0, data.shape[axis]),)] = data
    return out
