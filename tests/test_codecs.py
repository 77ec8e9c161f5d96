"""Chunk encoding: the fast path writes exactly what numcodecs and zarr's own codec chain write,
and decodes what they read; one decoder reads every format's chunks and shards."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import zarr

from blockcap.storage import codecs
from blockcap.storage.codecs import ChunkDecoder, ChunkEncoder, compressors, crc32c, digest


def data(dtype: str, shape=(12, 5, 7)) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return x.view(np.uint16)[..., ::2].copy() if dtype == "uint16" else x.astype(dtype)


@pytest.mark.parametrize("spec", ["blosc-lz4", "blosc-zstd:3", "zstd", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "uint16", "int64"])
def test_chunk_equals_numcodecs_and_the_digest_is_its_trailer(spec, dtype):
    x = data(dtype)
    blob, value = ChunkEncoder(spec).encode(x)
    name = spec.split(":")[0]
    codec = (
        numcodecs.Blosc(cname=name[6:], clevel=int(spec.split(":")[1]) if ":" in spec else 5,
                        shuffle=numcodecs.Blosc.BITSHUFFLE)
        if name.startswith("blosc") else numcodecs.Zstd(level=3) if name == "zstd" else None
    )  # fmt: skip
    body = codec.encode(x) if codec is not None else x.tobytes()
    assert bytes(blob) == bytes(body) + np.uint32(crc32c(body)).tobytes()
    assert value == digest(blob) == crc32c(body)
    dec = ChunkDecoder(spec, x.dtype, x.shape)
    assert np.array_equal(dec.decode(bytes(blob)), x)
    out = np.empty_like(x)
    assert dec.decode(bytes(blob), out) is not None and np.array_equal(out, x)


def test_without_the_c_blosc_symbols_the_same_bytes(monkeypatch):
    x = data("float32")
    fast = bytes(ChunkEncoder("blosc-lz4").encode(x)[0])
    monkeypatch.setattr(codecs, "_C_BLOSC", None)
    assert bytes(ChunkEncoder("blosc-lz4").encode(x)[0]) == fast
    assert np.array_equal(ChunkDecoder("blosc-lz4", x.dtype, x.shape).decode(fast), x)


def test_scratch_is_reused_and_chunk_returns_its_own_bytes():
    enc, x = ChunkEncoder("blosc-lz4"), data("float32")
    first, _ = enc.encode(x)
    kept = enc.chunk(x)
    second, _ = enc.encode(x[::-1].copy())
    assert np.shares_memory(np.frombuffer(first, np.uint8), np.frombuffer(second, np.uint8))
    assert kept == bytes(ChunkEncoder("blosc-lz4").encode(x)[0])


@pytest.mark.parametrize("spec", ["blosc-lz4", "none"])
def test_shards_are_what_zarr_writes_and_reads(spec, tmp_path):
    x = data("float32", (10, 5, 7))
    arr = zarr.create_array(tmp_path / "a.zarr", shape=x.shape, chunks=(2, 5, 7), shards=(8, 5, 7),
                            dtype="float32", compressors=compressors(spec), fill_value=0)  # fmt: skip
    arr[:] = x
    enc = ChunkEncoder(spec)
    padded = np.zeros((16, 5, 7), np.float32)
    padded[:10] = x
    for s, rows in ((0, 8), (1, 2)):
        blob, value = enc.encode_shard(padded[s * 8 : s * 8 + 8], 2, rows)
        stored = (tmp_path / "a.zarr" / "c" / str(s) / "0" / "0").read_bytes()
        assert bytes(blob) == stored and value == digest(stored)
    dec = ChunkDecoder.for_array(zarr.open_array(tmp_path / "a.zarr"))  # a format-1 sharded array
    assert dec is not None and dec.shard_chunks == 4 and dec.chunk_shape == (2, 5, 7)
    got = dec.decode_shard(stored, [0, 1, 2, 3])
    assert np.array_equal(got[0], x[8:10]) and got[1] is None


def test_damage_is_a_value_error():
    x = data("float32")
    blob = bytearray(ChunkEncoder("blosc-lz4").chunk(x))
    dec = ChunkDecoder("blosc-lz4", x.dtype, x.shape)
    blob[10] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        dec.decode(bytes(blob))
    with pytest.raises(ValueError, match="fit"):
        dec.decode(ChunkEncoder("blosc-lz4").chunk(x), np.empty(3, np.float32))
    short = ChunkEncoder("blosc-lz4").chunk(x[:6])
    with pytest.raises(ValueError, match="one chunk"):
        dec.decode(short)
