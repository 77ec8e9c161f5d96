"""Durability: what fsync costs (each object, and the directory entries naming it, on disk before
its unit's commit record), against ``fsync=False``, like for like: same model, windows, batch size
and threads, in one run, steady state (plan built and store created before the timer).

Run: ``pytest benchmarks/test_durability.py --benchmark-enable --benchmark-json=durability.json``;
the ratio is ``fsync`` time over ``no-fsync`` time per group.
"""

from __future__ import annotations

import shutil

import pytest

import blockcap
from benchmarks.conftest import ROUNDS, THREADS, WORKLOADS, make_setup
from blockcap.run.job import Job

CASES = [w for w in WORKLOADS if w.name in ("orig-s3", "long-b0")]  # many small units; few big ones


@pytest.fixture(scope="module", params=CASES, ids=[w.name for w in CASES])
def setup(request, text, models, enabled, tmp_path_factory):
    return make_setup(text, "bundled", models, request.param, enabled, tmp_path_factory.mktemp("durable"))


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_capture(benchmark, setup, tmp_path, fsync):
    out = tmp_path / "s.zarr"
    args = setup.run_args(out, fsync=fsync)
    jobs: list[Job] = []

    def fresh_job():  # untimed: plan and store creation
        shutil.rmtree(out, ignore_errors=True)
        for job in jobs:
            job.close()
        jobs.clear()
        jobs.append(Job(**args))
        jobs[0].open()
        return (jobs[0],), {}

    benchmark.group = f"durability-{setup.workload.name}"
    benchmark.extra_info.update(variant="fsync" if fsync else "no-fsync", windows=len(setup.windows),
                                threads=THREADS)  # fmt: skip
    summary = benchmark.pedantic(lambda job: job.capture(), setup=fresh_job, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update(units=blockcap.open_store(out).layout.n_units)
    for job in jobs:
        job.close()
    assert summary.status == "complete" and summary.n_windows == len(setup.windows)
