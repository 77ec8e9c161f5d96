"""Which dataset a run uses when it names none, and a dataset's whole text for the few uses that need it.

The default is ``$BLOCKCAP_DATASET``, else TinyShakespeare, downloaded once into the user cache
directory and sha256-checked. Reading documents is ``blockcap.data.records``; their tokens, the
token cache (``blockcap.data.cache``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from blockcap.core.errors import BlockcapError
from blockcap.data.digest import cache_dir, sha256_file
from blockcap.data.inputs import list_inputs
from blockcap.data.records import documents

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATASET_ENV = "BLOCKCAP_DATASET"


def _verify(path: Path, sha256: str) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise BlockcapError(
            f"dataset {path} has sha256 {actual}, expected {sha256}; "
            f"delete it, or pass the right file as dataset=PATH"
        )


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` atomically, verifying ``sha256`` before the file appears."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        _verify(Path(tmp), sha256)
        os.replace(tmp, dest)
    except OSError as e:
        raise BlockcapError(
            f"could not download {url} ({e}); "
            f"download it yourself and pass it as dataset=PATH, or set {DATASET_ENV}"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def resolve_dataset(
    path: str | os.PathLike[str] | None = None, sha256: str | None = None, url: str = TINYSHAKESPEARE_URL
) -> str:
    """The dataset to use: ``path``, else ``$BLOCKCAP_DATASET``, else the cached TinyShakespeare
    (downloaded on first use, always checked against its hash; a pin on an explicit dataset is
    checked against its inputs' content, see ``blockcap.data.corpus``)."""
    chosen = path or os.environ.get(DATASET_ENV)
    if chosen:
        return str(chosen)
    cached = cache_dir() / "tinyshakespeare.txt"
    if not cached.exists():
        download(url, cached, sha256 or TINYSHAKESPEARE_SHA256)
    _verify(cached, sha256 or TINYSHAKESPEARE_SHA256)
    return str(cached)


def read_text(dataset: str | os.PathLike[str], text_column: str | None = None) -> str:
    """The whole text of a dataset, documents concatenated (training the char GPT needs it)."""
    files = list_inputs(str(dataset))
    text = "".join(
        d.text or "" if d.pieces is None else "".join(d.pieces) for d in documents(files, text_column)
    )
    if not text:
        raise BlockcapError(f"dataset {dataset} is empty; pass a text dataset")
    return text


def characters(dataset: str | os.PathLike[str], text_column: str | None = None) -> str:
    """Every distinct character of a dataset, sorted (an original char GPT's vocabulary), streamed."""
    seen: set[str] = set()
    for d in documents(list_inputs(str(dataset)), text_column):
        for piece in [d.text or ""] if d.pieces is None else d.pieces:
            seen.update(piece)
    return "".join(sorted(seen))
