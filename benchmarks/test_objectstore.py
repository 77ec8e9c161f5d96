"""Object storage: the same steady capture into a local directory and into S3 (a local moto server).

The server runs in this process and shares its two cores with the capture, so the S3 figure is a
floor for a real endpoint; the report gives stored MB/s for both and their ratio.
"""

from __future__ import annotations

import shutil

import pytest

import blockcap
from benchmarks.conftest import ROUNDS, THREADS, WORKLOADS, make_setup
from blockcap.run.job import Job
from tests.s3server import bucket, s3_server  # noqa: F401  (fixtures)

WORKLOAD = next(w for w in WORKLOADS if w.name == "long-b0")


@pytest.fixture(scope="module")
def setup(text, models, enabled, tmp_path_factory):
    return make_setup(text, "seed", models, WORKLOAD, enabled, tmp_path_factory.mktemp("s3"))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_capture_into(benchmark, setup, tmp_path, s3_server, bucket, where):  # noqa: F811
    out = f"s3://{bucket}/s.zarr" if where == "s3" else str(tmp_path / "s.zarr")
    extra = {"storage_options": s3_server["json"]} if where == "s3" else {}
    args = setup.run_args(out, **extra)
    jobs: list[Job] = []

    def fresh_job():  # untimed: plan and store creation
        for job in jobs:
            job.close()
        jobs.clear()
        if where == "s3":
            if s3_server["fs"].exists(out):
                s3_server["fs"].rm(out, recursive=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
        jobs.append(Job(**args))
        jobs[0].open()
        return (jobs[0],), {}

    benchmark.group = f"objectstore-{setup.name}-{WORKLOAD.name}"
    benchmark.extra_info.update(variant=where, windows=len(setup.windows), threads=THREADS)
    summary = benchmark.pedantic(
        lambda job: job.capture(), setup=fresh_job, rounds=ROUNDS, warmup_rounds=1, iterations=1
    )
    benchmark.extra_info.update(stored_bytes=summary.stored_bytes, raw_bytes=summary.raw_bytes)
    for job in jobs:
        job.close()
    assert summary.status == "complete"
    assert (
        blockcap.open_store(out, storage_options=extra.get("storage_options"))
        .tokens[:]
        .long()
        .equal(setup.windows)
    )
