"""Distributed capture under torchrun: ranks, the process group, and the few exchanges a run needs.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; blockcap then joins the process
group (NCCL on CUDA, gloo on CPU), puts rank r on ``cuda:LOCAL_RANK``, and shares the write units
among ranks. Without torchrun this is a group of one, and every exchange is the identity.

Ranks that stall or diverge end the job instead of hanging it:

* Exchanges outside the capture loop (errors while planning, the facts every rank must agree on,
  the store rank 0 opened, its finishing) go through torchrun's key-value store, polled, so a
  rank doing long work (rank 0 creating a store) never times a waiting one out.
* Every rank publishes a heartbeat there: a tick from a thread (the process lives) and a step
  count from the work (it makes progress). A watchdog thread on every rank ends the job (exit 1,
  one line naming the rank, the store resumable) when a rank's tick, or its steps while it
  computes, stand still for ``stall_timeout`` seconds. The capture loop's collectives time out
  a little later, as a backstop.
* A collective that fails because a rank died becomes one line, never a backend traceback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as td

from blockcap.core.errors import BlockcapError, Interrupted

DEFAULT_STALL_SECONDS = 300
RESUME = "the store is incomplete and every finished unit is committed: re-run the same command to resume"


class Stalled(BlockcapError):
    """A rank made no progress for ``stall_timeout`` seconds: the job was ended (exit status 1)."""

    exit_status = 1


class JobError(BlockcapError):
    """An error every rank knows of: rank 0 reports it for the job, the others stay quiet."""

    job_wide = True


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False  # this process initialised the process group and must destroy it
    stall_timeout: float = DEFAULT_STALL_SECONDS
    store: Any = None  # torchrun's key-value store (active groups only)
    steps: int = 0  # progress of this rank's work: batches, writes
    phase: str = "start"  # "capture" while computing; "wait" while waiting for other ranks
    stalled: list[int] = field(default_factory=list)  # ranks the watchdog found standing still
    stopping: threading.Event = field(default_factory=threading.Event)
    watchdog: threading.Thread | None = None
    exchanges: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def progress(self, *_: Any) -> None:
        """Count one step of this rank's work (the watchdog's evidence of progress)."""
        self.steps += 1

    # --- collectives of the capture loop --------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            self._collective(td.barrier)

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum over ranks."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        self._collective(td.all_reduce, t, op=td.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def max(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        self._collective(td.all_reduce, t, op=td.ReduceOp.MAX)
        return int(t.item())

    def _collective(self, fn: Any, *args: Any, **kw: Any) -> None:
        """A collective; a rank that died or stalled meanwhile becomes one line."""
        before, self.phase = self.phase, "wait"
        try:
            fn(*args, **kw)
        except RuntimeError:  # DistBackendError and the like: a peer is gone or too slow
            raise self._lost() from None
        finally:
            self.phase = before

    def _lost(self) -> BlockcapError:
        if self.stalled:
            return Stalled(_stall_line(self.stalled, self.stall_timeout))
        failed = [r for r in range(self.world) if r != self.rank and self._peek(f"failed/{r}") is not None]
        who = f"rank {failed[0]} failed (its error is above)" if failed else "another rank of the job ended"
        return Interrupted(f"interrupted: {who}; {RESUME}")

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if td.get_backend() == "nccl" else torch.device("cpu")

    # --- exchanges through the key-value store (no timeout but the watchdog's) ------------------
    def _key(self, name: str) -> str:
        return f"blockcap/{name}"

    def _peek(self, name: str, store: Any = None) -> Any:
        store = store or self.store
        try:
            return pickle.loads(store.get(self._key(name))) if store.check([self._key(name)]) else None
        except Exception:  # the store is gone with the job
            return None

    def _wait_for(self, names: list[str]) -> list[Any]:
        keys = [self._key(n) for n in names]
        before, self.phase = self.phase, "wait"
        try:
            while not self.store.check(keys):
                time.sleep(0.02)
            return [pickle.loads(self.store.get(k)) for k in keys]
        except RuntimeError:  # the store went away: the job is ending
            raise self._lost() from None
        finally:
            self.phase = before

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.active:
            return [value]
        self.exchanges += 1
        name = f"gather/{self.exchanges}"
        self.store.set(self._key(f"{name}/{self.rank}"), pickle.dumps(value))
        return self._wait_for([f"{name}/{r}" for r in range(self.world)])

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank (the others wait as long as rank 0 works)."""
        if not self.active:
            return value
        self.exchanges += 1
        name = f"share/{self.exchanges}"
        if self.leader:
            self.store.set(self._key(name), pickle.dumps(value))
            return value
        return self._wait_for([name])[0]

    def agree(self, error: BlockcapError | None) -> None:
        """Raise on every rank when any rank met an error: the first, named by its rank."""
        if not self.active:
            if error is not None:
                raise error
            return
        errors = self.gather(None if error is None else str(error))
        failed = [(r, m) for r, m in enumerate(errors) if m is not None]
        if failed:
            rank, message = failed[0]
            raise JobError(message if all(m == message for m in errors) else f"rank {rank}: {message}")

    def announce_failure(self, message: str) -> None:
        """Tell the other ranks why this one is about to end (they name it when they notice)."""
        if self.store is not None:
            with contextlib.suppress(Exception):  # the store is gone with the job
                self.store.set(self._key(f"failed/{self.rank}"), pickle.dumps(message))

    # --- heartbeat and watchdog ---------------------------------------------------------------
    def start_watchdog(self) -> None:
        if self.active:
            self.watchdog = threading.Thread(target=self._watch, args=(self.store.clone(),), daemon=True,
                                             name="blockcap-watchdog")  # fmt: skip
            self.watchdog.start()

    def _watch(self, store: Any) -> None:
        """Publish this rank's heartbeat; rank 0 watches every rank and the others watch rank 0;
        when one stands still too long, end this process (and, by a flag, every other)."""
        interval = max(0.1, min(5.0, self.stall_timeout / 10))
        seen: dict[tuple[str, int], tuple[Any, float]] = {}
        watched = range(self.world) if self.leader else [0]
        tick = 0
        while not self.stopping.wait(interval):
            tick += 1
            now = time.monotonic()
            try:
                store.set(self._key(f"beat/{self.rank}"), pickle.dumps((tick, self.steps, self.phase)))
                beats = {r: self._peek(f"beat/{r}", store) for r in watched}
                stalled = _standing_still(beats, seen, now, self.stall_timeout)
                if stalled and self._peek("stalled", store) is None:
                    store.set(self._key("stalled"), pickle.dumps(stalled))
                flagged = self._peek("stalled", store)
                if flagged is None or self.stopping.is_set():
                    continue
                self.stalled = flagged
                if store.add(self._key("stall-reported"), 1) == 1:
                    print(f"blockcap: error: {_stall_line(flagged, self.stall_timeout)}", file=sys.stderr)
            except Exception:
                continue  # the store is unreachable: the collectives' own timeout ends the job
            sys.stderr.flush()
            os._exit(Stalled.exit_status)

    def close(self) -> None:
        self.stopping.set()
        if self.watchdog is not None:
            self.watchdog.join()  # its last heartbeat before the one that says this rank is done
        if self.store is not None:  # a rank that ended its part is never taken for a stalled one
            with contextlib.suppress(Exception):
                self.store.set(self._key(f"beat/{self.rank}"), pickle.dumps((None, self.steps, "done")))
        if self.joined and td.is_initialized():
            with contextlib.suppress(RuntimeError):
                td.destroy_process_group()


def _standing_still(
    beats: dict[int, Any], seen: dict[tuple[str, int], tuple[Any, float]], now: float, limit: float
) -> list[int]:
    """Ranks whose process stood still ``limit`` seconds (its tick), or whose work did while it
    computes (its step count and phase); ``seen`` keeps what each showed last and since when."""
    out = []
    for r, beat in beats.items():
        tick, steps, phase = beat if beat is not None else (None, None, "start")
        if phase == "done":
            continue
        for what, value in (("tick", tick), ("work", (steps, phase))):
            if seen.get((what, r), (object(), 0.0))[0] != value:
                seen[(what, r)] = (value, now)
        if now - seen[("tick", r)][1] >= limit or (
            phase == "capture" and now - seen[("work", r)][1] >= limit
        ):
            out.append(r)
    return out


def _stall_line(ranks: list[int], seconds: float) -> str:
    who = "rank " + ", ".join(map(str, ranks)) if len(ranks) < 4 else f"{len(ranks)} ranks"
    return (
        f"{who} made no progress for {seconds:g} s (stopped, hung or cut off; stall_timeout={seconds:g}); "
        f"the job is ended on every rank; {RESUME}"
    )


def from_env(stall_timeout: float = DEFAULT_STALL_SECONDS) -> Group:
    """The torchrun group this process belongs to, joined; a group of one without torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Group()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world == 1:
        return Group(rank, world, local)
    joined = False
    if not td.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        # the backstop for the capture loop's collectives: a little after the watchdog acts
        timeout = dt.timedelta(seconds=stall_timeout * 1.5 + 10)
        try:
            td.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
        except RuntimeError as e:
            raise BlockcapError(
                f"rank {rank} could not join the other ranks ({str(e).splitlines()[0]})"
            ) from None
        joined = True
    store = td.distributed_c10d._get_default_store()  # torchrun's rendezvous store, scoped to this group
    group = Group(rank, world, local, joined, stall_timeout, store)
    group.start_watchdog()
    return group
