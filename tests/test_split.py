"""The split of cores between forward and writers: timed on the first batches, the faster kept,
recorded in the store, and without effect on what is stored."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch

import blockcap
from blockcap.run.split import DECISIVE, MIN_RUN, ORDER, SplitTrial
from tests import crashkit


class Background:
    idle = True


SHORTEST = MIN_RUN * len(ORDER) * 3  # batches of the shortest run with a trial of 3-batch windows


def run_trial(monkeypatch, seconds: dict[int, float], n_batches: int = SHORTEST):
    """A trial over ``n_batches`` whose batches take ``seconds[torch threads]`` each: the split
    applied to every batch, and the trial."""
    bg = Background()
    trial = SplitTrial(torch.device("cpu"), n_batches=n_batches, window=3, background=bg)
    seen, clock = [], [0.0]
    split_module = importlib.import_module("blockcap.run.split")
    monkeypatch.setattr(split_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    for r in range(n_batches):
        trial.before(r)
        seen.append((torch.get_num_threads(), bg.idle))
        clock[0] += seconds[torch.get_num_threads()]
        trial.after(r, 10)
    return seen, trial, bg


def test_trial_order_choice_and_restore(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, trial, bg = run_trial(monkeypatch, {2: 1.0, 1: 0.5})  # one thread fewer is faster here
        tried = [seen[k * 3] for k in range(len(ORDER))]
        assert tried == [(2, True), (1, False), (1, False), (2, True)]
        assert seen[len(ORDER) * 3 :] == [(1, False)] * (SHORTEST - len(ORDER) * 3)
        record = trial.record()
        assert record["chosen"] == "1 torch threads, writers at normal priority"
        assert record["items_per_s"] == {"2 torch threads, writers at idle priority": 10.0,
                                         "1 torch threads, writers at normal priority": 20.0}  # fmt: skip
        assert record["trial_batches"] == len(ORDER) * 3
        trial.restore()
        assert torch.get_num_threads() == 2 and not bg.idle  # writes left after a stop: normal priority
        short = SplitTrial(torch.device("cpu"), n_batches=SHORTEST - 1, window=3, background=bg)
        assert "why" in short.record() and not short.candidates
    finally:
        torch.set_num_threads(threads)


def test_a_decisive_first_candidate_ends_the_trial_after_two_windows(monkeypatch):
    """A won with the warm-up in its window: B is not tried again, the rest of the run is A's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, trial, _ = run_trial(monkeypatch, {2: 1.0, 1: DECISIVE})
        assert seen[:6] == [(2, True)] * 3 + [(1, False)] * 3
        assert seen[6:] == [(2, True)] * (SHORTEST - 6)
        assert trial.record()["trial_batches"] == 6
        seen, trial, _ = run_trial(monkeypatch, {2: 1.0, 1: DECISIVE * 0.99})  # not decisive: A B B A
        assert [seen[k * 3] for k in range(len(ORDER))] == [(2, True), (1, False), (1, False), (2, True)]
        assert seen[12:] == [(2, True)] * (SHORTEST - 12) and trial.record()["trial_batches"] == 12
    finally:
        torch.set_num_threads(threads)


def test_without_a_trial_the_writers_run_at_normal_priority():
    """A GPU run, a one-thread run, a short run: nothing measured says idling pays, and idle
    writers starve behind any busy process on the machine."""
    threads = torch.get_num_threads()
    try:
        for device, n, batches in (("cpu", 1, SHORTEST), ("cpu", 2, SHORTEST - 1), ("meta", 2, SHORTEST)):
            torch.set_num_threads(n)
            bg = Background()
            trial = SplitTrial(torch.device(device), n_batches=batches, window=3, background=bg)
            assert not trial.candidates and not bg.idle
            assert trial.record()["chosen"] == f"{n} torch threads, writers at normal priority"
            trial.restore()
            assert not bg.idle and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)


def test_the_split_is_recorded_and_changes_no_byte(run_args, tmp_path, monkeypatch):
    """A run whose trial switches torch's thread count between batches stores what a one-thread
    run stores (the test's run is short: every run length gets a trial here)."""
    monkeypatch.setattr(importlib.import_module("blockcap.run.split"), "MIN_RUN", 1)
    threads = torch.get_num_threads()
    try:
        stores = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out = tmp_path / f"t{n}.zarr"
            blockcap.run(**{**run_args, "out": str(out), "batch_size": 2, "chunk_windows": 2})
            stores.append(crashkit.files(out))
            split = json.loads(Path(out, "zarr.json").read_bytes())["attributes"]["blockcap"]["split"]
            assert split["chosen"].startswith(f"{n} torch threads") if n == 1 else "items_per_s" in split
        assert stores[0] == stores[1]  # activations do not depend on the thread count
    finally:
        torch.set_num_threads(threads)
