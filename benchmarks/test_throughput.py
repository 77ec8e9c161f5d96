"""Throughput: bare forward vs the original experiment vs blockcap, like for like.

Every contender of one model and workload shares a benchmark group, the same windows, batch size
and thread count, so the report's ratios compare like with like within one pytest run. Two
figures each: *steady* (model and windows in memory; blockcap's plan built and store created
before the timer, which covers computing, encoding, writing and committing every window) and
*whole* (everything a user waits for, loading weights and text included, for every contender).
"""

from __future__ import annotations

import shutil
import statistics
import time

import pytest

import blockcap
from benchmarks.baselines import bare_forward, load_like_a_user, original_experiment
from benchmarks.conftest import ROUNDS, THREADS, WORKLOADS, make_setup
from blockcap.run.job import Job

CASES = [(m, w) for m in ("bundled", "seed") for w in WORKLOADS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{w.name}" for m, w in CASES])
def setup(request, text, models, enabled, tmp_path_factory):
    model_name, workload = request.param
    return make_setup(text, model_name, models, workload, enabled, tmp_path_factory.mktemp(workload.name))


def measure(benchmark, setup, variant: str, fn, fresh=None):
    """Time ``fn``; also record the CPU seconds it took per wall second (``cores_busy``, the median
    round's), the figure that says whether a core was left idle for the writers to use."""
    benchmark.group = f"{setup.name}-{setup.workload.name}"
    benchmark.extra_info.update(
        variant=variant, tokens=setup.tokens, windows=len(setup.windows), threads=THREADS
    )
    busy: list[float] = []

    def timed(*args):
        cpu, wall = time.process_time(), time.perf_counter()  # CPU time of every thread of the process
        result = fn(*args)
        busy.append((time.process_time() - cpu) / (time.perf_counter() - wall))
        return result

    result = benchmark.pedantic(timed, setup=fresh, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["cores_busy"] = statistics.median(busy[1:] or busy)  # the warmup left out
    return result


@pytest.mark.parametrize("how", ["steady", "whole"])
def test_bare(benchmark, setup, how):
    w = setup.workload

    def whole():
        model, windows = load_like_a_user(setup.weights, setup.text_file, w.sample_len, w.stride)
        bare_forward(model, windows, w.block, setup.batch_size)

    def steady():
        bare_forward(setup.model, setup.windows, w.block, setup.batch_size)

    measure(benchmark, setup, f"bare-{how}", steady if how == "steady" else whole)


def test_bare_fused(benchmark, setup):
    if setup.workload.sample_len < 16:
        pytest.skip("fused attention is for long windows")
    w = setup.workload

    def fused():
        bare_forward(setup.model, setup.windows, w.block, setup.batch_size, fused=True)

    measure(benchmark, setup, "bare-fused-steady", fused)


@pytest.mark.parametrize("how", ["steady", "whole"])
def test_original(benchmark, setup, tmp_path, how):
    w, out = setup.workload, tmp_path / "pt"

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()

    def whole():
        model, windows = load_like_a_user(setup.weights, setup.text_file, w.sample_len, w.stride)
        return original_experiment(model, windows, w.block, setup.batch_size, out)

    def steady():
        return original_experiment(setup.model, setup.windows, w.block, setup.batch_size, out)

    files = measure(benchmark, setup, f"original-{how}", steady if how == "steady" else whole, fresh)
    assert files == 4 * -(-len(setup.windows) // setup.batch_size)


VARIANTS = {
    "float32": {"dtype": "float32"},
    "nostats": {"stats": False},
    "bfloat16": {"dtype": "bfloat16"},
    "dedup": {"dedup": True},
    "fused": {"fused": True},
}


@pytest.mark.parametrize("how", ["steady", "whole"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_blockcap(benchmark, setup, tmp_path, variant, how):
    long = setup.workload.sample_len >= 16
    if (variant == "dedup" and long) or (variant == "fused" and not long):
        pytest.skip("dedup is for short windows, fused attention for long ones")
    if how == "whole" and variant in ("bfloat16", "fused", "nostats"):
        pytest.skip("whole-run figures for float32 and dedup only")
    out = tmp_path / "s.zarr"
    args = setup.run_args(out, **VARIANTS[variant])
    jobs: list[Job] = []

    def fresh_store():
        shutil.rmtree(out, ignore_errors=True)
        for job in jobs:
            job.close()
        jobs.clear()

    def fresh_job():  # untimed: plan (weights, text, windows) and store creation
        fresh_store()
        jobs.append(Job(**args))
        jobs[0].open()
        return (jobs[0],), {}

    if how == "whole":
        summary = measure(
            benchmark, setup, f"blockcap-{variant}-whole", lambda: blockcap.run(**args), fresh_store
        )
    else:
        summary = measure(
            benchmark, setup, f"blockcap-{variant}-steady", lambda job: job.capture(), fresh_job
        )
    for job in jobs:
        job.close()
    assert summary.status == "complete" and summary.n_windows == len(setup.windows)
    store = blockcap.open_store(out)
    assert store.tokens[:].long().equal(setup.windows)
    benchmark.extra_info["split"] = store.meta.get("split", {}).get("chosen", "-")  # the last round's
