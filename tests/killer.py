"""Run the blockcap CLI and SIGKILL it at an exact point: right after its Nth write of any kind.

Usage: python tests/killer.py N [--partial] run --flag=...

Writes are counted at blockcap's one choke point (``blockcap.location.WRITE_HOOKS``): every
object put, delete, rename, lock and unlock, metadata included. With ``--partial`` the Nth event
may also be a file written to its temporary name and not yet renamed into place. Under torchrun,
``KILL_RANK`` picks the one rank that dies (the others are stopped by torchrun). ``KILL_SIGNAL``
(INT or TERM) sends that signal instead of SIGKILL, once.
"""

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blockcap.cli import main  # noqa: E402
from blockcap.storage import location  # noqa: E402

kill_at = int(sys.argv[1])
partial = sys.argv[2] == "--partial"
args = sys.argv[3:] if partial else sys.argv[2:]
calls = 0
lock = threading.Lock()


def count(op: str, key: str) -> None:
    global calls
    if op == "put-partial" and not partial:
        return
    if os.environ.get("KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    with lock:
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL")))


location.WRITE_HOOKS.append(count)
main(args)
print(f"writes: {calls}", file=sys.stderr)
