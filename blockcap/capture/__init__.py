"""Model families and their hook-free capture modules; ``load_model`` picks one for a spec.
Imports blockcap.core and blockcap.data (tokenizers); never the store.

``load_model(spec, vocab_text)`` returns the ``Adapter`` for ``spec``: the bundled char GPT when
``spec.model`` is None (``spec.weights`` picks the checkpoint), else the Hugging Face model
``spec.model`` names (a ``save_pretrained`` directory or a hub id).
"""

from __future__ import annotations

from collections.abc import Callable

from blockcap.capture.adapter import Adapter
from blockcap.capture.base import CaptureModule
from blockcap.core.spec import CaptureSpec

__all__ = ["Adapter", "CaptureModule", "load_model"]


def load_model(spec: CaptureSpec, vocab_text: Callable[[], str] = str) -> Adapter:
    """The adapter for ``spec``'s model; raises BlockcapError with one line when it cannot load.

    ``vocab_text`` gives the text whose sorted characters are the vocabulary of an original char
    GPT state dict (which carries none); called only for such a checkpoint.
    """
    if spec.model is None:
        from blockcap.capture.chargpt.capture import load

        return load(spec.weights, vocab_text)
    from blockcap.capture.hf.load import load as load_hf

    return load_hf(spec)
