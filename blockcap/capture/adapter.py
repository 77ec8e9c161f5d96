"""What every model family provides to a capture: dimensions, tokenizer, identity, capture module.

A family module (``chargpt``, and under ``hf`` ``gpt2``, ``neox``, ``llama``, ``gemma``, ``olmo2``,
``moe``, ``generic``) turns a loaded model into an ``Adapter``, whose capture modules are
``blockcap.capture.CaptureModule`` subclasses.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from blockcap.capture.base import CaptureModule
from blockcap.core.dims import ModelDims
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import ROUTER_LOGITS, SITES
from blockcap.data.tokenizers import Tokenizer


class CaptureFactory(Protocol):
    """A family's capture module class, called with the adapter's model (of the family's own type)."""

    def __call__(
        self, model: Any, blocks: Sequence[int], sites: Sequence[str], *, fused: bool
    ) -> CaptureModule: ...


class Adapter(ABC):
    """A loaded model of one family, ready to build capture modules.

    ``model_sha256`` (the weights' content hash) is part of a store's identity; ``provenance``
    (ids, paths, config) is recorded but not compared.
    """

    family: ClassVar[str] = "?"

    def __init__(
        self, model: nn.Module, dims: ModelDims, tokenizer: Tokenizer, model_sha256: str,
        provenance: dict[str, Any],
    ) -> None:  # fmt: skip
        self.model = model
        self.dims = dims
        self.tokenizer = tokenizer
        self.model_sha256 = model_sha256
        self.provenance = provenance

    capture_class: CaptureFactory  # the family's capture module

    def capture_module(self, blocks: Sequence[int], sites: Sequence[str], fused: bool) -> CaptureModule:
        """The hook-free module returning ``sites`` of ``blocks`` (a BlockcapError for a missing site)."""
        self.check_sites(sites, blocks)
        return self.capture_class(self.model, blocks, sites, fused=fused)

    def absent_sites(self, blocks: Sequence[int]) -> dict[str, str]:
        """The sites ``blocks`` do not all have, each with the reason; a dense block lacks only a router."""
        return {ROUTER_LOGITS: "this model has no mixture-of-experts router"}

    def check_sites(self, sites: Sequence[str], blocks: Sequence[int]) -> None:
        """A one-line BlockcapError for the first of ``sites`` that ``blocks`` do not have."""
        absent = self.absent_sites(blocks)
        missing = [s for s in sites if s in absent]
        if missing:
            site = missing[0]
            have = ",".join(s for s in SITES if s not in absent)
            raise BlockcapError(
                f"sites has {site}, but {absent[site]}; drop {site} (these blocks have sites={have})"
            )

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the model's weights (in place)."""
        self.model.to(device=device, dtype=dtype)
