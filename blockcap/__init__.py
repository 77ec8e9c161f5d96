"""blockcap: capture transformer block internals for every token into compressed Zarr v3 stores.

Library entry points: ``run`` (capture), ``open_store`` (lazy reading), ``topk`` / ``nearest``
(nearest tokens to vectors or texts), ``loader`` (shuffled training batches), ``verify``
(integrity), ``CaptureSpec`` (what a capture is), ``CharGPTCapture`` (the char GPT's hook-free
capture module), ``load_checkpoint``. Renamed names keep their old spelling for one minor version,
with a DeprecationWarning (``_RENAMED``).
"""

from blockcap.analysis.loader import loader
from blockcap.analysis.reader import CaptureStore, IncompleteStoreWarning, open_store
from blockcap.analysis.search import nearest, topk
from blockcap.analysis.verify import verify
from blockcap.capture.chargpt.capture import CharGPTCapture
from blockcap.capture.chargpt.checkpoint import load_checkpoint
from blockcap.core.errors import BlockcapError
from blockcap.core.spec import CaptureSpec
from blockcap.core.version import __version__
from blockcap.run.job import run
from blockcap.storage.integrity import DamagedError

__all__ = [
    "BlockcapError",
    "CharGPTCapture",
    "CaptureSpec",
    "CaptureStore",
    "DamagedError",
    "IncompleteStoreWarning",
    "__version__",
    "load_checkpoint",
    "loader",
    "nearest",
    "open_store",
    "run",
    "topk",
    "verify",
]

# old public name -> (new name, object); kept for one minor version (removed in 0.4)
_RENAMED = {"CaptureModule": ("CharGPTCapture", CharGPTCapture)}


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        import warnings

        new, obj = _RENAMED[name]
        warnings.warn(f"blockcap.{name} is renamed blockcap.{new}", DeprecationWarning, stacklevel=2)
        return obj
    raise AttributeError(f"module 'blockcap' has no attribute {name!r}")
