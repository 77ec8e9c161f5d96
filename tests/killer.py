"""Run the blockcap CLI and SIGKILL it at an exact point: right after its Nth write of any kind.

Usage: python tests/killer.py N [--partial] run --flag=...

Writes are counted at blockcap's one choke point (``blockcap.location.WRITE_HOOKS``): every
object put, delete, rename, lock and unlock, metadata included. With ``--partial`` the Nth event
may also be a file written to its temporary name and not yet renamed into place. Under torchrun,
``KILL_RANK`` picks the one rank that dies (the others are stopped by torchrun). ``KILL_SIGNAL``
(INT, TERM or STOP) sends that signal instead of SIGKILL, once. ``KILL_SWALLOWED=1`` sends it
from inside a finalizer, silenced as a library might do, so that the KeyboardInterrupt it raises
is swallowed: the stop must be honoured all the same. With ``KILL_SIGNAL=STOP``,
``KILL_CONT_AFTER=S`` continues the stopped process after S seconds (a rank that stalls, then
comes back to the signals torchrun sent it meanwhile, instead of waiting out torchrun's 30 s
grace before its SIGKILL).
"""

import os
import signal
import subprocess
import sys
import threading
import time

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
            if os.environ.get("KILL_SWALLOWED"):
                Finalizer()  # collected at once: the signal arrives inside __del__
            else:
                if os.environ.get("KILL_CONT_AFTER"):
                    later = f"sleep {os.environ['KILL_CONT_AFTER']}; kill -CONT {os.getpid()}"
                    subprocess.Popen(["sh", "-c", later], start_new_session=True)
                os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL")))


class Finalizer:
    def __del__(self) -> None:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "INT")))
        time.sleep(0.05)  # the handler runs here, inside __del__, and its raise is swallowed


if os.environ.get("KILL_SWALLOWED"):
    sys.unraisablehook = lambda unraisable: None


location.WRITE_HOOKS.append(count)
main(args)
print(f"writes: {calls}", file=sys.stderr)
