"""Model families: the bundled char GPT, and Hugging Face GPT-2, GPT-NeoX (Pythia) and Llama-family models.

``load_model(spec, dataset)`` returns the ``Adapter`` for ``spec``: the char GPT when
``spec.model`` is None (``spec.weights`` picks the checkpoint), else the Hugging Face model
``spec.model`` names (a ``save_pretrained`` directory or a hub id).
"""

from __future__ import annotations

from pathlib import Path

from blockcap.capture import BlockCapture
from blockcap.models.base import Adapter, ModelDims
from blockcap.spec import CaptureSpec

__all__ = ["Adapter", "BlockCapture", "ModelDims", "load_model"]


def load_model(spec: CaptureSpec, dataset: Path) -> Adapter:
    """The adapter for ``spec``'s model; raises BlockcapError with one line when it cannot load."""
    if spec.model is None:
        from blockcap.data import read_text
        from blockcap.models import chargpt

        return chargpt.load(spec.weights, lambda: read_text(dataset, spec.text_column))
    from blockcap.models import hf

    return hf.load(spec)
