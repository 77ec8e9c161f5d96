"""``python -m blockcap``: the fire CLI.

SIGINT and SIGTERM are turned into KeyboardInterrupt before anything else is imported, so a stop
at any moment, even while torch loads, ends with one line and exit status 130, never a traceback
(a stop whose raise was swallowed during the imports is honoured once they are done).
"""

import signal
import sys

_stopped: list[int] = []  # signals received while starting


def _interrupt(signum, frame):
    _stopped.append(signum)
    raise KeyboardInterrupt


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        from blockcap.cli import main

        if _stopped:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("blockcap: interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    try:
        main()
    except KeyboardInterrupt:  # in the instant before main installs its own handlers
        print(
            "blockcap: interrupted; every store is left consistent: re-run the same command", file=sys.stderr
        )
        sys.exit(130)
