"""``python -m blockcap``: the fire CLI.

SIGTERM is turned into KeyboardInterrupt before anything else is imported, so a stop at any
moment, even while torch loads, ends with one line and exit status 130, never a traceback.
"""

import signal
import sys


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from blockcap.cli import main
    except KeyboardInterrupt:
        print("blockcap: interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    main()
