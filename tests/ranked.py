"""Run the blockcap CLI as one torchrun rank that differs from the others, as a hostile or
misconfigured node would: ``RANK_ARGS_<r>`` replaces (or adds) options of rank r (``--name=value``
words), and ``RANK_CWD_<r>`` is its working directory.

Usage: torchrun ... tests/ranked.py run --flag=...
"""

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

rank = os.environ.get("RANK", "0")
changes = shlex.split(os.environ.get(f"RANK_ARGS_{rank}", ""))
names = {c.split("=", 1)[0] for c in changes}
args = [a for a in sys.argv[1:] if a.split("=", 1)[0] not in names] + changes
if os.environ.get(f"RANK_CWD_{rank}"):
    os.chdir(os.environ[f"RANK_CWD_{rank}"])

from blockcap.cli import main  # noqa: E402

main(args)
