"""The split of cores between forward and writers: timed on the first batches, the faster kept,
recorded in the store, and without effect on what is stored."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch

import blockcap
from blockcap.run.split import ORDER, SplitTrial
from tests import crashkit


class Background:
    idle = True


def test_trial_order_choice_and_restore(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bg = Background()
        trial = SplitTrial(torch.device("cpu"), n_batches=40, window=3, background=bg)
        seen, clock = [], [0.0]
        split_module = importlib.import_module("blockcap.run.split")
        monkeypatch.setattr(split_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
        for r in range(40):
            trial.before(r)
            seen.append((torch.get_num_threads(), bg.idle))
            clock[0] += 1.0 if torch.get_num_threads() == 2 else 0.5  # one thread fewer is faster here
            trial.after(r, 10)
        tried = [seen[k * 3] for k in range(len(ORDER))]
        assert tried == [(2, True), (1, False), (1, False), (2, True)]
        assert seen[len(ORDER) * 3 :] == [(1, False)] * (40 - len(ORDER) * 3)
        record = trial.record()
        assert record["chosen"] == "1 torch threads, writers at normal priority"
        assert record["items_per_s"] == {"2 torch threads, writers at idle priority": 10.0,
                                         "1 torch threads, writers at normal priority": 20.0}  # fmt: skip
        trial.restore()
        assert torch.get_num_threads() == 2 and not bg.idle  # writes left after a stop: normal priority
        short = SplitTrial(torch.device("cpu"), n_batches=10, window=3, background=bg)
        assert "why" in short.record() and not short.candidates
    finally:
        torch.set_num_threads(threads)


def test_without_a_trial_the_writers_run_at_normal_priority():
    """A GPU run, a one-thread run, a short run: nothing measured says idling pays, and idle
    writers starve behind any busy process on the machine."""
    threads = torch.get_num_threads()
    try:
        for device, n, batches in (("cpu", 1, 40), ("cpu", 2, 10), ("meta", 2, 40)):
            torch.set_num_threads(n)
            bg = Background()
            trial = SplitTrial(torch.device(device), n_batches=batches, window=3, background=bg)
            assert not trial.candidates and not bg.idle
            assert trial.record()["chosen"] == f"{n} torch threads, writers at normal priority"
            trial.restore()
            assert not bg.idle and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)


def test_the_split_is_recorded_and_changes_no_byte(run_args, tmp_path):
    threads = torch.get_num_threads()
    try:
        stores = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out = tmp_path / f"t{n}.zarr"
            blockcap.run(**{**run_args, "out": str(out), "batch_size": 2, "chunk_windows": 2})
            stores.append(crashkit.files(out))
            split = json.loads(Path(out, "zarr.json").read_bytes())["attributes"]["blockcap"]["split"]
            assert split["chosen"].startswith(f"{n} torch threads") or "items_per_s" in split
        assert stores[0] == stores[1]  # activations do not depend on the thread count
    finally:
        torch.set_num_threads(threads)
