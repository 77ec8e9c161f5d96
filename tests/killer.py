"""Run the blockcap CLI and SIGKILL it at an exact point: after the Nth zarr array write.

Usage: python tests/killer.py N run --flag=... (N counts every array write: data and commits).
Used by the crash tests to hit early, middle and last-chunk points deterministically.
"""

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zarr  # noqa: E402

from blockcap.cli import main  # noqa: E402

kill_at = int(sys.argv[1])
calls = 0
lock = threading.Lock()
original = zarr.Array.__setitem__


def counting_setitem(self, key, value):
    global calls
    original(self, key, value)
    with lock:
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


zarr.Array.__setitem__ = counting_setitem
main(sys.argv[2:])
