"""blockcap: capture transformer block internals for every token into compressed Zarr v3 stores.

Library entry points: ``run`` (capture), ``open_store`` (lazy reading), ``topk`` / ``nearest``
(nearest tokens to vectors or texts), ``loader`` (shuffled training batches), ``verify``
(integrity), ``CaptureSpec`` (what a capture is), ``CaptureModule`` (the char GPT's hook-free
capture module), ``load_checkpoint``.
"""

__version__ = "0.2.0"

from blockcap.checkpoint import load_checkpoint  # noqa: E402
from blockcap.errors import BlockcapError  # noqa: E402
from blockcap.integrity import DamagedError  # noqa: E402
from blockcap.loader import loader  # noqa: E402
from blockcap.models.chargpt import CaptureModule  # noqa: E402
from blockcap.pipeline import run  # noqa: E402
from blockcap.reader import CaptureStore, open_store  # noqa: E402
from blockcap.search import nearest, topk  # noqa: E402
from blockcap.spec import CaptureSpec  # noqa: E402
from blockcap.verify import verify  # noqa: E402

__all__ = [
    "BlockcapError",
    "CaptureModule",
    "CaptureSpec",
    "CaptureStore",
    "DamagedError",
    "__version__",
    "load_checkpoint",
    "loader",
    "nearest",
    "open_store",
    "run",
    "topk",
    "verify",
]
