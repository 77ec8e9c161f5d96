"""The capture core: what a capture module is and returns.

A capture module is an explicit re-execution of a model's embeddings and blocks
``0..max(blocks)`` that returns the requested sites as a flat tuple. No hooks and no Python side
effects in ``forward``, so ``torch.compile(fullgraph=True)`` and ``torch.export`` accept it, and
it stops after the deepest requested block. Each model family (``blockcap.capture.chargpt``,
``blockcap.capture.hf``) subclasses ``CaptureModule``; the site names come from
``blockcap.core.sites``, never from the store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from blockcap.core.sites import ATTENTION, SITES


class CaptureModule(nn.Module):
    """Base of the capture modules: which (block, site) pairs to return, in which order.

    ``forward(ids)`` takes token ids (B, T) and returns one tensor per ``self.outputs`` entry:
    vector sites (B, T, width), ``attention`` (B, n_head, T, T).
    """

    def __init__(self, blocks: Sequence[int], sites: Sequence[str]) -> None:
        super().__init__()
        if not blocks or not sites:
            raise ValueError("need at least one block and one site")
        unknown = [s for s in sites if s not in SITES]
        if unknown:
            raise ValueError(f"unknown sites {unknown}")
        self.depth = max(blocks) + 1
        self.capture_at = tuple(i in set(blocks) for i in range(self.depth))
        self.sites = tuple(sites)
        self.want_pattern = ATTENTION in self.sites
        self.outputs = [(b, s) for b in sorted(set(blocks)) for s in self.sites]

    def pick(self, block: int, **values: torch.Tensor | None) -> list[torch.Tensor]:
        """The requested sites of ``block`` in ``self.sites`` order; none if it is not captured."""
        return [values[s] for s in self.sites] if self.capture_at[block] else []  # type: ignore[misc]
