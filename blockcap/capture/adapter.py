"""What every model family provides to a capture: dimensions, tokenizer, identity, capture module.

A family module (``chargpt``, ``gpt2``, ``neox``, ``llama``) turns a loaded model into an
``Adapter``, whose capture modules are ``blockcap.capture.CaptureModule`` subclasses.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from blockcap.capture.base import CaptureModule
from blockcap.core.dims import ModelDims
from blockcap.data.tokenizers import Tokenizer


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

    capture_class: type[CaptureModule]  # the family's capture module

    def capture_module(self, blocks: Sequence[int], sites: Sequence[str], fused: bool) -> CaptureModule:
        """The hook-free module returning ``sites`` of ``blocks``."""
        return self.capture_class(self.model, blocks, sites, fused=fused)

    def check_sites(self, sites: Sequence[str]) -> None:  # noqa: B027 - most families have every site
        """Raise a BlockcapError for a site this model does not have (default: it has them all)."""

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the model's weights (in place)."""
        self.model.to(device=device, dtype=dtype)
