"""One writer per store: a kernel lock beside a local store, shared among ``part`` processes."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blockcap.core.errors import BlockcapError
from blockcap.storage.location import Location, _wrote


# --- one writer per store ------------------------------------------------------------------------------
class StoreInUse(BlockcapError):
    """Another process is writing the store."""


@contextmanager
def exclusive(
    location: Location, shared: bool = False, hint: str = "wait for it to finish, or choose another out=PATH"
) -> Iterator[None]:
    """Hold the store's lock for a run: exclusive, or ``shared`` among ``part`` processes.

    A POSIX advisory lock on ``.<name>.lock`` beside a local store: the kernel drops it when the
    process dies, so a killed run never blocks a later one, and the file is removed after a
    successful run. Object stores have no lock (see docs/design.md).
    """
    if not location.local:
        yield
        return
    real = location.root.resolve()  # one lock for the store, whatever symlink names it
    path = real.parent / f".{real.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BlockcapError(
                f"cannot create the lock file {path} ({e.strerror}); choose another out=PATH"
            ) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreInUse(f"store {location} is in use by {holder}; {hint}") from None
        if _same_file(fd, path):  # not unlinked by a finishing holder between open and lock
            break
        os.close(fd)
    os.ftruncate(fd, 0)  # parts share the lock: the line names the latest of them
    os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}".encode(), 0)
    _wrote("lock", str(path))
    try:
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder removes the file
            if _same_file(fd, path):
                path.unlink()
                _wrote("unlock", str(path))
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def _same_file(fd: int, path: Any) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
