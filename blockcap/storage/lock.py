"""One writer per store: a kernel lock beside a local store, a lease object beside a store in object
storage (``blockcap.storage.lease``); either shared among ``part`` processes."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blockcap.core.errors import BlockcapError
from blockcap.storage.lease import Lease, StoreInUse, backend
from blockcap.storage.location import Location, _wrote

__all__ = ["StoreInUse", "exclusive"]


@contextmanager
def exclusive(
    location: Location, shared: bool = False, hint: str = "wait for it to finish, or choose another out=PATH"
) -> Iterator[str]:
    """Hold the store's lock for a run: exclusive, or ``shared`` among ``part`` processes. Yields
    the holder's token, which ``held_by`` finds beside the store while it is held (under torchrun
    the other ranks check with it that they write into the store their leader locked).

    A POSIX advisory lock on ``.<name>.lock`` beside a local store: the kernel drops it when the
    process dies, so a killed run never blocks a later one, and the file is removed after a
    successful run. In object storage, a lease object (see ``blockcap.storage.lease``); stores
    without conditional writes have no lock.
    """
    if not location.local:
        objects = backend(location)
        if objects is None:
            yield ""
            return
        lease = Lease(location, objects, shared, hint)
        lease.acquire()
        try:
            yield lease.me
        finally:
            lease.release()
        return
    real = location.root.resolve()  # one lock for the store, whatever symlink names it
    path = real.parent / f".{real.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BlockcapError(
                f"cannot create the lock file {path} ({e.strerror}): changing the store needs its "
                f"directory writable"
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
    token = f"process {os.getpid()} on host {socket.gethostname()}"
    os.pwrite(fd, token.encode(), 0)
    _wrote("lock", str(path))
    try:
        yield token
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


def held_by(location: Location, token: str) -> bool:
    """Whether the lock (or lease) beside ``location`` is held by the holder of ``token``."""
    if not location.local:
        objects = backend(location)
        if objects is None:
            return True  # no lease here: nothing to compare
        found = objects.read()
        return found is not None and f'"{token}"' in found[0].decode(errors="replace")
    real = location.root.resolve()
    try:
        return (real.parent / f".{real.name}.lock").read_text(errors="replace").strip() == token
    except OSError:
        return False


def _same_file(fd: int, path: Any) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
