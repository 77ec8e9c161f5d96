"""Datasets: where the text comes from, its token stream, the split and the windows.

A dataset is a text file (TinyShakespeare by default, downloaded once and sha256-checked), a
directory of ``.txt`` files (sorted), or a ``.jsonl``/``.parquet`` file with a text column; each
file, line or row is a document. Documents are tokenized streamed in pieces and joined with the
tokenizer's end-of-text token where it has one. The split and windows follow the original:
``val`` is the last 10 % of the token stream, windows are ``unfold(0, sample_len, stride)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from blockcap.core.errors import BlockcapError
from blockcap.data.digest import cache_dir, sha256_file
from blockcap.data.records import PIECE_CHARS
from blockcap.data.tokenizers import Tokenizer

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATASET_ENV = "BLOCKCAP_DATASET"
TABLE_SUFFIXES = (".jsonl", ".parquet")
DEFAULT_TEXT_COLUMN = "text"


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


def _text_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise BlockcapError(f"dataset directory {directory} has no .txt files")
    return files


def dataset_sha256(path: Path) -> str:
    """The dataset's identity: a file's sha256, or for a directory the sha256 of its files' hashes."""
    if path.is_dir():
        lines = "".join(f"{p.name}\0{sha256_file(p)}\n" for p in _text_files(path))
        return hashlib.sha256(lines.encode()).hexdigest()
    return sha256_file(path)


def resolve_dataset(
    path: str | os.PathLike | None = None,
    sha256: str | None = None,
    url: str = TINYSHAKESPEARE_URL,
) -> Path:
    """The dataset to use: ``path``, else ``$BLOCKCAP_DATASET``, else the cached TinyShakespeare.

    An explicit dataset is checked against ``sha256`` when one is given; the cached copy is
    always checked against TinyShakespeare's hash, and downloaded on first use.
    """
    chosen = path or os.environ.get(DATASET_ENV)
    if chosen:
        p = Path(chosen).expanduser()
        if not p.exists():
            raise BlockcapError(
                f"dataset {p} does not exist; pass a text file, a directory or a .jsonl/.parquet"
            )
        if sha256 and dataset_sha256(p) != sha256:
            raise BlockcapError(
                f"dataset {p} has sha256 {dataset_sha256(p)}, expected {sha256}; pass the right dataset"
            )
        return p
    cached = cache_dir() / "tinyshakespeare.txt"
    if not cached.exists():
        download(url, cached, sha256 or TINYSHAKESPEARE_SHA256)
    _verify(cached, sha256 or TINYSHAKESPEARE_SHA256)
    return cached


def _pieces(path: Path) -> Iterator[str]:
    """A text file in pieces of ``PIECE_CHARS`` characters (UTF-8 decoded, never split mid-character)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while piece := f.read(PIECE_CHARS):
                yield piece
    except UnicodeDecodeError as e:
        raise BlockcapError(f"dataset {path} is not UTF-8 text ({e})") from None


def _jsonl_rows(path: Path, column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BlockcapError(f"dataset {path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or column not in row:
                raise BlockcapError(f"dataset {path} line {n} has no text_column {column!r}")
            if not isinstance(row[column], str):
                raise BlockcapError(f"dataset {path} line {n}: {column!r} is not a string")
            yield row[column]


def _parquet_rows(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BlockcapError(
            f"dataset {path}: reading .parquet needs pyarrow; install blockcap with the parquet extra"
        ) from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types
        raise BlockcapError(f"dataset {path} is not a readable parquet file ({e})") from None
    if column not in table.schema_arrow.names:
        raise BlockcapError(
            f"dataset {path} has no text_column {column!r}; "
            f"its columns are {', '.join(table.schema_arrow.names)}"
        )
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        yield from (v if isinstance(v, str) else "" for v in batch.column(0).to_pylist())


def documents(path: Path, text_column: str | None) -> Iterator[Iterator[str]]:
    """Each document of the dataset, as an iterator of text pieces."""
    if path.suffix in TABLE_SUFFIXES:
        column = text_column or DEFAULT_TEXT_COLUMN
        rows = _jsonl_rows(path, column) if path.suffix == ".jsonl" else _parquet_rows(path, column)
        for text in rows:
            yield iter((text,))
        return
    if text_column is not None:
        raise BlockcapError(f"text_column={text_column!r} is for .jsonl and .parquet datasets, not {path}")
    for f in _text_files(path) if path.is_dir() else [path]:
        yield _pieces(f)


def token_stream(path: Path, tokenizer: Tokenizer, text_column: str | None = None) -> np.ndarray:
    """The dataset's token ids (int64), documents joined with the end-of-text token when there is one."""
    parts: list[np.ndarray] = []
    sep = None if tokenizer.eos_id is None else np.asarray([tokenizer.eos_id], np.int64)
    for doc in documents(path, text_column):
        ids, _ = tokenizer.encode_stream(doc)
        if ids.size == 0:  # an empty document adds no separator either
            continue
        if parts and sep is not None:
            parts.append(sep)
        parts.append(ids)
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if stream.size == 0:
        raise BlockcapError(f"dataset {path} is empty (no tokens); pass a text dataset")
    return stream


def read_text(path: str | os.PathLike, text_column: str | None = None) -> str:
    """The whole text of a dataset (the char GPT's raw state dicts take their vocabulary from it)."""
    text = "".join(piece for doc in documents(Path(path), text_column) for piece in doc)
    if not text:
        raise BlockcapError(f"dataset {path} is empty; pass a text dataset")
    return text
