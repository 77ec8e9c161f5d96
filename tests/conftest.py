"""Shared fixtures: a small synthetic corpus and small random models, made fresh, offline."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from blockcap.capture.chargpt.checkpoint import save_checkpoint
from blockcap.capture.chargpt.model import GPT, GPTConfig
from blockcap.data.tokenizers import CharTokenizer

REAL_DATASET_ENV = "BLOCKCAP_TEST_DATASET"


def pytest_configure(config):
    """Token caches of the whole session (subprocesses included) in a temporary directory, never
    under the user's own cache."""
    import tempfile

    os.environ.setdefault("BLOCKCAP_TOKEN_CACHE", tempfile.mkdtemp(prefix="blockcap-test-tokens-"))


TINY = GPTConfig(vocab_size=1, n_embed=32, n_head=4, n_layer=3, block_size=32, dropout=0.0)


def make_text(n_chars: int = 6000, seed: int = 0) -> str:
    """Shakespeare-ish lines from a fixed word list: deterministic and small."""
    rng = random.Random(seed)
    words = [
        "thou",
        "art",
        "the",
        "king",
        "my",
        "lord",
        "and",
        "shall",
        "not",
        "be",
        "what",
        "is",
        "love;",
        "fair",
        "sweet!",
        "O",
        "death,",
        "come",
        "hither?",
    ]
    lines, size = [], 0
    while size < n_chars:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n")
        size += len(lines[-1])
    return "".join(lines)[:n_chars]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(make_text())
    return path


@pytest.fixture(scope="session")
def tiny_model(text_file) -> tuple[GPT, CharTokenizer]:
    tok = CharTokenizer.from_text(text_file.read_text())
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY.to_dict(), "vocab_size": len(tok)})).eval()
    return model, tok


@pytest.fixture(scope="session")
def ckpt(tiny_model, tmp_path_factory) -> Path:
    model, tok = tiny_model
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, model, tok.vocab, {"note": "random init for tests"})
    return path


@pytest.fixture
def run_args(ckpt, text_file, tmp_path) -> dict:
    """Arguments for a quick ``blockcap.run`` on the tiny model and corpus."""
    return {
        "weights": str(ckpt),
        "dataset": str(text_file),
        "out": str(tmp_path / "s.zarr"),
        "sample_len": 8,
        "stride": 5,
        "batch_size": 16,
        "progress": False,
    }


@pytest.fixture(scope="session")
def real_dataset() -> Path:
    """The real TinyShakespeare text when a path is given by environment; skipped otherwise."""
    p = os.environ.get(REAL_DATASET_ENV)
    if not p or not Path(p).is_file():
        pytest.skip(f"set {REAL_DATASET_ENV} to the TinyShakespeare text to run this test")
    return Path(p)


def small_store(ckpt, dataset, out, **kw):
    """A quick capture of the tiny model (several 4-window chunks), opened; ``kw`` overrides.

    ``ckpt`` None captures with the bundled model. An incomplete store opens without its warning.
    """
    import warnings

    import blockcap
    from blockcap.analysis.reader import IncompleteStoreWarning

    args = dict(weights=ckpt and str(ckpt), dataset=str(dataset), out=str(out), sample_len=8, stride=5,
                batch_size=16, chunk_windows=4, progress=False)  # fmt: skip
    blockcap.run(**{**args, **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteStoreWarning)
        return blockcap.open_store(out)


from tests.hf_models import hf_text_fixture, hf_zoo_fixture  # noqa: E402, F401  (fixtures hf_text, hf_zoo)
