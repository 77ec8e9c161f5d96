"""The adapter every Hugging Face family shares: sizes from the modules, casts that keep rotary float32."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from blockcap.capture.adapter import Adapter
from blockcap.core.dims import ModelDims

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class HFAdapter(Adapter):
    """A transformers base model (``GPT2Model``, ``LlamaModel``, ``MixtralModel``, ...)."""

    model: PreTrainedModel

    @staticmethod
    @abstractmethod
    def dims_of(model: Any) -> ModelDims:
        """The sizes of ``model`` (of the family's type), read from its modules (the truth where configs
        leave fields out)."""

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move and cast the weights; rotary inverse frequencies stay float32.

        That is what transformers does when it loads a model in lower precision; cast to bfloat16
        they would misplace the angles of distant positions.
        """
        rotary = getattr(self.model, "rotary_emb", None)
        kept = dict(rotary.named_buffers()) if rotary is not None else {}
        super().to(device, dtype)
        for name, buf in kept.items():
            setattr(rotary, name, buf.to(device))
