"""blockcap: capture transformer block internals for every token into compressed Zarr v3 stores.

Library entry points: ``run`` (capture), ``open_store`` (lazy reading), ``topk`` / ``nearest``
(nearest tokens to vectors or texts), ``loader`` (shuffled training batches), ``verify``
(integrity), ``CaptureSpec`` (what a capture is), ``CaptureModule`` (the char GPT's hook-free
capture module), ``load_checkpoint``.
"""

from blockcap.analysis.loader import loader
from blockcap.analysis.reader import CaptureStore, IncompleteStoreWarning, open_store
from blockcap.analysis.search import nearest, topk
from blockcap.analysis.verify import verify
from blockcap.capture.chargpt.capture import CaptureModule
from blockcap.capture.chargpt.checkpoint import load_checkpoint
from blockcap.core.errors import BlockcapError
from blockcap.core.spec import CaptureSpec
from blockcap.core.version import __version__
from blockcap.run.job import run
from blockcap.storage.integrity import DamagedError

__all__ = [
    "BlockcapError",
    "CaptureModule",
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
