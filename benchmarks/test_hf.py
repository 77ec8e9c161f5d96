"""Hugging Face models: blockcap's steady capture against a bare forward of the same blocks, same run.

Tiny GPT-2, Llama, Gemma 2 and Mixtral configs (d_model 64) at 64-token windows, and a
GPT-2-small-shaped random model (12 layers, d_model 768, 12 heads) at 256-token windows, block 5.
The bare forward is the transformers model itself (eager attention, no cache) cut after the
captured block.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.conftest import ROUNDS, THREADS
from blockcap.data.tokenizers import HFTokenizer
from blockcap.data.windows import split_tokens
from blockcap.run.job import Job
from tests.hf_models import NEEDS_TRANSFORMERS, hf_text_fixture, hf_zoo_fixture, make_text  # noqa: F401

pytestmark = NEEDS_TRANSFORMERS

CASES = {
    "tiny-gpt2": ("gpt2", {}, 64, 2, 16),
    "tiny-llama": ("llama", {}, 64, 2, 16),
    "tiny-gemma2": ("gemma2", {}, 64, 2, 16),  # norms on both sides, softcapped sliding-window attention
    "tiny-mixtral": ("mixtral", {}, 64, 2, 16),  # a sparse mixture-of-experts block
    "gpt2-small-shape": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 256}, 256, 5, 8),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, hf_zoo, enabled, tmp_path_factory):
    variant, overrides, sample_len, block, batch = CASES[request.param]
    directory = hf_zoo(variant, **overrides)
    data = tmp_path_factory.mktemp("hf_bench") / "text.txt"
    data.write_text(make_text(400_000 if enabled else 20_000, seed=7))
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    ids = torch.from_numpy(HFTokenizer(tok.backend_tokenizer.to_str()).encode(Path(data).read_text()))
    windows = split_tokens(ids, "all").unfold(0, sample_len, sample_len)[: 256 if enabled else 4]
    model = AutoModel.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    layers = "h" if hasattr(model, "h") else "layers"
    setattr(model, layers, getattr(model, layers)[: block + 1])  # the bare forward stops there too
    model.config.num_hidden_layers = block + 1
    data.write_text(tok.decode(ids[: len(windows) * sample_len].tolist()))  # exactly those windows
    return {"name": request.param, "dir": directory, "data": data, "windows": windows, "model": model,
            "block": block, "batch": batch, "sample_len": sample_len}  # fmt: skip


def _measure(benchmark, case, variant, fn, fresh=None):
    benchmark.group = f"hf-{case['name']}"
    w = case["windows"]
    benchmark.extra_info.update(variant=variant, tokens=w.numel(), windows=len(w), threads=THREADS)
    return benchmark.pedantic(fn, setup=fresh, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def test_bare(benchmark, case):
    w, bs, model = case["windows"], case["batch"], case["model"]

    def bare():
        with torch.inference_mode():
            for i in range(0, len(w), bs):
                model(w[i : i + bs], use_cache=False)

    _measure(benchmark, case, "bare-steady", bare)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blockcap(benchmark, case, tmp_path, dtype):
    out = tmp_path / "s.zarr"
    args = {"model": str(case["dir"]), "dataset": str(case["data"]), "split": "all", "out": str(out),
            "sample_len": case["sample_len"], "stride": case["sample_len"], "batch_size": case["batch"],
            "block_idx": case["block"], "dtype": dtype, "device": "cpu", "progress": False}  # fmt: skip
    jobs: list[Job] = []

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        for job in jobs:
            job.close()
        jobs[:] = [Job(**args)]
        jobs[0].open()
        return (jobs[0],), {}

    summary = _measure(benchmark, case, f"blockcap-{dtype}-steady", lambda job: job.capture(), fresh)
    jobs[0].close()
    assert summary.status == "complete" and summary.n_windows == len(case["windows"])
