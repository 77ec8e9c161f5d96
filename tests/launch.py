"""Child processes of the tests: torchrun jobs of blockcap (or of a test script), from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(
    nproc: int, args: list[str], script: list[str] | None = None, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc`` of ``script`` (default ``-m blockcap``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += script or ["-m", "blockcap"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip
