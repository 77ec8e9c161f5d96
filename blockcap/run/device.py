"""Device selection: CUDA when present, with a clear error for a device that is not there."""

from __future__ import annotations

import os

import torch

from blockcap.core.errors import BlockcapError


def pick_device(name: str | None = None) -> torch.device:
    """``name`` as a torch device, checked to exist; ``None`` means CUDA when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BlockcapError(f"device={name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BlockcapError(f"device={name!r} asked for, but no CUDA GPU is available; use --device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BlockcapError(
                f"device={name!r} does not exist: {torch.cuda.device_count()} GPU(s); "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type != "cpu":
        raise BlockcapError(f"device={name!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def free_memory(device: torch.device) -> int:
    """Bytes free for a run's tensors on ``device`` (CUDA: the allocator's view; CPU: free RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
