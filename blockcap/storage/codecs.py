"""Storage dtypes and compression codecs, by the names the CLI accepts, and chunk encoding.

Every chunk ends with a ``crc32c`` checksum (Zarr v3's own codec), so a corrupted or truncated
chunk fails on read instead of returning garbage. blockcap encodes chunks itself and hands the
bytes to the store in one write; the result is exactly what zarr's codec chain [bytes,
compressor, crc32c] (inside ``sharding_indexed`` when sharded) decodes, so plain zarr reads it.

Why not zarr's own codec pipeline: measured on the same activations (``benchmarks/test_storage.py::
test_encoder``, figures in docs/design.md),
encoding through ``BatchedCodecPipeline`` / ``ShardingCodec`` costs more CPU per byte than
this module, and the writer is the capture's bottleneck on a CPU. Blosc, the default codec,
is called through numcodecs' bundled c-blosc (``blosc_compress_ctx``, thread-safe, GIL
released) straight into a buffer each writer thread reuses, with room left for the checksum:
no output allocation (fresh multi-megabyte buffers page-fault on every chunk), no copy to
append the trailer, and the digest is that trailer. Where the symbols are missing it falls
back to ``numcodecs.Blosc``, byte for byte the same output.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import google_crc32c
import numcodecs
import numcodecs.abc
import numcodecs.blosc
import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCname, BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.metadata import ArrayV3Metadata
from zarr.types import ArrayV3

from blockcap.core.encoding import parse_codec

EMPTY = 2**64 - 1  # a shard index entry for a chunk that is not stored
BLOSC_OVERHEAD = 16  # c-blosc 1's header: a frame is at most this much longer than its input
BITSHUFFLE = 2

numcodecs.blosc.use_threads = False  # blockcap parallelises across chunks, as zarr does


def compressors(spec: str) -> list[BytesBytesCodec]:
    """The zarr bytes-to-bytes codec chain for ``spec`` (``name`` or ``name:level``), checksum last."""
    name, level = parse_codec(spec)
    chain: list[BytesBytesCodec] = []
    if name.startswith("blosc-"):
        assert level is not None  # parse_codec gives every codec but "none" its level
        chain.append(BloscCodec(cname=BloscCname(name[6:]), clevel=level, shuffle="bitshuffle"))
    elif name == "zstd":
        assert level is not None
        chain.append(ZstdCodec(level=level))
    return [*chain, Crc32cCodec()]


def _c_blosc() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """numcodecs' bundled c-blosc ``(compress_ctx, decompress_ctx)``, or None when not exported."""
    try:
        lib = ctypes.CDLL(numcodecs.blosc.__file__)
        compress, decompress = lib.blosc_compress_ctx, lib.blosc_decompress_ctx
    except (OSError, AttributeError):
        return None
    size, ptr = ctypes.c_size_t, ctypes.c_void_p
    compress.restype = decompress.restype = ctypes.c_int
    compress.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        size,
        size,
        ptr,
        ptr,
        size,
        ctypes.c_char_p,
        size,
        ctypes.c_int,
    ]
    decompress.argtypes = [ptr, ptr, size, ctypes.c_int]
    return compress, decompress


_C_BLOSC = _c_blosc()
_SCRATCH = threading.local()


def scratch(nbytes: int) -> np.ndarray:
    """This thread's reusable output buffer, at least ``nbytes`` long (valid until its next use)."""
    buf: np.ndarray | None = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _SCRATCH.buf = np.empty(max(nbytes, 1 << 20), np.uint8)
    return buf


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    return int(google_crc32c.value(data))


def _crc(data: bytes | memoryview | np.ndarray) -> bytes:
    return crc32c(data).to_bytes(4, "little")


class ChunkEncoder:
    """Encodes one chunk (or one shard of chunks) the way the array's codec chain would."""

    def __init__(self, spec: str) -> None:
        name, level = parse_codec(spec)
        self.blosc = (name[6:].encode(), level) if name.startswith("blosc-") else None
        if self.blosc is not None:
            self.codec = numcodecs.Blosc(cname=name[6:], clevel=level, shuffle=numcodecs.Blosc.BITSHUFFLE)
        elif name == "zstd":
            self.codec = numcodecs.Zstd(level=level)
        else:
            self.codec = None

    def _body_into(self, raw: np.ndarray, out: np.ndarray, at: int) -> int:
        """Encode ``raw`` (C order, little endian) into ``out[at:]``; returns the end offset."""
        if self.blosc is not None and _C_BLOSC is not None:
            cname, level = self.blosc
            room = raw.nbytes + BLOSC_OVERHEAD  # as numcodecs: else a frame may exceed its input
            n = _C_BLOSC[0](level, BITSHUFFLE, raw.itemsize, raw.nbytes, raw.ctypes.data,
                            out.ctypes.data + at, room, cname, 0, 1)  # fmt: skip
            if n <= 0:
                raise RuntimeError(f"blosc compression failed ({n})")
            return at + n
        body = (
            np.frombuffer(self.codec.encode(raw), np.uint8) if self.codec is not None else raw.view(np.uint8)
        )
        out[at : at + body.size] = body.reshape(-1)
        return at + body.size

    def encode(self, data: np.ndarray, out: np.ndarray | None = None) -> tuple[memoryview, int]:
        """(object, digest) of ``data`` (already padded to the chunk shape), encoded and checksummed.

        The object is a view of ``out`` (default: this thread's scratch buffer), valid until that
        buffer's next use; the digest (``digest``) is its checksum trailer, computed once.
        """
        raw = _little(data)
        out = scratch(raw.nbytes + BLOSC_OVERHEAD + 4) if out is None else out
        end = self._body_into(raw, out, 0)
        value = crc32c(out[:end])
        out[end : end + 4] = np.frombuffer(np.uint32(value).astype("<u4").tobytes(), np.uint8)
        return out[: end + 4].data, value

    def chunk(self, data: np.ndarray) -> bytes:
        """``data`` (already padded to the chunk shape) encoded and checksummed, as bytes."""
        raw = _little(data)
        return bytes(self.encode(raw, np.empty(raw.nbytes + BLOSC_OVERHEAD + 4, np.uint8))[0])

    def encode_shard(self, data: np.ndarray, chunk_rows: int, stored_rows: int) -> tuple[memoryview, int]:
        """(object, digest) of a shard of ``data.shape[0] // chunk_rows`` chunks along axis 0, index
        at the end; chunks that start at or after ``stored_rows`` (beyond the array's end) are not
        stored. Every chunk is encoded in place into one scratch buffer, as ``encode``."""
        raw = _little(data)
        n = -(-raw.shape[0] // chunk_rows)
        per = chunk_rows * raw[0:1].nbytes
        out = scratch(n * (per + BLOSC_OVERHEAD + 4) + 16 * n + 4)
        index, at = np.full((n, 2), EMPTY, "<u8"), 0
        for i, lo in enumerate(range(0, raw.shape[0], chunk_rows)):
            if lo >= stored_rows:
                continue
            end = self._body_into(raw[lo : lo + chunk_rows], out, at)
            out[end : end + 4] = np.frombuffer(_crc(out[at:end]), np.uint8)
            index[i] = (at, end + 4 - at)
            at = end + 4
        table = index.reshape(n, *([1] * (raw.ndim - 1)), 2).view(np.uint8).reshape(-1)
        out[at : at + table.size] = table
        out[at + table.size : at + table.size + 4] = np.frombuffer(_crc(table), np.uint8)
        end = at + table.size + 4
        return out[:end].data, crc32c(out[: end - 4])

    def shard(self, data: np.ndarray, chunk_rows: int, stored_rows: int) -> bytes:
        return bytes(self.encode_shard(data, chunk_rows, stored_rows)[0])


def _little(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))


def digest(obj: bytes | memoryview | np.ndarray) -> int:
    """The digest a commit record holds for a stored object: crc32c of all but its trailing checksum.

    (The crc32c of a whole object that ends with its own crc32c is a constant, so the trailer
    is left out; when the object is intact the digest equals that trailer.)
    """
    return crc32c(np.frombuffer(obj, np.uint8)[:-4])


class ChunkDecoder:
    """Decodes the objects ``ChunkEncoder`` writes: a chunk [bytes, blosc | zstd | none, crc32c],
    or a shard of such chunks with its index ([bytes, crc32c]) at the end."""

    def __init__(self, codec: str, dtype: np.dtype, chunk: tuple[int, ...], shard_chunks: int = 1) -> None:
        name, _ = parse_codec(codec)
        self.blosc = name.startswith("blosc-")
        self.codec = numcodecs.Blosc() if self.blosc else numcodecs.Zstd() if name == "zstd" else None
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.chunk_shape = tuple(chunk)
        self.shard_chunks = shard_chunks

    @classmethod
    def for_array(cls, arr: ArrayV3) -> ChunkDecoder | None:
        """From a zarr array's own metadata (format-1 stores): chunks, or shards of them along axis 0
        with the index at the end; None for a codec chain of another kind."""
        metadata = arr.metadata
        assert isinstance(metadata, ArrayV3Metadata)  # stores are opened as zarr v3 groups
        codecs: list[dict[str, Any]] = [c.to_dict() for c in metadata.codecs]
        shard_chunks = 1
        if codecs and codecs[0]["name"] == "sharding_indexed":
            config: dict[str, Any] = codecs[0]["configuration"]
            index = [c["name"] for c in config["index_codecs"]]
            inner = tuple(config["chunk_shape"])
            if index != ["bytes", "crc32c"] or config.get("index_location", "end") != "end":
                return None
            shards = arr.shards
            assert shards is not None  # zarr reads them from this sharding_indexed codec
            if inner[1:] != tuple(shards[1:]) or shards[0] % inner[0]:
                return None
            shard_chunks, codecs, chunks = shards[0] // inner[0], config["codecs"], inner
        else:
            chunks = tuple(arr.chunks)
        names = [c["name"] for c in codecs]
        if codecs and codecs[0].get("configuration", {}).get("endian", "little") != "little":
            return None
        if names[:1] != ["bytes"] or names[-1:] != ["crc32c"] or len(names) > 3:
            return None
        codec = {"blosc": "blosc-lz4", "zstd": "zstd"}.get(names[1], "?") if len(names) == 3 else "none"
        return cls(codec, arr.dtype, chunks, shard_chunks) if codec != "?" else None

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    def decode(self, obj: bytes | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """One chunk as an array of the chunk shape (written into ``out`` when given, a C-contiguous
        array of the chunk's dtype and size); ValueError when its checksum fails or it is malformed."""
        raw = np.frombuffer(obj, np.uint8)
        body = raw[:-4]
        if raw.size < 4 or int(raw[-4:].view("<u4")[0]) != google_crc32c.value(body):
            raise ValueError("its checksum fails")
        size = self.chunk_bytes
        if self.blosc and _C_BLOSC is not None:
            dest = np.empty(self.chunk_shape, self.dtype) if out is None else out
            if dest.nbytes != size or not dest.flags.c_contiguous:
                raise ValueError("the output buffer does not fit a chunk")
            if _C_BLOSC[1](body.ctypes.data, dest.ctypes.data, size, 1) != size:
                raise ValueError("it does not decompress to one chunk")
            return dest.reshape(self.chunk_shape)
        data = body if self.codec is None else np.frombuffer(self.codec.decode(body), np.uint8)
        if data.size != size:
            raise ValueError("it does not decode to one chunk")
        data = data.view(self.dtype).reshape(self.chunk_shape)
        if out is None:
            return data
        out.reshape(self.chunk_shape)[...] = data
        return out.reshape(self.chunk_shape)

    def shard_index(self, obj: bytes | np.ndarray) -> np.ndarray:
        """A shard's (chunks, 2) table of (offset, length); ValueError when damaged."""
        raw = np.frombuffer(obj, np.uint8)
        size = 16 * self.shard_chunks
        table, tail = raw[-size - 4 : -4], raw[-4:]
        if raw.size < size + 4 or int(tail.view("<u4")[0]) != google_crc32c.value(table):
            raise ValueError("its shard index checksum fails")
        index = table.view("<u8").reshape(self.shard_chunks, 2)
        stored = index[index[:, 0] != EMPTY]
        if (stored[:, 0] + stored[:, 1] > raw.size - size - 4).any():
            raise ValueError("its shard index points outside the shard")
        return index

    def decode_shard(
        self, obj: bytes | np.ndarray, inner: list[int], outs: list[np.ndarray | None] | None = None
    ) -> list[np.ndarray | None]:
        """Chunks ``inner`` of a shard (None where the shard stores none), each into ``outs[i]`` when
        given; ValueError when damaged."""
        raw = np.frombuffer(obj, np.uint8)
        index = self.shard_index(raw)
        result: list[np.ndarray | None] = []
        for j, i in enumerate(inner):
            offset, length = (int(x) for x in index[i])
            if offset == EMPTY:
                result.append(None)
                continue
            result.append(self.decode(raw[offset : offset + length], None if outs is None else outs[j]))
        return result
