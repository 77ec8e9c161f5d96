"""Storage: blockcap's writer against the codec's own limit, every codec and dtype; the encoder
against zarr's codec pipeline; read speed.

Activations are real captures of the trained bundled model on TinyShakespeare when
``--bench-real-text`` (or ``BLOCKCAP_TEST_DATASET``) is given, else on synthetic text.

* limit: numcodecs' Blosc lz4-bitshuffle encode of each chunk plus a plain file write, one thread,
  for each storage dtype;
* writer: blockcap's own path for the same chunks (encode, checksum, digest, atomic write, commit
  record; statistics unless "no stats"), one writer thread; reported per codec and dtype with the
  compression ratio, and against the limit of its dtype;
* encoder: blockcap's ``ChunkEncoder`` and zarr's ``BatchedCodecPipeline`` (``ShardingCodec`` for
  shards) encoding the same chunks to the same bytes (checked), CPU seconds of the process (zarr
  encodes on its own threads): the measurement behind encoding chunks ourselves.
"""

from __future__ import annotations

import random
import shutil
import time

import numcodecs
import numpy as np
import pytest
import torch

import blockcap
from benchmarks.conftest import ROUNDS, WORKLOADS, make_setup
from blockcap.analysis.reader import CaptureStore
from blockcap.capture.chargpt.capture import CharGPTCapture
from blockcap.core.dims import ModelDims
from blockcap.core.encoding import DTYPES
from blockcap.core.layout import Layout, choose_chunk_windows
from blockcap.core.spec import CaptureSpec
from blockcap.storage.lifecycle import create
from blockcap.storage.location import Location
from blockcap.storage.metadata import open_location, tag_of
from blockcap.storage.writer import SlabWriter, UnitSource

CODECS = ["none", "blosc-lz4", "blosc-zstd", "zstd:1", "zstd:3"]
SITES = ("heads_output", "proj_output", "ffwd_output")


@pytest.fixture(
    scope="module", params=[w for w in WORKLOADS if w.name in ("orig-cli", "long-b0")], ids=lambda w: w.name
)
def activations(request, text, models, enabled, tmp_path_factory) -> dict:
    """heads/proj/ffwd of block 0 of the bundled model, float32, (windows, T, C) each."""
    s = make_setup(text, "bundled", models, request.param, enabled, tmp_path_factory.mktemp("act"))
    module = CharGPTCapture(s.model, (0,), SITES)
    with torch.inference_mode():
        parts = [module(s.windows[i : i + 64]) for i in range(0, len(s.windows), 64)]
    outs = [torch.cat([p[i] for p in parts]) for i in range(len(SITES))]
    return {"workload": request.param.name, "windows": s.windows, "outs": outs}


def _chunk_windows(activations: dict, dtype: str) -> int:
    n, T, C = activations["outs"][0].shape
    return choose_chunk_windows(64, T * C * DTYPES[dtype].zarr_dtype.itemsize, n)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_codec_limit(benchmark, activations, tmp_path, dtype):
    """The floor of writing: Blosc lz4-bitshuffle encode plus a plain file write per chunk, one core."""
    sd = DTYPES[dtype]
    outs = [sd.to_numpy(o.to(sd.torch_dtype)) for o in activations["outs"]]
    cw = _chunk_windows(activations, dtype)
    codec = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    out = tmp_path / "raw"

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()

    def write():
        for k, o in enumerate(outs):
            for lo in range(0, len(o), cw):
                (out / f"{k}.{lo}").write_bytes(codec.encode(np.ascontiguousarray(o[lo : lo + cw])))

    benchmark.group = f"storage-{activations['workload']}"
    benchmark.extra_info.update(
        variant=f"limit: numcodecs blosc-lz4 + file write/{dtype}", dtype=dtype,
        raw_bytes=sum(o.numel() * 4 for o in activations["outs"]),
    )  # fmt: skip
    benchmark.pedantic(write, setup=fresh, rounds=ROUNDS, warmup_rounds=1, iterations=1)


# (codec, dtype, statistics, fsync): every codec and dtype as captures write them; then without
# statistics, and without fsync (the limit writes to the page cache only), to show what each costs
WRITERS = (
    [(c, d, True, True) for c in CODECS for d in DTYPES]
    + [("blosc-lz4", d, False, True) for d in DTYPES]
    + [("blosc-lz4", d, s, False) for d in DTYPES for s in (True, False)]
)


@pytest.mark.parametrize(
    "codec, dtype, stats, durable", WRITERS,
    ids=[f"{c}-{d}" + ("" if s else "-nostats") + ("" if f else "-nofsync") for c, d, s, f in WRITERS],
)  # fmt: skip
def test_writer(benchmark, activations, tmp_path, codec, dtype, stats, durable):
    """blockcap's writer, one thread (its committer thread beside it), on the same chunks: encode,
    checksum, write, fsync unless not ``durable``, commit, statistics."""
    sd = DTYPES[dtype]
    outs = [o.to(sd.torch_dtype) for o in activations["outs"]]
    windows = activations["windows"]
    n, T, C = outs[0].shape
    cw = _chunk_windows(activations, dtype)
    spec = CaptureSpec(block_idx=0, sites=SITES, sample_len=T, dtype=dtype, codec=codec, chunk_windows=cw,
                       batch_size=cw, stats=stats)  # fmt: skip
    dims = ModelDims(n_layer=1, d_model=C, n_head=6, head_dim=C // 6, d_mlp=4 * C, vocab_size=256, context=T)
    layout = Layout.build(spec, dims, n)
    out = tmp_path / "w.zarr"
    source = UnitSource(
        offsets=lambda lo, hi: np.arange(lo, hi, dtype=np.int64),
        sources=lambda lo, hi: np.zeros((hi - lo, 4), np.int64),
        tag=0,
    )

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        location = Location(str(out), durable=durable)
        meta = {"run_id": "bench", "params": spec.to_params(), "dims": dims.to_dict(), "n_windows": n}
        meta = create(location, layout, meta, {})
        source.tag = tag_of(meta, layout)  # the tag the store's records must carry
        return (location,), {}

    def write(location):
        units = list(range(layout.n_units))
        with SlabWriter(location, layout, source, units, workers=1, max_pending=2) as w:
            for lo in range(0, n, cw):
                w.add_batch(lo, min(lo + cw, n), windows[lo : lo + cw], [o[lo : lo + cw] for o in outs])
        w.raise_error()

    raw = sum(o.numel() * 4 for o in activations["outs"])
    benchmark.group = f"storage-{activations['workload']}"
    name = f"writer {codec}/{dtype}" + ("" if stats else ", no stats") + ("" if durable else ", no fsync")
    benchmark.extra_info.update(variant=name, dtype=dtype, raw_bytes=raw)
    benchmark.pedantic(write, setup=fresh, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    stored = sum(
        p.stat().st_size for p in out.rglob("*") if p.is_file() and "/c/" in str(p) and "block0/" in str(p)
    )
    benchmark.extra_info.update(stored_bytes=stored, ratio=raw / stored)
    back = CaptureStore(open_location(Location(str(out))))
    assert torch.equal(back.site("ffwd_output", 0)[:], outs[2])


ENCODERS = ["blockcap chunk", "zarr chunk", "blockcap shard", "zarr shard"]
SHARD_CHUNKS = 4


def _zarr_pipeline(chunk: tuple[int, ...], shard: tuple[int, ...] | None):
    """zarr's own codec pipeline for float32 [bytes, blosc-lz4, crc32c] chunks (in shards)."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.core.array_spec import ArrayConfig, ArraySpec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.codec_pipeline import BatchedCodecPipeline
    from zarr.core.dtype import parse_dtype

    from blockcap.storage.codecs import compressors

    codecs = [BytesCodec(), *compressors("blosc-lz4")]
    if shard is not None:
        codecs = [ShardingCodec(chunk_shape=chunk, codecs=codecs, index_codecs=[BytesCodec(), Crc32cCodec()])]
    dt = parse_dtype(np.dtype("float32"), zarr_format=3)
    spec = ArraySpec(shape=shard or chunk, dtype=dt, fill_value=dt.cast_scalar(0),
                     config=ArrayConfig.from_dict({}), prototype=default_buffer_prototype())  # fmt: skip
    return BatchedCodecPipeline.from_codecs([c.evolve_from_array_spec(spec) for c in codecs]), spec


@pytest.mark.parametrize("how", ENCODERS)
def test_encoder(benchmark, activations, how):
    """Encoding the same float32 chunks (shards of 4) to the same bytes: CPU seconds per byte."""
    from zarr.core.buffer.cpu import NDBuffer
    from zarr.core.sync import sync

    from blockcap.storage.codecs import ChunkEncoder

    outs = [o.numpy() for o in activations["outs"]]
    cw = _chunk_windows(activations, "float32")
    rows = cw * SHARD_CHUNKS if "shard" in how else cw
    pieces = [o[lo : lo + rows] for o in outs for lo in range(0, len(o) - rows + 1, rows)]
    if not pieces:  # nothing to encode would measure nothing (and compare no bytes)
        pytest.skip(f"{activations['workload']}: {len(outs[0])} windows fill no {how.split()[-1]} of {rows}")
    enc = ChunkEncoder("blosc-lz4")
    inner = outs[0].shape[1:]
    pipe, spec = _zarr_pipeline((cw, *inner), (rows, *inner) if "shard" in how else None)

    def ours(x):
        return bytes(enc.encode_shard(x, cw, rows)[0] if "shard" in how else enc.encode(x)[0])

    def theirs(x):
        return sync(pipe.encode([(NDBuffer.from_numpy_array(x), spec)]))[0].to_bytes()

    fn = ours if how.startswith("blockcap") else theirs
    assert all(ours(x) == theirs(x) for x in pieces[:2])
    cpu: list[float] = []

    def encode_all():
        c0 = time.process_time()
        for x in pieces:
            fn(x)
        cpu.append(time.process_time() - c0)

    benchmark.group = f"encoder-{activations['workload']}"
    benchmark.pedantic(encode_all, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(variant=how, raw_bytes=sum(x.nbytes for x in pieces), cpu_s=min(cpu))


@pytest.fixture(scope="module")
def store(text, models, enabled, tmp_path_factory):
    s = make_setup(text, "bundled", models, WORKLOADS[3], enabled, tmp_path_factory.mktemp("read"))
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    blockcap.run(**s.run_args(out))
    return blockcap.open_store(out)


def test_read_sequential(benchmark, store):
    site = store.site("ffwd_output")
    benchmark.group = "read"
    benchmark.extra_info.update(variant="sequential scan", raw_bytes=site.zarr.nbytes)
    total = benchmark.pedantic(lambda: site[:].shape[0], rounds=ROUNDS, warmup_rounds=1)
    assert total == store.n_windows


def test_read_random_windows(benchmark, store):
    site = store.site("ffwd_output")
    rng = random.Random(0)
    picks = [rng.randrange(store.n_windows) for _ in range(50)]
    benchmark.group = "read"
    benchmark.extra_info.update(variant="random single windows", reads=len(picks))

    def read():
        t0 = time.perf_counter()
        for i in picks:
            site[i]
        return time.perf_counter() - t0

    benchmark.pedantic(read, rounds=ROUNDS, warmup_rounds=1)
