"""Storage dtypes and compression codecs, by the names the CLI accepts, and chunk encoding.

Every chunk ends with a ``crc32c`` checksum (Zarr v3's own codec), so a corrupted or truncated
chunk fails on read instead of returning garbage. blockcap encodes chunks itself (numcodecs, which
releases the GIL, then the checksum) and hands the bytes to the store in one write; the result is
exactly what zarr's codec chain [bytes, compressor, crc32c] decodes, so plain zarr reads it.
"""

from __future__ import annotations

import google_crc32c
import numcodecs
import numcodecs.abc
import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from blockcap.core.encoding import parse_codec

EMPTY = 2**64 - 1  # a shard index entry for a chunk that is not stored

numcodecs.blosc.use_threads = False  # blockcap parallelises across chunks, as zarr does


def compressors(spec: str) -> list[BytesBytesCodec]:
    """The zarr bytes-to-bytes codec chain for ``spec`` (``name`` or ``name:level``), checksum last."""
    name, level = parse_codec(spec)
    chain: list[BytesBytesCodec] = []
    if name.startswith("blosc-"):
        chain.append(BloscCodec(cname=name[6:], clevel=level, shuffle="bitshuffle"))
    elif name == "zstd":
        chain.append(ZstdCodec(level=level))
    return [*chain, Crc32cCodec()]


class ChunkEncoder:
    """Encodes one chunk (or one shard of chunks) the way the array's codec chain would."""

    def __init__(self, spec: str) -> None:
        name, level = parse_codec(spec)
        if name.startswith("blosc-"):
            self.codec = numcodecs.Blosc(cname=name[6:], clevel=level, shuffle=numcodecs.Blosc.BITSHUFFLE)
        elif name == "zstd":
            self.codec = numcodecs.Zstd(level=level)
        else:
            self.codec = None

    def chunk(self, data: np.ndarray) -> bytes:
        """``data`` (C order, little endian, already padded to the chunk shape) encoded and checksummed."""
        raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
        body = bytes(self.codec.encode(raw)) if self.codec is not None else raw.tobytes()
        return body + _crc(body)

    def shard(self, data: np.ndarray, chunk_rows: int, stored_rows: int) -> bytes:
        """A shard of ``data.shape[0] // chunk_rows`` chunks along axis 0, index at the end.

        Chunks that start at or after ``stored_rows`` (beyond the array's end) are not stored.
        """
        parts, index, offset = [], [], 0
        for lo in range(0, data.shape[0], chunk_rows):
            if lo >= stored_rows:
                index.append((EMPTY, EMPTY))
                continue
            part = self.chunk(data[lo : lo + chunk_rows])
            parts.append(part)
            index.append((offset, len(part)))
            offset += len(part)
        table = np.asarray(index, dtype="<u8")
        table = table.reshape(len(index), *([1] * (data.ndim - 1)), 2).tobytes()
        return b"".join(parts) + table + _crc(table)


def _crc(data: bytes) -> bytes:
    return np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


def digest(obj: bytes | memoryview | np.ndarray) -> int:
    """The digest a commit record holds for a stored object: crc32c of all but its trailing checksum.

    (The crc32c of a whole object that ends with its own crc32c is a constant, so the trailer
    is left out; when the object is intact the digest equals that trailer.)
    """
    return int(google_crc32c.value(np.frombuffer(obj, np.uint8)[:-4]))


class ChunkDecoder:
    """Decodes the objects ``ChunkEncoder`` writes: a chunk [bytes, blosc | zstd | none, crc32c],
    or a shard of such chunks with its index at the end."""

    def __init__(self, codec: str, dtype: np.dtype, chunk: tuple[int, ...], shard_chunks: int = 1) -> None:
        name, _ = parse_codec(codec)
        self.codec = (
            numcodecs.Blosc() if name.startswith("blosc-") else numcodecs.Zstd() if name == "zstd" else None
        )
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.chunk_shape = tuple(chunk)
        self.shard_chunks = shard_chunks

    @classmethod
    def for_array(cls, arr) -> ChunkDecoder | None:
        """From a zarr array's own metadata (format-1 stores); None for a codec chain of another kind."""
        names = [c.to_dict()["name"] for c in arr.compressors]
        if arr.shards is not None or names[-1:] != ["crc32c"] or len(names) > 2:
            return None
        codec = {"blosc": "blosc-lz4", "zstd": "zstd"}.get(names[0], "?") if len(names) == 2 else "none"
        return cls(codec, arr.dtype, tuple(arr.chunks)) if codec != "?" else None

    def decode(self, obj: bytes | np.ndarray) -> np.ndarray:
        """One chunk as an array of the chunk shape; ValueError when its checksum fails."""
        raw = np.frombuffer(obj, np.uint8)
        body = raw[:-4]
        if raw.size < 4 or int(raw[-4:].view("<u4")[0]) != google_crc32c.value(body):
            raise ValueError("its checksum fails")
        data = body if self.codec is None else np.frombuffer(self.codec.decode(body), np.uint8)
        return data.view(self.dtype).reshape(self.chunk_shape)

    def decode_shard(self, obj: bytes | np.ndarray, inner: list[int]) -> list[np.ndarray | None]:
        """Chunks ``inner`` of a shard (None where the shard stores none); ValueError when damaged."""
        raw = np.frombuffer(obj, np.uint8)
        size = 16 * self.shard_chunks
        table, tail = raw[-size - 4 : -4], raw[-4:]
        if raw.size < size + 4 or int(tail.view("<u4")[0]) != google_crc32c.value(table):
            raise ValueError("its shard index checksum fails")
        index = table.view("<u8").reshape(self.shard_chunks, 2)
        out = []
        for i in inner:
            offset, length = (int(x) for x in index[i])
            if offset == EMPTY:
                out.append(None)
                continue
            if offset + length > raw.size - size - 4:
                raise ValueError("its shard index points outside the shard")
            out.append(self.decode(raw[offset : offset + length]))
        return out
