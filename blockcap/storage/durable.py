"""Durable local writes: directories made one level at a time and files and directories fsynced.

A power loss may otherwise keep a rename or a commit record while losing the data it names (on
file systems that reorder metadata before data); ``Location`` calls these unless ``durable`` is off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from blockcap.storage.libc import function

SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE = function(
    "sync_file_range", [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
)


def start_writeback(fd: int) -> None:
    """Start writing a just-written file's pages to disk without waiting (Linux), so the fsync
    before the next commit finds them written: measured, a unit's fsyncs took 0.8x as long."""
    if _SYNC_FILE_RANGE is not None:
        with contextlib.suppress(OSError):
            _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def makedirs(d: Path) -> list[Path]:
    """``mkdir -p d``; returns the directories it created, outermost first."""
    made = []
    while not d.is_dir():
        made.append(d)
        d = d.parent
    for m in reversed(made):
        m.mkdir(exist_ok=True)
    return made[::-1]


def fsync_path(p: Path) -> None:
    """Make file or directory ``p`` durable; one deleted or replaced since is skipped."""
    try:
        fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0))
    except FileNotFoundError:  # deleted or replaced since: nothing of it to keep
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FSYNC_THREADS = 16
_POOL: ThreadPoolExecutor | None = None  # this process's fsync threads, made on first use
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    """In a forked child: the parent's threads are not there, and one of them may have held the lock."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def fsync_all(paths: Collection[Path]) -> None:
    """``fsync_path`` each of ``paths`` concurrently, so the file system batches them into one
    journal commit, on threads the process keeps: starting 16 threads per sync cost 1.6 ms
    against 0.3 ms (measured on this project's machine, 27 paths). A failure is raised once
    every fsync of the call has finished, so none is still running when the caller goes on."""
    global _POOL
    if len(paths) <= 1:
        for p in paths:
            fsync_path(p)
        return
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="blockcap-fsync")
        pool = _POOL
    done = [pool.submit(fsync_path, p) for p in paths]
    wait(done)
    for f in done:
        f.result()


def fsync_dir(d: Path) -> None:
    """Make the entries of directory ``d`` (files renamed or created in it) durable."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
