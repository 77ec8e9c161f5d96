"""Analysis: batched top-k search and the training loader, each against a plain sequential scan.

The store is a seed-size char GPT capture (384 wide, 256-token windows, every vector site, block
0; ``BLOCKCAP_BENCH_ANALYSIS_WINDOWS`` windows, 512 by default, as many as the validation split
holds: 435 windows, 1.7 GB raw, on TinyShakespeare; a site of 170 MB at the residual width, so
that a scan's first read and last score, which nothing overlaps, are a small part). Every test
records GB/s of stored float32 (and vectors/s for the loader) and its ratio to the sequential
scan of the same site in ``extra_info``; nothing asserts on time. torch runs two threads.

    pytest benchmarks/test_analysis.py --benchmark-enable -s
"""

from __future__ import annotations

import importlib
import os
import time

import pytest
import torch
from torch.utils.data import DataLoader

import blockcap
from benchmarks.conftest import Workload, make_setup
from blockcap.analysis.search import topk

ROUNDS = int(os.environ.get("BLOCKCAP_BENCH_ROUNDS", "5"))
WINDOWS = int(os.environ.get("BLOCKCAP_BENCH_ANALYSIS_WINDOWS", "512"))
QUERIES = 64
SITES = ["ffwd_output", "mlp_hidden"]  # the residual width, and the widest site (4x)
loader_module = importlib.import_module("blockcap.analysis.loader")
_sequential: dict[str, float] = {}  # site -> best seconds of the sequential scan


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def store(text, models, enabled, tmp_path_factory):
    work = Workload("analysis", 256, 256, 0, WINDOWS, 8)
    s = make_setup(text, "seed", models, work, enabled, tmp_path_factory.mktemp("analysis"))
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    blockcap.run(weights=str(s.weights), dataset=str(s.text_file), split="all", out=str(out), sample_len=256,
                 stride=256, sites="all", device="cpu", progress=False)  # fmt: skip
    return blockcap.open_store(out)


def measure(benchmark, fn, site: str, store, **info) -> float:
    """Run ``fn`` under pytest-benchmark; record GB/s, CPU seconds per GB of this process (all its
    threads; not DataLoader workers) and the ratio to the sequential scan. On a shared machine the
    CPU figure is the steadier one."""
    seconds: list[float] = []
    cpu: list[float] = []

    def timed():
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)

    benchmark.group = f"analysis-{site}"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    nbytes = store.site(site).zarr.nbytes
    best = min(seconds)
    info.update(
        raw_bytes=nbytes,
        gb_per_s=round(nbytes / best / 1e9, 3),
        cpu_s_per_gb=round(min(cpu) / nbytes * 1e9, 2),
    )
    if site in _sequential:
        info["ratio_to_sequential"] = round(_sequential[site] / best, 3)
    benchmark.extra_info.update(info)
    print(f"\n{site} {info}")
    return best


@pytest.mark.parametrize("site", SITES)
def test_sequential_scan(benchmark, store, site):
    arr = store.site(site)
    cw = arr.chunk_windows

    def scan():
        for lo in range(0, arr.shape[0], cw):
            arr[lo : lo + cw]

    _sequential[site] = measure(benchmark, scan, site, store, variant="sequential scan")


@pytest.mark.parametrize("site", SITES)
def test_topk(benchmark, store, site):
    width = store.site(site).shape[-1]
    q = torch.randn(QUERIES, width, generator=torch.Generator().manual_seed(0))
    found = []
    measure(benchmark, lambda: found.append(topk(store, q, site, k=10)), site, store,
            variant=f"topk {QUERIES} queries")  # fmt: skip
    assert len(found[-1]) == QUERIES and all(len(m) == 10 for m in found[-1])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("site", SITES)
def test_loader(benchmark, store, site, workers):
    ds = loader_module.loader(store, site, batch_size=4096)
    data = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    seen = []

    def epoch():
        seen.append(sum(len(batch) for batch in data))

    best = measure(benchmark, epoch, site, store, variant=f"loader, {workers} workers (shuffled)")
    assert seen[-1] == ds.n_vectors
    benchmark.extra_info["vectors_per_s"] = round(ds.n_vectors / best)
