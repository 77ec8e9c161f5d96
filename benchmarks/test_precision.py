"""Lossy storage: compression ratio against the worst relative error, on real activations.

The trained bundled model on TinyShakespeare (``--bench-real-text``), long windows of block 0,
every vector site; one steady capture per precision and codec. Each records the stored bytes
against raw float32, the worst relative error the writer measured (the store's statistics; what
``verify --stats`` re-checks) and its bound, and the capture's speed against the exact capture
of the same codec (same run, same windows).
"""

from __future__ import annotations

import shutil

import pytest

import blockcap
from benchmarks.conftest import ROUNDS, THREADS, Workload, make_setup
from blockcap.run.job import Job

PRECISIONS = ["exact", "keep_bits:16", "keep_bits:12", "keep_bits:10", "keep_bits:8", "keep_bits:6"]
CODECS = ["blosc-lz4", "zstd"]
WORKLOAD = Workload("precision", 256, 256, 0, 64, 8)


@pytest.fixture(scope="module")
def setup(text, models, enabled, tmp_path_factory):
    return make_setup(text, "bundled", models, WORKLOAD, enabled, tmp_path_factory.mktemp("precision"))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("codec", CODECS)
def test_precision(benchmark, setup, tmp_path, codec, precision):
    out = tmp_path / "s.zarr"
    args = setup.run_args(out, sites="all", codec=codec, precision=precision)
    jobs: list[Job] = []

    def fresh_job():
        for job in jobs:
            job.close()
        jobs.clear()
        shutil.rmtree(out, ignore_errors=True)
        jobs.append(Job(**args))
        jobs[0].open()
        return (jobs[0],), {}

    benchmark.group = f"precision-{codec}"
    summary = benchmark.pedantic(lambda job: job.capture(), setup=fresh_job, rounds=ROUNDS, warmup_rounds=1,
                                 iterations=1)  # fmt: skip
    for job in jobs:
        job.close()
    store = blockcap.open_store(out)
    sites = [s for s in store.sites]
    errors = [store.stats(s).max_rel_error or 0.0 for s in sites]
    keep = store.layout.keep_bits
    benchmark.extra_info.update(
        variant=precision, codec=codec, tokens=setup.tokens, windows=len(setup.windows), threads=THREADS,
        raw_bytes=summary.raw_bytes, stored_bytes=summary.stored_bytes, max_rel_error=max(errors),
        bound=2.0 ** -(keep + 1) if keep else 0.0,
    )  # fmt: skip
    assert blockcap.verify(out, check_stats=True) == []
