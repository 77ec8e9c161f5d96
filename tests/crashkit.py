"""Run blockcap's CLI in a child process that SIGKILLs itself right after its Nth write.

Children are forked from a fork server that has already imported blockcap (and torch), so one
run of a tiny capture costs a fraction of a second and a crash test can kill at *every* write.
Writes are counted at blockcap's one choke point, ``blockcap.storage.location.WRITE_HOOKS``: each object
put, delete, rename, lock and unlock; with ``partial`` also each file written to its temporary
name and not yet renamed into place.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait
from pathlib import Path

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["blockcap.cli", "tests.crashkit"])
# Reading a child's exit status consumes it, and ``Process.start`` reads every finished child's
# status: two threads (``each``) reading one child at once make one of them see 255, so reads and
# starts take turns.
_POLLING = threading.Lock()
VOLATILE = ("run_id", "started", "finished", "command", "split")  # root metadata that differs between runs


def _child(
    argv: list[str], kill_at: int | None, partial: bool, count_file: str | None, pause: str | None = None
) -> None:
    import torch

    from blockcap.cli import main
    from blockcap.storage import location

    torch.set_num_threads(1)
    calls = 0
    paused: list[str] = []

    def hook(op: str, key: str) -> None:
        nonlocal calls
        if op == "put-partial" and not partial:
            return
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if pause and (paused or (op == "put" and key.startswith("committed/c/"))):  # hold after one unit
            if not paused:  # from here every thread's next write holds too (writers, committer)
                paused.append(key)
                Path(pause).write_text("paused")
            while Path(pause).exists():
                time.sleep(0.01)

    location.WRITE_HOOKS.append(hook)
    sys.stdout = sys.stderr = open(os.environ.get("CRASHKIT_LOG", os.devnull), "a")  # noqa: SIM115
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if count_file:
        Path(count_file).write_text(str(calls))
    os._exit(code)


def run(
    argv: list[str], kill_at: int | None = None, partial: bool = False, count_file: str | None = None
) -> int:
    """Exit code of ``blockcap argv`` in a child (``-SIGKILL`` when it was killed at write ``kill_at``)."""
    p = _CTX.Process(target=_child, args=(argv, kill_at, partial, count_file))
    with _POLLING:
        p.start()
    wait([p.sentinel], 300)
    with _POLLING:
        p.join(0)
        code = p.exitcode
    if code is None:  # hung: stop it, so that it holds no store and no core
        p.kill()
        p.join()
        raise AssertionError(f"blockcap {argv} still running after 300 s")
    return code


def each(kills: Iterable[int], check: Callable[[int], None]) -> None:
    """``check(n)`` for every kill point ``n``, two at a time when this test process has two cores
    to itself (pytest-xdist workers share them): each kill-and-resume is its own store and its
    own child processes, so they run side by side (a CI-time matter). The first failing ``n`` is
    raised, as a sequential loop would."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = ThreadPoolExecutor(max(1, min(2, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))
    try:
        for done in [pool.submit(check, n) for n in kills]:
            done.result()
    finally:
        pool.shutdown(cancel_futures=True)


def kill_and_resume_each(
    base: list[str], kills: Iterable[int], tmp: Path, reference: dict[str, bytes], partial: bool = False,
    after_kill: Callable[[Path], None] | None = None,
) -> None:  # fmt: skip
    """For each kill point ``n`` (``each``): ``blockcap base --out=tmp/s{n}.zarr`` killed at its ``n``th
    write, ``after_kill(store)`` checked, then the same command re-run to a store whose files equal
    ``reference`` (``files``), with nothing left beside it."""

    def kill_then_resume(n: int) -> None:
        out = tmp / f"s{n}.zarr"
        argv = [*base, f"--out={out}"]
        assert run(argv, kill_at=n, partial=partial) == -9, n
        if after_kill is not None:
            after_kill(out)
        assert run(argv) == 0, n
        assert files(out) == reference, n
        assert leftovers(out) == [], n

    each(kills, kill_then_resume)


def start_paused(argv: list[str], flag: Path) -> mp.Process:
    """Start ``blockcap argv`` in a child that pauses after its first commit until ``flag`` is deleted:
    each of its threads holds at its next write (``settled`` waits for the store to stop changing)."""
    p = _CTX.Process(target=_child, args=(argv, None, False, None, str(flag)))
    p.start()
    while not flag.exists():
        assert p.is_alive() or p.exitcode is None, p.exitcode
        p.join(0.01)
    return p


def settled(store: Path) -> dict[str, bytes]:
    """``files(store)`` once two reads 0.2 s apart agree: a paused child's threads have each made the
    one write they were in the middle of."""
    before = files(store)
    while True:
        time.sleep(0.2)
        now = files(store)
        if now == before:
            return now
        before = now


def count_writes(argv: list[str], tmp: Path, partial: bool = False) -> int:
    """How many writes an uninterrupted ``blockcap argv`` makes."""
    f = tmp / "writes.txt"
    assert run(argv, partial=partial, count_file=str(f)) == 0
    return int(f.read_text())


def files(store: Path) -> dict[str, bytes]:
    """Every file of a store by relative path; the root document with run-specific fields removed."""
    out = {}
    for p in sorted(store.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(store))
            data = p.read_bytes()
            if rel == "zarr.json":
                doc = json.loads(data)
                meta = doc["attributes"]["blockcap"]
                doc["attributes"]["blockcap"] = {k: v for k, v in meta.items() if k not in VOLATILE}
                data = json.dumps(doc, sort_keys=True).encode()
            out[rel] = data
    return out


def leftovers(store: Path) -> list[str]:
    """Lock files, staging or trash directories and temporary files left beside or inside a store."""
    parent = store.parent
    found = [p.name for p in parent.glob(f".{store.name}*")]
    found += [str(p) for p in store.rglob("*.partial")] if store.exists() else []
    return found
