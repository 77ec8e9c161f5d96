"""The token cache: a dataset's documents tokenized once, on disk, read by every run that needs them.

Keyed by content: the digest of the input files' contents, of the tokenizer (its ``tokenizer.json``
or char vocabulary) and of every option that changes the tokens (the text column), so a second run
over the same dataset and tokenizer — any blocks, sites or ``out`` — tokenizes nothing, and a
changed byte or tokenizer gives a new key. Layout of ``<root>/<key>/``::

    meta.json          key, inputs, tokenizer, counts, chunk list with crc32c of each file
    ids/00000.npy      token ids, smallest unsigned dtype, CHUNK_TOKENS per file
    docs/00000.npy     int64 (documents, 3): start in ids, input file, row; DOC_CHUNK per file

A build writes into a hidden staging directory and renames it into place when complete, under a
kernel lock on ``<key>.lock``: a build killed at any instant leaves nothing a later run uses, and
processes that want the same cache (torchrun ranks) wait for one builder instead of repeating it.
Readers map chunk files (memory is what they touch, never the corpus) and check each chunk's
crc32c the first time they map it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from blockcap.core.encoding import token_dtype
from blockcap.core.errors import BlockcapError
from blockcap.data.digest import cache_dir
from blockcap.data.encode import encoded
from blockcap.data.inputs import InputFile, content_digest
from blockcap.data.records import documents, text_column_of
from blockcap.data.tokenizers import Tokenizer

CACHE_VERSION = 1
CACHE_ENV = "BLOCKCAP_TOKEN_CACHE"
CHUNK_TOKENS = 1 << 22  # ids per chunk file (8 MB of uint16)
DOC_CHUNK = 1 << 18  # document records per chunk file (6 MB)


def cache_root(path: str | None = None) -> Path:
    """Where token caches live: ``path``, else ``$BLOCKCAP_TOKEN_CACHE``, else the user cache dir."""
    chosen = path or os.environ.get(CACHE_ENV)
    return Path(chosen).expanduser() if chosen else cache_dir() / "tokens"


def cache_key(files: list[InputFile], tokenizer: Tokenizer, text_column: str | None) -> str:
    """The content key of a dataset's tokens (see the module docstring)."""
    column = text_column_of(files, text_column)
    what = {"version": CACHE_VERSION, "dataset": content_digest(files), "tokenizer": tokenizer.sha256,
            "text_column": column}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


class _Chunks:
    """Numbered ``.npy`` chunk files written one after another from a stream of rows."""

    def __init__(self, directory: Path, rows: int, dtype: np.dtype, width: int = 0) -> None:
        self.directory, self.rows, self.dtype = directory, rows, dtype
        self.shape = (rows, width) if width else (rows,)
        self.buf = np.empty(self.shape, dtype)
        self.fill = 0
        self.done: list[dict[str, Any]] = []
        directory.mkdir(parents=True)

    def add(self, data: np.ndarray) -> None:
        while len(data):
            n = min(len(data), self.rows - self.fill)
            self.buf[self.fill : self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == self.rows:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        name = f"{len(self.done):05d}.npy"
        part = np.ascontiguousarray(self.buf[: self.fill])
        np.save(self.directory / name, part)
        self.done.append({"file": name, "rows": self.fill, "crc32c": google_crc32c.value(part.tobytes())})
        self.fill = 0


def _write(staging: Path, files: list[InputFile], tokenizer: Tokenizer, text_column: str | None,
           options: dict[str, Any], progress: Callable[[int, int, int], None]) -> dict[str, Any]:  # fmt: skip
    """Tokenize every document into ``staging``; returns the counts for meta.json."""
    dtype = token_dtype(tokenizer.vocab_size)
    ids = _Chunks(staging / "ids", CHUNK_TOKENS, dtype)
    docs = _Chunks(staging / "docs", DOC_CHUNK, np.dtype(np.int64), 3)
    n_tokens = n_docs = hard = max_id = 0
    names = [f.path for f in files]
    recorded = None  # the document whose record was written last (a streamed one comes in parts)
    for doc, tokens, cut in encoded(tokenizer, documents(files, text_column, options), progress, names):
        hard += cut
        if tokens.size == 0:  # an empty document adds nothing, no separator either
            continue
        max_id = max(max_id, int(tokens.max()))
        if max_id >= tokenizer.vocab_size or tokens.min() < 0:
            raise BlockcapError(
                f"tokenizer gave id {max_id} outside its vocabulary of {tokenizer.vocab_size}"
            )
        if doc is not recorded:
            docs.add(np.asarray([[n_tokens, doc.file, doc.row]], np.int64))
            recorded = doc
            n_docs += 1
        ids.add(tokens.astype(dtype))
        n_tokens += tokens.size
    ids.flush()
    docs.flush()
    if n_tokens == 0:
        where = files[0].path if len(files) == 1 else f"with {len(files)} files"
        raise BlockcapError(f"dataset {where} is empty (no tokens); pass a text dataset")
    return {"n_tokens": n_tokens, "n_documents": n_docs, "max_id": max_id, "hard_cuts": hard,
            "dtype": str(dtype), "ids": ids.done, "docs": docs.done}  # fmt: skip


class _Lock:
    """A kernel lock on ``path`` (dropped by the kernel when its holder dies); blocks until free."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"blockcap: waiting for another process building the token cache {self.path.stem}",
                  file=sys.stderr, flush=True)  # fmt: skip
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def build_cache(
    files: list[InputFile], tokenizer: Tokenizer, text_column: str | None, root: Path,
    options: dict[str, Any] | None = None, progress: Callable[[int, int, int], None] | None = None,
    wait: bool = False,
) -> TokenCache:  # fmt: skip
    """The committed cache of this dataset and tokenizer, built now unless one exists (``wait``:
    never build, wait for another process to commit it)."""
    key = cache_key(files, tokenizer, text_column)
    if wait:
        return _wait_for(root, key)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BlockcapError(f"cannot create the token cache directory {root} ({e.strerror}); "
                            f"pass token_cache=DIR or set {CACHE_ENV}") from None  # fmt: skip
    with _Lock(root / f"{key}.lock"):
        return open_cache(root, key) or _build_locked(
            root, key, files, tokenizer, text_column, options, progress
        )


def _build_locked(
    root: Path, key: str, files: list[InputFile], tokenizer: Tokenizer, text_column: str | None,
    options: dict[str, Any] | None, progress: Callable[[int, int, int], None] | None,
) -> TokenCache:  # fmt: skip
    """Build cache ``key`` into a staging directory and rename it into place (the lock is held)."""
    for stale in root.glob(f".{key}.*.building"):  # what a killed builder left
        shutil.rmtree(stale, ignore_errors=True)
    staging = root / f".{key}.{uuid.uuid4().hex[:12]}.building"
    try:
        counts = _write(staging, files, tokenizer, text_column, dict(options or {}), progress or _quiet)
        meta = {"version": CACHE_VERSION, "key": key, "inputs": [f.record() for f in files],
                "tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.sha256},
                "text_column": text_column, **counts}  # fmt: skip
        (staging / "meta.json").write_text(json.dumps(meta))
        _sync_tree(staging)
        if (root / key).exists():  # damaged (a file missing): replaced by this build
            shutil.rmtree(root / key)
        os.rename(staging, root / key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    cache = open_cache(root, key)
    if cache is None:
        raise BlockcapError(
            f"the token cache {root / key} does not read back after its build; check that disk"
        )
    return cache


def _wait_for(root: Path, key: str, poll: float = 0.5) -> TokenCache:
    """The cache ``key`` once another process has committed it (torchrun stops this one if it dies)."""
    said = False
    while (cache := open_cache(root, key)) is None:
        if not said:
            print(f"blockcap: waiting for the token cache {key} to be built", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll)
    return cache


def _quiet(file: int, at: int, tokens: int) -> None:
    pass


def _sync_tree(directory: Path) -> None:
    """Every file of a staged build on disk before its rename makes it visible."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


_KEY = re.compile(r"[0-9a-f]{32}")


def open_cache(root: Path, key: str) -> TokenCache | None:
    """The committed cache ``key`` under ``root``, or None when there is none (or it is damaged)."""
    if not _KEY.fullmatch(key):
        return None
    try:
        meta = json.loads((root / key / "meta.json").read_text())
        cache = TokenCache(root / key, meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cache if cache.whole() else None


class TokenCache:
    """A committed token cache, read through memory maps of its chunk files."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        self.key: str = meta["key"]
        self.n_tokens: int = int(meta["n_tokens"])
        self.n_documents: int = int(meta["n_documents"])
        self.max_id: int = int(meta["max_id"])
        self.dtype = np.dtype(meta["dtype"])
        self._ids = _Mapped(directory / "ids", meta["ids"], CHUNK_TOKENS)
        self._docs = _Mapped(directory / "docs", meta["docs"], DOC_CHUNK)

    def whole(self) -> bool:
        """Every chunk file is there with the size meta.json gives it (contents: crc32c on first use)."""
        return self._ids.whole() and self._docs.whole()

    def ids(self, lo: int, hi: int) -> np.ndarray:
        """Token ids ``lo:hi`` of the documents, concatenated without separators (int64)."""
        return self._ids.rows(lo, hi).astype(np.int64)

    def docs(self, lo: int, hi: int) -> np.ndarray:
        """Records of documents ``lo:hi``: (start in ids, input file, row), int64 (n, 3)."""
        return self._docs.rows(lo, hi)

    def doc_chunk_firsts(self) -> np.ndarray:
        """The first document start of each docs chunk (for a search that maps one chunk)."""
        return self._docs.firsts

    def iter_docs(self) -> Iterator[np.ndarray]:
        """Document records, a chunk at a time."""
        for c in range(len(self._docs.entries)):
            yield self._docs.chunk(c)


class _Mapped:
    """Chunk files of one array, read by ranges (no mapping is kept: memory is what a read returns),
    each file checked against its crc32c the first time this process reads from it."""

    def __init__(self, directory: Path, entries: list[dict[str, Any]], rows: int) -> None:
        self.directory, self.entries, self.per_file = directory, entries, rows
        self.checked: set[int] = set()
        self.firsts = np.zeros(0, np.int64)
        if directory.name == "docs" and entries:  # start of each chunk's first document
            self.firsts = np.asarray([self._read(c, 0, 1)[0, 0] for c in range(len(entries))], np.int64)

    def whole(self) -> bool:
        for e in self.entries:
            path = self.directory / e["file"]
            if not path.is_file() or path.stat().st_size < e["rows"]:
                return False
        return True

    def _damaged(self, path: Path, why: str) -> BlockcapError:
        return BlockcapError(
            f"token cache file {path} is damaged ({why}); delete {self.directory.parent} and re-run: "
            f"the tokens are computed again"
        )

    def _header(self, c: int) -> tuple[Path, int, tuple[int, ...], np.dtype]:
        path = self.directory / self.entries[c]["file"]
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_2_0
                    if version >= (2, 0)
                    else np.lib.format.read_array_header_1_0
                )
                shape, _, dtype = read(f)
                offset = f.tell()
        except (OSError, ValueError) as e:
            raise self._damaged(path, str(e)) from None
        if shape[0] != self.entries[c]["rows"]:
            raise self._damaged(path, f"{shape[0]} rows, not {self.entries[c]['rows']}")
        if c not in self.checked:
            crc, left = 0, path.stat().st_size - offset
            with open(path, "rb") as f:
                f.seek(offset)
                while block := f.read(1 << 20):
                    crc = google_crc32c.extend(crc, block)
            if crc != self.entries[c]["crc32c"] or left != int(np.prod(shape)) * dtype.itemsize:
                raise self._damaged(path, "its checksum fails")
            self.checked.add(c)
        return path, offset, shape, dtype

    def _read(self, c: int, lo: int, hi: int) -> np.ndarray:
        path, offset, shape, dtype = self._header(c)
        width = int(np.prod(shape[1:]))
        data = np.fromfile(path, dtype, (hi - lo) * width, offset=offset + lo * width * dtype.itemsize)
        return data.reshape(hi - lo, *shape[1:])

    def chunk(self, c: int) -> np.ndarray:
        return self._read(c, 0, self.entries[c]["rows"])

    def rows(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        for c in range(lo // self.per_file, (hi - 1) // self.per_file + 1) if hi > lo else ():
            base = c * self.per_file
            parts.append(self._read(c, max(lo, base) - base, min(hi, base + self.per_file) - base))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
