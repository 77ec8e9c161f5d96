"""Throughput: bare forward vs the original experiment vs blockcap's full ``run`` pipeline.

All variants of one model and workload share a benchmark group, the same windows, batch size and
thread count, so the report's ratios compare like with like within one pytest run.
"""

from __future__ import annotations

import os
import shutil

import pytest

import blockcap
from benchmarks.baselines import bare_forward, original_experiment
from benchmarks.conftest import WORKLOADS, make_setup

ROUNDS = int(os.environ.get("BLOCKCAP_BENCH_ROUNDS", "5"))
CASES = [(m, w) for m in ("bundled", "seed") for w in WORKLOADS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{w.name}" for m, w in CASES])
def setup(request, text, models, enabled, tmp_path_factory):
    model_name, workload = request.param
    return make_setup(text, model_name, models, workload, enabled, tmp_path_factory.mktemp(workload.name))


def measure(benchmark, setup, variant: str, fn, fresh=None):
    benchmark.group = f"{setup.model.config.n_embed}d-{setup.workload.name}"
    benchmark.extra_info.update(
        variant=variant,
        tokens=setup.tokens,
        windows=len(setup.windows),
        threads=int(os.environ.get("BLOCKCAP_BENCH_THREADS", "2")),
    )
    return benchmark.pedantic(fn, setup=fresh, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def test_bare(benchmark, setup):
    measure(
        benchmark,
        setup,
        "bare",
        lambda: bare_forward(setup.model, setup.windows, setup.workload.block, setup.batch_size),
    )


def test_original(benchmark, setup, tmp_path):
    def fresh():
        shutil.rmtree(tmp_path / "pt", ignore_errors=True)
        (tmp_path / "pt").mkdir()

    files = measure(
        benchmark,
        setup,
        "original",
        lambda: original_experiment(
            setup.model, setup.windows, setup.workload.block, setup.batch_size, tmp_path / "pt"
        ),
        fresh,
    )
    assert files == 4 * -(-len(setup.windows) // setup.batch_size)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_blockcap(benchmark, setup, tmp_path, dtype):
    out = tmp_path / "s.zarr"
    args = dict(
        weights=str(setup.weights),
        dataset=str(setup.text_file),
        split="all",
        out=str(out),
        sample_len=setup.workload.sample_len,
        stride=setup.workload.stride,
        batch_size=setup.batch_size,
        block_idx=setup.workload.block,
        dtype=dtype,
        device="cpu",
        progress=False,
    )
    summary = measure(
        benchmark,
        setup,
        f"blockcap-{dtype}",
        lambda: blockcap.run(**args),
        lambda: shutil.rmtree(out, ignore_errors=True),
    )
    assert summary.status == "complete" and summary.n_windows == len(setup.windows)
    assert blockcap.open_store(out).tokens[:].long().equal(setup.windows)
