"""The data path at corpus scale, as ratios measured in one run (no wall-clock assertions):

* tokenization: building the token cache of a jsonl corpus against the tokenizers library's raw
  batch encoding of the same documents (in memory, same batches), every core;
* memory: peak RSS of a whole run (tokens cached first, sparse windows) over a corpus 10x larger;
* linear time: a SentencePiece-style tokenizer on one 4x longer document;
* time to the first batch once tokens are cached, on corpora 10x apart.

Each figure goes to ``.benchmarks/data-*.json`` for ``python -m benchmarks.report``. Sizes are tiny
when benchmarks are disabled (CI runs each body once); ``--benchmark-enable`` uses the real ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_text
from tests.tokenizer_kinds import tokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".benchmarks"


def record(name: str, **figures) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"data-{name}.json").write_text(json.dumps(figures))
    print(
        f"\n{name}: "
        + ", ".join(f"{k} {v:,.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    )


def jsonl(path: Path, n_docs: int, seed: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": make_text(2000 + (i * 7919) % 3000, seed=seed + i % 50)}) + "\n")
    return path


def test_tokenization_throughput_against_raw_batch_encoding(tmp_path, enabled):
    from blockcap.data.cache import build_cache
    from blockcap.data.encode import BATCH_CHARS
    from blockcap.data.inputs import list_inputs

    tok = tokenizer("bytelevel")
    data = jsonl(tmp_path / "c.jsonl", 6000 if enabled else 50)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    batches, batch, size = [], [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= BATCH_CHARS:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    raw, ours = [], []
    for r in range(3 if enabled else 1):
        t0 = time.perf_counter()
        n_raw = sum(
            len(e.ids) for b in batches for e in tok.backend.encode_batch_fast(b, add_special_tokens=False)
        )
        raw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cache = build_cache(list_inputs(str(data)), tok, None, tmp_path / f"tokens{r}")
        ours.append(time.perf_counter() - t0)
    assert cache.n_tokens == n_raw
    record("tokenize", mb=data.stat().st_size / 1e6, tokens=n_raw, raw_tok_s=n_raw / min(raw),
           cache_tok_s=n_raw / min(ours), ratio=min(raw) / min(ours))  # fmt: skip


RUN = """
import json, resource, sys, time, torch
torch.set_num_threads(2)
import blockcap
t0 = time.perf_counter()
s = blockcap.run(**json.loads(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - t0, "windows": getattr(s, "n_windows", 0),
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_child(args: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(args)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, enabled) -> dict[int, Path]:
    """Text corpora of 20 MB and 200 MB (tiny when disabled), the characters of the bundled model."""
    from blockcap.capture.chargpt.checkpoint import load_checkpoint

    vocab = load_checkpoint().vocab
    d = tmp_path_factory.mktemp("corpora")
    block = make_text(1 << 20) + vocab
    out = {}
    for mb in (20, 200) if enabled else (1, 10):
        path = d / f"c{mb}.txt"
        with open(path, "w") as f:
            for _ in range(mb):
                f.write(block)
        out[mb] = path
    return out


def test_peak_memory_does_not_grow_with_the_corpus(corpora, tmp_path):
    figures = {}
    for mb, path in corpora.items():
        args = {"dataset": str(path), "stride": 200_000, "split": "all", "out": str(tmp_path / f"s{mb}.zarr"),
                "device": "cpu", "progress": False, "token_cache": str(tmp_path / "tokens")}  # fmt: skip
        run_child({**args, "dry_run": True, "out": str(tmp_path / "dry.zarr")})  # tokens cached first
        figures[mb] = run_child(args)
    small, large = (figures[k] for k in sorted(figures))
    record("memory", small_mb=min(figures), large_mb=max(figures), small_rss_mb=small["maxrss"] / 1e6,
           large_rss_mb=large["maxrss"] / 1e6, ratio=large["maxrss"] / small["maxrss"],
           windows=f"{small['windows']} / {large['windows']}")  # fmt: skip


def test_sentencepiece_style_time_is_linear(tmp_path, enabled):
    from blockcap.data.cache import build_cache
    from blockcap.data.inputs import list_inputs

    tok = tokenizer("sentencepiece")
    seconds = {}
    for mb in (8, 32) if enabled else (1, 4):
        path = tmp_path / f"d{mb}.txt"
        path.write_text(make_text(mb << 20, seed=mb))
        t0 = time.perf_counter()
        cache = build_cache(list_inputs(str(path)), tok, None, tmp_path / f"tokens{mb}")
        seconds[mb] = time.perf_counter() - t0
    small, large = sorted(seconds)
    record("linear", small_mb=small, large_mb=large, small_s=seconds[small], large_s=seconds[large],
           ratio=seconds[large] / seconds[small], size_ratio=large / small,
           hard_cuts=int(cache.meta["hard_cuts"]))  # fmt: skip


FIRST = """
import json, sys, time, torch
torch.set_num_threads(2)
t0 = time.perf_counter()
from blockcap.run.job import Job
job = Job(**json.loads(sys.argv[1]))
batch = job.plan.schedule.batch(0)
with torch.inference_mode():
    job.plan.module(batch.ids)
print(json.dumps({"seconds": time.perf_counter() - t0}))
job.close()
"""


def test_time_to_the_first_batch_with_cached_tokens(corpora, tmp_path, enabled):
    figures = {}
    for mb, path in corpora.items():
        args = {"dataset": str(path), "split": "all", "out": str(tmp_path / f"s{mb}.zarr"),
                "device": "cpu", "progress": False, "token_cache": str(tmp_path / "tokens")}  # fmt: skip
        run_child({**args, "dry_run": True})  # tokens cached first
        runs = [subprocess.run([sys.executable, "-c", FIRST, json.dumps(args)], cwd=ROOT, capture_output=True,
                               text=True, check=True) for _ in range(2 if enabled else 1)]  # fmt: skip
        figures[mb] = min(json.loads(r.stdout.strip().splitlines()[-1])["seconds"] for r in runs)
    small, large = sorted(figures)
    record("first-batch", small_mb=small, large_mb=large, small_s=figures[small], large_s=figures[large],
           ratio=figures[large] / figures[small])  # fmt: skip
