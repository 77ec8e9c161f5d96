"""Text datasets: TinyShakespeare download and cache, character tokenizer, split and windows."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blockcap.errors import BlockcapError

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATASET_ENV = "BLOCKCAP_DATASET"
TRAIN_FRACTION = 0.9
SPLITS = ("train", "val", "all")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Per-user cache directory (``$XDG_CACHE_HOME/blockcap``, else ``~/.cache/blockcap``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blockcap"


def _verify(path: Path, sha256: str) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise BlockcapError(
            f"dataset {path} has sha256 {actual}, expected {sha256}; "
            f"delete it or pass the right file with --dataset=PATH"
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
            f"download it yourself and pass --dataset=PATH or set {DATASET_ENV}"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def resolve_dataset(
    path: str | os.PathLike | None = None,
    sha256: str | None = None,
    url: str = TINYSHAKESPEARE_URL,
) -> Path:
    """The dataset file to use: ``path``, else ``$BLOCKCAP_DATASET``, else the cached TinyShakespeare.

    An explicit file is checked against ``sha256`` when one is given; the cached copy is
    always checked against TinyShakespeare's hash, and downloaded on first use.
    """
    chosen = path or os.environ.get(DATASET_ENV)
    if chosen:
        p = Path(chosen).expanduser()
        if not p.is_file():
            raise BlockcapError(f"dataset {p} does not exist or is not a file; pass --dataset=PATH")
        if sha256:
            _verify(p, sha256)
        return p
    cached = cache_dir() / "tinyshakespeare.txt"
    if not cached.exists():
        download(url, cached, sha256 or TINYSHAKESPEARE_SHA256)
    _verify(cached, sha256 or TINYSHAKESPEARE_SHA256)
    return cached


def read_text(path: str | os.PathLike) -> str:
    """The dataset's text; an empty or undecodable file is a BlockcapError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BlockcapError(f"dataset {path} is not UTF-8 text ({e})") from e
    if not text:
        raise BlockcapError(f"dataset {path} is empty; pass a text file with --dataset=PATH")
    return text


class CharTokenizer:
    """Maps characters to ids in the order of ``vocab`` (sorted unique characters, as the original)."""

    def __init__(self, vocab: str) -> None:
        if len(set(vocab)) != len(vocab):
            raise BlockcapError("vocabulary has repeated characters")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return self.encode_tensor(text).tolist()

    def encode_tensor(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as int64, via a code-point lookup table (fast on megabytes)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(
            max(max(map(ord, self.vocab), default=0), int(codes.max(initial=0))) + 1, -1, np.int64
        )
        table[[ord(c) for c in self.vocab]] = np.arange(len(self.vocab))
        ids = table[codes]
        if (ids < 0).any():
            bad = chr(int(codes[np.argmax(ids < 0)]))
            raise BlockcapError(
                f"character {bad!r} is not in the model's vocabulary; "
                f"use a checkpoint trained on this text or remove the character"
            )
        return torch.from_numpy(ids)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def check_covers(self, text: str, what: str) -> None:
        """Raise naming the characters of ``text`` missing from the vocabulary."""
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            shown = "".join(missing[:20])
            raise BlockcapError(
                f"{what} has {len(missing)} characters not in the model's vocabulary "
                f"({shown!r}); use weights trained on this dataset"
            )


def split_tokens(data: torch.Tensor, split: str, train_fraction: float = TRAIN_FRACTION) -> torch.Tensor:
    """The original split: first ``int(0.9 * len)`` tokens train, the rest val; ``all`` is everything."""
    if split not in SPLITS:
        raise BlockcapError(f"split={split!r} is unknown; use one of {', '.join(SPLITS)}")
    n = int(train_fraction * len(data))
    return {"train": data[:n], "val": data[n:], "all": data}[split]


def window_count(n_tokens: int, sample_len: int, stride: int) -> int:
    """How many windows ``unfold(0, sample_len, stride)`` makes of ``n_tokens`` tokens."""
    return 0 if n_tokens < sample_len else (n_tokens - sample_len) // stride + 1


@dataclass(frozen=True)
class Windows:
    """Fixed-length windows of a token stream, as the original batcher made them."""

    tokens: torch.Tensor  # the split's token stream, int64
    sample_len: int
    stride: int

    def __len__(self) -> int:
        return window_count(len(self.tokens), self.sample_len, self.stride)

    def get(self, start: int, stop: int) -> torch.Tensor:
        """Windows ``start:stop`` as (stop - start, sample_len) int64."""
        lo = start * self.stride
        hi = (stop - 1) * self.stride + self.sample_len
        return self.tokens[lo:hi].unfold(0, self.sample_len, self.stride)

    def offsets(self, start: int, stop: int) -> torch.Tensor:
        """Start of each window in the split's token stream."""
        return torch.arange(start, stop, dtype=torch.int64) * self.stride
