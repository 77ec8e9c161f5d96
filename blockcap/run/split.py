"""How a CPU run divides its cores between the forward pass and the writers, measured on its first
batches.

Two splits are candidates: torch keeps every core and the writers run at idle priority in its
gaps (best when the forward leaves gaps and the machine is otherwise idle), or torch gets one
thread fewer and the writers run at normal priority on the core left (best when the writers'
work is heavy, or when other processes share the machine: OpenMP teams stall at every barrier
whose thread is descheduled, and idle-priority writers starve behind any busy process). Which
wins depends on the model, the window length, the codec and the machine's load at the time, so
no fixed rule decides it: the run times both on its first batches, in the order A B B A (a trend
in the machine's load cancels out), and keeps the faster for the rest. Every trial batch is real
work, but the slower candidate costs real time, so the trial is kept short against the run:

* it ends after A B when A wins by ``DECISIVE`` or more. A's window carried the run's warm-up and
  B's some of A's writer backlog, so this is a heuristic: the B A half is unlikely to turn a 1.25x
  lead around. It is the usual case on a CPU whose cores the forward fills, where one thread
  fewer slows every matmul of the forward.
* a run shorter than ``MIN_RUN`` times the full trial has no trial (so the trial is at most an
  eighth of a run): a benchmark run of 16 batches spent half of them in the trial, and went from
  0.72 to 0.80 of the bare forward at block 5, 0.48 to 0.59 at block 0, without it
  (``benchmarks/test_throughput.py``, 384d model, one run before and one after).

Activations do not depend on the thread count (tested bitwise), so a resumed run that chooses
otherwise writes the same bytes. On a GPU the forward does not use the CPU's cores: no trial,
and, as in every run without one, the writers run at normal priority.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

ORDER = (0, 1, 1, 0)  # candidate of each trial window
DECISIVE = 1.25  # A's rate over B's after A B that ends the trial early
MIN_RUN = 8  # a run needs this many times the full trial's batches to have a trial


@dataclass(frozen=True)
class Split:
    threads: int  # torch's intra-op threads
    idle: bool  # writers at idle CPU priority

    def label(self) -> str:
        return f"{self.threads} torch threads, writers at {'idle' if self.idle else 'normal'} priority"


class SplitTrial:
    """Applies each candidate split to its trial batches, then the fastest to the rest of the run.

    ``window``: batches per trial window (those of a write unit, at least two: each window hands
    the writers whole units, so a split whose writers fall behind is slowed by them).
    """

    def __init__(self, device: torch.device, n_batches: int, window: int, background: Any) -> None:
        self.background = background
        self.original = torch.get_num_threads()
        n = self.original
        self.candidates = [Split(n, True), Split(n - 1, False)] if device.type == "cpu" and n >= 2 else []
        self.window = max(1, window)
        self.windows = len(ORDER)  # trial windows, fewer once decided early
        if n_batches < MIN_RUN * len(ORDER) * self.window:
            self.candidates = self.candidates[:0]
        self.seconds = [0.0, 0.0]
        self.items = [0, 0]
        self.started = 0.0
        # Without a trial the writers run at normal priority: idle ones starve behind any busy
        # process (measured: one-thread runs beside two CPU hogs took minutes, not seconds), and
        # nothing measured says they would gain from idling.
        self.chosen = Split(n, bool(self.candidates))
        if not self.candidates:
            self._apply(self.chosen)

    def _apply(self, split: Split) -> None:
        torch.set_num_threads(split.threads)
        self.background.idle = split.idle

    def _trial(self, r: int) -> int | None:
        """The candidate batch ``r`` is a trial of, or None once the trials are over."""
        k = r // self.window
        return ORDER[k] if self.candidates and k < self.windows else None

    def _rates(self) -> list[float]:
        return [i / max(s, 1e-9) for i, s in zip(self.items, self.seconds, strict=True)]

    def before(self, r: int) -> None:
        if self.candidates and r == 2 * self.window and self.windows > 2:
            a, b = self._rates()
            if a >= DECISIVE * b:
                self.windows = 2
        c = self._trial(r)
        if c is not None:
            if r % self.window == 0:
                self._apply(self.candidates[c])
            self.started = time.perf_counter()
        elif r == self.windows * self.window and self.candidates:
            rates = self._rates()
            self.chosen = self.candidates[max(range(len(rates)), key=rates.__getitem__)]
            self._apply(self.chosen)

    def after(self, r: int, items: int) -> None:
        c = self._trial(r)
        if c is not None:
            self.seconds[c] += time.perf_counter() - self.started
            self.items[c] += items

    def restore(self) -> None:
        """torch's threads as they were; writes still pending (a run being stopped) at normal
        priority: the forward no longer needs the cores."""
        torch.set_num_threads(self.original)
        self.background.idle = False

    def record(self) -> dict[str, Any]:
        """What was chosen and why, for the store's provenance."""
        out: dict[str, Any] = {"chosen": self.chosen.label()}
        if self.candidates and all(self.items):
            out["items_per_s"] = {
                c.label(): round(v, 1) for c, v in zip(self.candidates, self._rates(), strict=True)
            }
            out["trial_batches"] = self.windows * self.window
        else:
            out["why"] = "no trial: a GPU run, one thread, or a run too short to compare"
        return out
