"""The store layout, a public contract: array names, shapes, chunking, attributes, format version.

::

    <out>.zarr/                 Zarr v3 group, attribute "blockcap" = provenance + state
      tokens                    uint8/16/32 (window, position)
      offsets                   int64       (window,)
      committed                 uint8       (chunk,)   1 once chunk c of every array is written
      block{b}/{site}           float       (window, position, embed)
      block{b}/attention        float       (window, head, query, key)   only when asked

All arrays share one chunk grid along the window axis (``chunk_windows``), so "chunk c" names the
same windows everywhere; ``committed`` is written only after those windows of every array are.
With ``shard_chunks`` > 1 the data arrays are Zarr v3 sharded, ``shard_chunks`` chunks a file,
and a shard is written (and its chunks committed) as one unit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from blockcap.codecs import StorageDtype, compressors, storage_dtype
from blockcap.errors import BlockcapError

FORMAT = "blockcap-store"
FORMAT_VERSION = 1
ATTR = "blockcap"
INCOMPLETE, COMPLETE = "incomplete", "complete"

VECTOR_SITES = ("block_input", "heads_output", "proj_output", "resid_mid", "ffwd_output", "block_output")
SITES = (*VECTOR_SITES, "attention")
DEFAULT_SITES = ("heads_output", "proj_output", "ffwd_output")
# The TransformerLens name of each site, for readers who think in those.
TRANSFORMER_LENS = {
    "block_input": "blocks.{b}.hook_resid_pre",
    "heads_output": "blocks.{b}.attn.hook_z (flattened over heads)",
    "proj_output": "blocks.{b}.hook_attn_out",
    "resid_mid": "blocks.{b}.hook_resid_mid",
    "ffwd_output": "blocks.{b}.hook_mlp_out",
    "block_output": "blocks.{b}.hook_resid_post",
    "attention": "blocks.{b}.attn.hook_pattern",
}
TARGET_CHUNK_BYTES = 4 << 20
_WRITE_CONFIG = {"write_empty_chunks": True}  # skip the per-chunk fill-value scan


def site_path(block: int, site: str) -> str:
    return f"block{block}/{site}"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every token id."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def choose_chunk_windows(
    batch_size: int, bytes_per_window: int, n_windows: int, target: int = TARGET_CHUNK_BYTES
) -> int:
    """Windows per chunk: about ``target`` bytes, and a multiple or a divisor of the batch size.

    Either way every batch fills whole chunks (or a chunk is filled by whole batches), so writes
    are chunk-aligned and a chunk is always computed from the same batches, which makes resumed
    runs bitwise identical to uninterrupted ones. Never longer than the whole run needs, so a
    small store is not padded to a large chunk.
    """
    want = max(1, target // max(1, bytes_per_window))
    if want >= batch_size:
        return min(want // batch_size, -(-n_windows // batch_size)) * batch_size
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= want)


@dataclass(frozen=True)
class Layout:
    """Everything that fixes the store's arrays."""

    n_windows: int
    sample_len: int
    n_embed: int
    n_head: int
    vocab_size: int
    blocks: tuple[int, ...]
    sites: tuple[str, ...]
    dtype: StorageDtype
    codec: str
    chunk_windows: int
    shard_chunks: int = 1

    @property
    def n_chunks(self) -> int:
        return -(-self.n_windows // self.chunk_windows)

    @property
    def unit_windows(self) -> int:
        """Windows written and committed together: a chunk, or a whole shard."""
        return self.chunk_windows * self.shard_chunks

    @property
    def n_units(self) -> int:
        return -(-self.n_windows // self.unit_windows)

    def grid(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...] | None]:
        """``chunks`` and ``shards`` arguments for a data array of ``shape``."""
        chunks = (self.chunk_windows, *shape[1:])
        shards = (self.unit_windows, *shape[1:]) if self.shard_chunks > 1 else None
        return {"chunks": chunks, "shards": shards}

    @classmethod
    def from_meta(cls, m: dict[str, Any]) -> Layout:
        """The layout a store's provenance attribute describes (KeyError if it is incomplete)."""
        p, cfg = m["params"], m["model_config"]
        return cls(
            n_windows=p["n_windows"], sample_len=p["sample_len"], n_embed=cfg["n_embed"],
            n_head=cfg["n_head"], vocab_size=cfg["vocab_size"], blocks=tuple(p["blocks"]),
            sites=tuple(p["sites"]), dtype=storage_dtype(p["dtype"]), codec=p["codec"],
            chunk_windows=p["chunk_windows"], shard_chunks=p.get("shard_chunks", 1),
        )  # fmt: skip

    def arrays(self) -> dict[str, tuple[int, ...]]:
        """Every array's path and shape."""
        shapes = {"tokens": (self.n_windows, self.sample_len), "offsets": (self.n_windows,)}
        shapes["committed"] = (self.n_chunks,)
        shapes.update({site_path(b, s): self.site_shape(s) for b, s in self.outputs()})
        return shapes

    def site_shape(self, site: str) -> tuple[int, ...]:
        T = self.sample_len
        if site == "attention":
            return (self.n_windows, self.n_head, T, T)
        return (self.n_windows, T, self.n_embed)

    def outputs(self) -> list[tuple[int, str]]:
        """(block, site) of every captured array, in capture order."""
        return [(b, s) for b in self.blocks for s in self.sites]


def _dims(site: str) -> tuple[str, ...]:
    return ("window", "head", "query", "key") if site == "attention" else ("window", "position", "embed")


def create(path: Path, layout: Layout, attrs: dict[str, Any]) -> zarr.Group:
    """Create an empty store with every array pre-allocated and the state ``incomplete``."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update(
        {ATTR: {**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "state": INCOMPLETE}}
    )
    cw = layout.chunk_windows
    common = {"compressors": compressors(layout.codec), "config": _WRITE_CONFIG, "fill_value": 0}
    group.create_array(
        "tokens",
        shape=(layout.n_windows, layout.sample_len),
        **layout.grid((layout.n_windows, layout.sample_len)),
        dtype=token_dtype(layout.vocab_size),
        dimension_names=("window", "position"),
        **common,
    )
    group.create_array(
        "offsets",
        shape=(layout.n_windows,),
        **layout.grid((layout.n_windows,)),
        dtype="int64",
        dimension_names=("window",),
        **common,
    )
    group.create_array(
        "committed",
        shape=(layout.n_chunks,),
        chunks=(1,),
        dtype="uint8",
        dimension_names=("chunk",),
        compressors=[Crc32cCodec()],
        config=_WRITE_CONFIG,
        fill_value=0,
        attributes={"description": f"1 once windows [c*{cw}, (c+1)*{cw}) of every array are written"},
    )
    for b, site in layout.outputs():
        shape = layout.site_shape(site)
        group.create_array(
            site_path(b, site),
            shape=shape,
            **layout.grid(shape),
            dtype=layout.dtype.zarr_dtype,
            dimension_names=_dims(site),
            attributes={
                "blockcap_dtype": layout.dtype.name,
                "site": site,
                "block": b,
                "transformer_lens": TRANSFORMER_LENS[site].format(b=b),
            },
            **common,
        )
    return group


def meta(group: zarr.Group) -> dict[str, Any]:
    """The store's ``blockcap`` attribute (provenance and state)."""
    return dict(group.attrs.get(ATTR, {}))


def update_meta(group: zarr.Group, **changes: Any) -> None:
    """Rewrite the provenance attribute with ``changes`` (zarr replaces zarr.json atomically)."""
    group.attrs.update({ATTR: {**meta(group), **changes}})


def read_committed(group: zarr.Group) -> np.ndarray:
    """Boolean mask of committed chunks; an unreadable record counts as not committed."""
    arr = group["committed"]
    try:
        return np.asarray(arr[:]) == 1
    except Exception:  # a damaged record file: fall back chunk by chunk
        mask = np.zeros(arr.shape[0], dtype=bool)
        for c in range(arr.shape[0]):
            try:
                mask[c] = arr[c] == 1
            except Exception:
                mask[c] = False
        return mask


def damaged_chunks(arr: zarr.Array, chunks: Iterable[int]) -> Iterator[tuple[str, Exception]]:
    """(``"chunk c (windows a..b)"``, error) for each of ``chunks`` of ``arr`` that fails to read."""
    cw, n = arr.chunks[0], arr.shape[0]
    for c in chunks:
        try:
            arr[c * cw : (c + 1) * cw]
        except Exception as e:  # checksum mismatch, truncated file, decode error: all damage
            yield f"chunk {c} (windows {c * cw}..{min((c + 1) * cw, n) - 1})", e


def mark_committed(group: zarr.Group, lo: int, hi: int) -> None:
    """Record chunks ``lo:hi`` as fully written (call only after their data is written)."""
    group["committed"][lo:hi] = 1


def open_group(path: Path, mode: str = "r") -> zarr.Group:
    """Open ``path`` as a blockcap store, with one-line errors for everything that is not one."""
    if not path.exists():
        raise BlockcapError(f"store {path} does not exist; capture one with `python -m blockcap run`")
    if not path.is_dir():
        raise BlockcapError(f"store {path} is a file, not a Zarr store directory")
    if not (path / "zarr.json").exists():
        raise BlockcapError(f"{path} is not a Zarr v3 store (no zarr.json); pass a blockcap store")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as e:
        raise BlockcapError(f"{path} is not a readable Zarr v3 group ({e})") from None
    m = meta(group)
    if m.get("format") != FORMAT:
        raise BlockcapError(f"{path} is a Zarr group but not a blockcap store (no '{ATTR}' attribute)")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise BlockcapError(
            f"{path} has store format {m['format_version']}, newer than this blockcap's "
            f"{FORMAT_VERSION}; upgrade blockcap"
        )
    return group


def stored_bytes(path: Path) -> int:
    """Bytes on disk of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_partial_files(path: Path) -> int:
    """Delete temporary files a killed writer left behind (zarr writes via *.partial + rename)."""
    n = 0
    for p in path.rglob("*.partial"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def is_blockcap_store(path: Path) -> bool:
    try:
        open_group(path)
        return True
    except BlockcapError:
        return False


def aside_path(path: Path) -> Path:
    """Where ``set_aside`` keeps a replaced store."""
    return path.with_name(path.name + ".replaced")


def set_aside(path: Path) -> Path:
    """Move an existing store out of the way (kept until its replacement completes)."""
    aside = aside_path(path)
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    return aside
