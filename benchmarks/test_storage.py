"""Storage: write throughput and compression ratio of every codec and dtype; read speed.

Activations are real captures of the trained bundled model on TinyShakespeare when
``--bench-real-text`` (or ``BLOCKCAP_TEST_DATASET``) is given, else on synthetic text.
"""

from __future__ import annotations

import os
import random
import shutil
import time

import numpy as np
import pytest
import torch
import zarr

import blockcap
from benchmarks.conftest import WORKLOADS, make_setup
from blockcap.capture import CaptureModule
from blockcap.codecs import DTYPES, compressors
from blockcap.store import choose_chunk_windows

ROUNDS = int(os.environ.get("BLOCKCAP_BENCH_ROUNDS", "5"))
CODECS = ["none", "blosc-lz4", "blosc-zstd", "zstd:1", "zstd:3"]


@pytest.fixture(scope="module", params=[w for w in WORKLOADS if w.block == 0], ids=lambda w: w.name)
def activations(request, text, models, enabled, tmp_path_factory) -> dict[str, torch.Tensor]:
    """heads/proj/ffwd of block 0 of the bundled model, float32, (windows, T, C) each."""
    s = make_setup(text, "bundled", models, request.param, enabled, tmp_path_factory.mktemp("act"))
    module = CaptureModule(s.model, (0,), ("heads_output", "proj_output", "ffwd_output"))
    with torch.inference_mode():
        parts = [module(s.windows[i : i + 64]) for i in range(0, len(s.windows), 64)]
    return {
        "workload": request.param.name,
        **{k: torch.cat([p[i] for p in parts]) for i, k in enumerate(("heads", "proj", "ffwd"))},
    }


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("codec", CODECS)
def test_write(benchmark, activations, tmp_path, codec, dtype):
    sd = DTYPES[dtype]
    tensors = [activations[k] for k in ("heads", "proj", "ffwd")]
    raw = sum(t.numel() * 4 for t in tensors)
    n, T, C = tensors[0].shape
    cw = choose_chunk_windows(64, T * C * sd.zarr_dtype.itemsize, n)
    out = tmp_path / "w.zarr"

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        g = zarr.open_group(str(out), mode="w")
        arrays = [
            g.create_array(
                k,
                shape=t.shape,
                chunks=(cw, T, C),
                dtype=sd.zarr_dtype,
                compressors=compressors(codec),
                config={"write_empty_chunks": True},
            )
            for k, t in zip(("a", "b", "c"), tensors, strict=True)
        ]
        return (arrays,), {}

    def write(arrays):
        for arr, t in zip(arrays, tensors, strict=True):
            arr[:] = sd.to_numpy(t.to(sd.torch_dtype))

    benchmark.group = f"storage-{activations['workload']}"
    benchmark.extra_info.update(variant=f"{codec}/{dtype}", raw_bytes=raw)
    benchmark.pedantic(write, setup=fresh, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    stored = _dir_bytes(out)
    benchmark.extra_info.update(stored_bytes=stored, ratio=raw / stored)
    back = torch.from_numpy(np.asarray(zarr.open_group(str(out), mode="r")["c"][:]))
    if dtype == "bfloat16":
        back = back.view(torch.bfloat16)
    assert torch.equal(back, tensors[2].to(sd.torch_dtype))


@pytest.fixture(scope="module")
def store(text, models, enabled, tmp_path_factory):
    s = make_setup(text, "bundled", models, WORKLOADS[1], enabled, tmp_path_factory.mktemp("read"))
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    blockcap.run(
        weights=str(s.weights),
        dataset=str(s.text_file),
        split="all",
        out=str(out),
        sample_len=256,
        stride=256,
        device="cpu",
        progress=False,
    )
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
