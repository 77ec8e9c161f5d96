"""blockcap: capture transformer block internals for every token into compressed Zarr v3 stores.

Library entry points: ``run`` (capture), ``open_store`` (lazy reading), ``nearest`` (top-k
neighbours of a vector over a site), ``verify`` (integrity),
``CaptureModule`` (the hook-free capture module), ``load_checkpoint``.
"""

__version__ = "0.1.0"

from blockcap.capture import CaptureModule  # noqa: E402
from blockcap.checkpoint import load_checkpoint  # noqa: E402
from blockcap.errors import BlockcapError  # noqa: E402
from blockcap.pipeline import run  # noqa: E402
from blockcap.reader import CaptureStore, open_store  # noqa: E402
from blockcap.search import nearest  # noqa: E402
from blockcap.verify import verify  # noqa: E402

__all__ = [
    "BlockcapError",
    "CaptureModule",
    "CaptureStore",
    "__version__",
    "load_checkpoint",
    "nearest",
    "open_store",
    "run",
    "verify",
]
