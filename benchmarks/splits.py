"""The evidence behind two defaults: torch keeps every core (no thread split), and Blosc lz4 stays.

    python -m benchmarks.splits --text=tinyshakespeare.txt --workload=orig-s3 [--rounds=3]

Seed-size model (384/6/6/256, random init), the workload's windows of the val split, steady
capture (plan built and store created before the timer), every variant timed in turn in each
round of one process; prints the median seconds and bare / variant (higher is better).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.baselines import bare_forward, original_experiment
from benchmarks.conftest import WORKLOADS, make_setup
from blockcap.capture.chargpt.checkpoint import load_checkpoint, save_checkpoint
from blockcap.capture.chargpt.model import GPT, PRESETS
from blockcap.run.job import Job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True, help="TinyShakespeare text")
    ap.add_argument("--workload", default="orig-s3", choices=[w.name for w in WORKLOADS])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    bundled = load_checkpoint()
    torch.manual_seed(0)
    seed = GPT(replace(PRESETS["seed"], vocab_size=len(bundled.vocab))).eval()
    save_checkpoint(tmp / "seed.pt", seed, bundled.vocab, {"note": "random init, seed size"})
    w = next(x for x in WORKLOADS if x.name == a.workload)
    setup = make_setup(Path(a.text).read_text(), "seed", {"seed": (seed, tmp / "seed.pt")}, w, True, tmp)
    out = tmp / "s.zarr"

    def capture(threads: int, writers: int, **kw) -> float:
        torch.set_num_threads(threads)
        shutil.rmtree(out, ignore_errors=True)
        job = Job(**setup.run_args(out, writers=writers, **kw))
        job.open()
        t = time.perf_counter()
        job.capture()
        seconds = time.perf_counter() - t
        job.close()
        return seconds

    def timed(threads: int, fn) -> float:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def original() -> None:
        shutil.rmtree(tmp / "pt", ignore_errors=True)
        (tmp / "pt").mkdir()
        original_experiment(setup.model, setup.windows, w.block, setup.batch_size, tmp / "pt")

    def bare() -> None:
        bare_forward(setup.model, setup.windows, w.block, setup.batch_size)

    variants = {
        "bare, 2 threads": lambda: timed(2, bare),
        "bare, 1 thread": lambda: timed(1, bare),
        "original, 2 threads": lambda: timed(2, original),
        "blockcap, 2 threads + 2 writers": lambda: capture(2, 2),
        "blockcap, 1 thread + 1 writer": lambda: capture(1, 1),
        "blockcap, 1 thread + 2 writers": lambda: capture(1, 2),
        "blockcap, codec none": lambda: capture(2, 2, codec="none"),
        "blockcap, statistics off": lambda: capture(2, 2, stats=False),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(a.rounds):
        for k, fn in variants.items():
            times[k].append(fn())
    base = statistics.median(times["bare, 2 threads"])
    print(f"{a.workload}: {len(setup.windows)} windows x {w.sample_len}, median of {a.rounds}")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:34s} {m:7.2f} s   bare / this {base / m:5.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
