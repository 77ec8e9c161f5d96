"""Workloads shared by the benchmarks.

Full runs: ``pytest benchmarks --benchmark-enable --benchmark-json=bench.json`` then
``python -m benchmarks.report bench.json``. CI runs them with ``--benchmark-disable`` (the default
in pyproject): each body once, on a few windows, so the suite cannot rot.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from blockcap.capture.chargpt.checkpoint import load_checkpoint, save_checkpoint
from blockcap.capture.chargpt.model import GPT, PRESETS
from blockcap.data.tokenizers import CharTokenizer
from blockcap.data.windows import split_tokens
from tests.conftest import pytest_configure  # noqa: F401 - token caches in a temporary directory

THREADS = int(os.environ.get("BLOCKCAP_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("BLOCKCAP_BENCH_ROUNDS", "3"))
LONG_WINDOWS = int(os.environ.get("BLOCKCAP_BENCH_LONG_WINDOWS", "128"))  # of 435 in the val split


def pytest_addoption(parser):
    parser.addoption(
        "--bench-real-text",
        default=os.environ.get("BLOCKCAP_TEST_DATASET"),
        help="TinyShakespeare text for realistic activations (default: synthetic text)",
    )


@dataclass(frozen=True)
class Workload:
    name: str
    sample_len: int
    stride: int
    block: int
    max_windows: int | None  # None: the whole val split
    batch_size: int


WORKLOADS = [
    Workload("orig-cli", 3, 96, 0, None, 64),  # the original experiment's settings: 1,162 windows
    Workload("orig-s3", 3, 3, 0, None, 64),  # every token of the val split once: 111,540 tokens
    Workload("orig-s1", 3, 1, 0, None, 64),  # every 3-token window: 111,538 windows
    Workload("long-b0", 256, 256, 0, LONG_WINDOWS, 8),  # 2,048 tokens a batch
    Workload("long-b5", 256, 256, 5, LONG_WINDOWS, 8),
]


@dataclass
class Setup:
    """One model on one workload: the model, the windows as a tensor, and a text file holding them."""

    model: GPT
    weights: Path
    windows: torch.Tensor  # (n, sample_len) int64
    text_file: Path  # its "all" split yields exactly ``windows``
    workload: Workload
    name: str  # the model's name in the report

    @property
    def batch_size(self) -> int:
        return self.workload.batch_size

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    def run_args(self, out: Path, **extra) -> dict:
        """``blockcap.run`` arguments capturing exactly ``windows``."""
        w = self.workload
        return {
            "weights": str(self.weights), "dataset": str(self.text_file), "split": "all", "out": str(out),
            "sample_len": w.sample_len, "stride": w.stride, "batch_size": w.batch_size, "block_idx": w.block,
            "device": "cpu", "progress": False, **extra,
        }  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def enabled(request) -> bool:
    cfg = request.config
    return bool(cfg.getoption("benchmark_enable")) or not cfg.getoption("benchmark_disable")


@pytest.fixture(scope="session")
def text(request) -> str:
    path = request.config.getoption("--bench-real-text")
    if path and Path(path).is_file():
        return Path(path).read_text()
    from tests.conftest import make_text

    vocab = load_checkpoint().vocab
    return make_text(1_200_000) + vocab  # every character of the vocabulary appears


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, tuple[GPT, Path]]:
    """The bundled trained model and a seed-size (384/6/6/256) model, random-init but real size."""
    bundled = load_checkpoint()
    torch.manual_seed(0)
    seed = GPT(replace(PRESETS["seed"], vocab_size=len(bundled.vocab))).eval()
    path = tmp_path_factory.mktemp("w") / "seed.pt"
    save_checkpoint(path, seed, bundled.vocab, {"note": "random init, seed size"})
    return {"bundled": (bundled.model, bundled.path), "seed": (seed, path)}


def make_setup(text: str, model_name: str, models, workload: Workload, enabled: bool, tmp: Path) -> Setup:
    model, weights = models[model_name]
    tok = CharTokenizer(load_checkpoint(weights).vocab)
    val = split_tokens(torch.from_numpy(tok.encode(text)), "val")
    windows = val.unfold(0, workload.sample_len, workload.stride)
    limit = workload.max_windows if enabled else 4
    if limit is not None:
        windows = windows[:limit]
    n = len(windows)
    stream = val[: (n - 1) * workload.stride + workload.sample_len]
    text_file = tmp / f"{workload.name}.txt"
    text_file.write_text(tok.decode(stream.tolist()))
    label = f"{model.config.n_embed}d"
    return Setup(copy.deepcopy(model), weights, windows.contiguous(), text_file, workload, label)
