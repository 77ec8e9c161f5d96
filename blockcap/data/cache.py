"""The token cache: a dataset's documents tokenized once, on disk, read by every run that needs them.

Keyed by content: the digest of the input files' contents, of the tokenizer (its ``tokenizer.json``
or char vocabulary) and of every option that changes the tokens (the text column), so a second run
over the same dataset and tokenizer — any blocks, sites or ``out`` — tokenizes nothing, and a
changed byte or tokenizer gives a new key. Layout of ``<root>/<key>/``::

    meta.json          key, inputs, tokenizer, counts, chunk list with crc32c of each file, and the
                       sha256 of all that (an edited meta.json is a damaged cache)
    ids/00000.npy      token ids, smallest unsigned dtype, CHUNK_TOKENS per file
    docs/00000.npy     int64 (documents, 3): start in ids, input file, row; DOC_CHUNK per file

A build writes into a hidden staging directory and renames it into place when complete, under a
kernel lock on ``<key>.lock`` (deleted by its holder when done, see ``_Lock``): a build killed at
any instant leaves nothing a later run uses, and processes that want the same cache (torchrun
ranks) wait for one builder instead of repeating it. Reading a committed cache takes no lock (its
commit is one rename), so a read-only cache directory serves the caches it holds.

Opening a cache checks what is cheap before a run writes anything (``cachefiles``): meta.json
against its sha256 and its counts against the chunk list, every chunk file's size against its rows
(a truncated file), and the crc32c of each array's first and last chunk (where a run's first batch
reads unless the cache is large). Any mismatch makes the cache damaged: it is built again, as a
missing one is. Every other chunk's crc32c is checked the first time a process reads it: a byte
flipped deep in a large cache stops the run there in one line (committed units are kept) that
says to delete the cache and re-run. Reading a 100 GB cache at every open would cost more than
the runs it serves; 6000 chunk files (25 G tokens) open in about 0.1 s.
"""

from __future__ import annotations

import contextlib
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
from blockcap.data.cachefiles import ChunkFiles, Invalid, count, expect
from blockcap.data.digest import cache_dir
from blockcap.data.encode import encoded
from blockcap.data.inputs import InputFile, content_digest
from blockcap.data.records import documents, text_column_of
from blockcap.data.tokenizers import Tokenizer

CACHE_VERSION = 2  # 2: a byte order mark at the start of a file is no text
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


def _unwritable(root: Path, what: str, e: OSError) -> BlockcapError:
    return BlockcapError(
        f"cannot {what} in the token cache directory {root} ({e.strerror}); "
        f"pass token_cache=A_WRITABLE_DIR or set {CACHE_ENV}"
    )


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
        try:
            np.save(self.directory / name, part)
        except OSError as e:
            raise _unwritable(self.directory.parent.parent, f"write {name}", e) from None
        self.done.append({"file": name, "rows": self.fill, "crc32c": google_crc32c.value(part.tobytes())})
        self.fill = 0


def _write(staging: Path, files: list[InputFile], tokenizer: Tokenizer, text_column: str | None,
           options: dict[str, Any], progress: Callable[[int, int, int], None]) -> dict[str, Any]:  # fmt: skip
    """Tokenize every document into ``staging``; returns the counts for meta.json."""
    dtype = token_dtype(tokenizer.vocab_size)
    ids = _Chunks(staging / "ids", CHUNK_TOKENS, dtype)
    docs = _Chunks(staging / "docs", DOC_CHUNK, np.dtype(np.int64), 3)
    n_tokens = n_docs = hard = max_id = 0
    firsts: list[int] = []  # each docs chunk's first start: an open reads no docs chunk
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
            if n_docs % DOC_CHUNK == 0:
                firsts.append(n_tokens)
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
            "dtype": str(dtype), "ids": ids.done, "docs": docs.done, "doc_firsts": firsts}  # fmt: skip


def _seal(meta: dict[str, Any]) -> str:
    """The sha256 meta.json carries of the rest of itself."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


class _Lock:
    """A kernel lock on ``path`` (dropped by the kernel when its holder dies); blocks until free.

    The holder deletes the file before it lets go, so no lock file outlives its build. A process
    that was waiting on the deleted file then holds a lock on a name no one else can find: it sees
    that ``path`` is no longer its file and locks the file now there instead, so two processes never
    both hold the lock of one path.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _Lock:
        said = False
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    print(f"blockcap: waiting for another process building the token cache {self.path.stem}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if self._current(fd):
                self.fd = fd
                return self
            os.close(fd)

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT
        try:
            try:
                return os.open(self.path, flags, 0o644)
            except FileNotFoundError:  # a failed build removed the directory it had made: again
                _make_dirs(self.path.parent)
                return os.open(self.path, flags, 0o644)
        except OSError as e:
            raise _unwritable(self.path.parent, f"create {self.path.name}", e) from None

    def _current(self, fd: int) -> bool:
        """``fd`` is the file at ``path`` (not one its last holder deleted)."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while held: see the class docstring
        os.close(self.fd)


def _make_dirs(root: Path) -> list[Path]:
    """Create ``root`` and its missing parents; returns those it made, deepest first."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BlockcapError(
            f"cannot create the token cache directory {root} ({e.strerror}); "
            f"pass token_cache=A_WRITABLE_DIR or set {CACHE_ENV}"
        ) from None
    return missing


def build_cache(
    files: list[InputFile], tokenizer: Tokenizer, text_column: str | None, root: Path,
    options: dict[str, Any] | None = None, progress: Callable[[int, int, int], None] | None = None,
    wait: bool = False,
) -> TokenCache:  # fmt: skip
    """The committed cache of this dataset and tokenizer, built now unless one exists (``wait``:
    never build, wait for another process to commit it). Only a build writes under ``root``: a
    build that fails leaves no directory it made there, and no lock file."""
    key = cache_key(files, tokenizer, text_column)
    if wait:
        return _wait_for(root, key)
    found = open_cache(root, key)  # committed by one rename: read without the lock
    if found is not None:
        return found
    made = _make_dirs(root)
    try:
        with _Lock(root / f"{key}.lock"):
            try:
                return _load(root, key)  # another process built it meanwhile
            except Invalid as e:
                if (root / key).exists():
                    print(f"blockcap: the token cache {root / key} is damaged ({e}); building it again",
                          file=sys.stderr, flush=True)  # fmt: skip
            return _build_locked(root, key, files, tokenizer, text_column, options, progress)
    except BaseException:
        for d in made:
            try:
                d.rmdir()  # only if empty: another process may be using it
            except OSError:
                break
        raise


def _build_locked(
    root: Path, key: str, files: list[InputFile], tokenizer: Tokenizer, text_column: str | None,
    options: dict[str, Any] | None, progress: Callable[[int, int, int], None] | None,
) -> TokenCache:  # fmt: skip
    """Build cache ``key`` into a staging directory and rename it into place (the lock is held)."""
    for stale in root.glob(f".{key}.*.building"):  # what a killed builder left
        shutil.rmtree(stale, ignore_errors=True)
    staging = root / f".{key}.{uuid.uuid4().hex[:12]}.building"
    try:
        try:
            staging.mkdir()
        except OSError as e:
            raise _unwritable(root, f"create {staging.name}", e) from None
        counts = _write(staging, files, tokenizer, text_column, dict(options or {}), progress or _quiet)
        meta = {"version": CACHE_VERSION, "key": key, "inputs": [f.record() for f in files],
                "tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.sha256},
                "text_column": text_column, **counts}  # fmt: skip
        try:
            (staging / "meta.json").write_text(json.dumps({**meta, "sha256": _seal(meta)}))
            _sync_tree(staging)
            if (root / key).exists():  # damaged: replaced by this build
                shutil.rmtree(root / key)
            os.rename(staging, root / key)
        except OSError as e:
            raise _unwritable(root, f"commit {key}", e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        return _load(root, key)
    except Invalid as e:
        raise BlockcapError(
            f"the token cache {root / key} does not read back after its build ({e}); check that disk"
        ) from None


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
    try:
        return _load(root, key)
    except Invalid:
        return None


def _load(root: Path, key: str) -> TokenCache:
    """The committed cache ``key``, checked as the module docstring says; raises Invalid."""
    expect(bool(_KEY.fullmatch(key)), "not a cache key")
    try:
        meta = json.loads((root / key / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise Invalid(f"meta.json does not read: {e}") from None
    expect(
        isinstance(meta, dict) and "sha256" in meta, "meta.json has no sha256 (an older blockcap wrote it)"
    )
    expect(meta.pop("sha256") == _seal(meta), "meta.json does not match its sha256")
    try:
        return TokenCache(root / key, meta)
    except (KeyError, TypeError, ValueError) as e:
        raise Invalid(f"meta.json lacks or garbles {e}") from None
    except OSError as e:
        raise Invalid(f"a chunk file does not read: {e}") from None


class TokenCache:
    """A committed token cache, read by ranges of its chunk files (see ``_load``; raises Invalid
    when the cache is not what its meta.json says)."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        expect(meta["key"] == directory.name and meta["version"] == CACHE_VERSION, "another key or version")
        self.key: str = meta["key"]
        self.n_tokens: int = count(meta["n_tokens"], "n_tokens")
        self.n_documents: int = count(meta["n_documents"], "n_documents")
        self.dtype = np.dtype(meta["dtype"])
        expect(self.dtype.kind == "u", f"token dtype {self.dtype}")
        self.max_id: int = meta["max_id"]
        expect(type(self.max_id) is int and 0 <= self.max_id <= np.iinfo(self.dtype).max, "max_id")
        self._ids = ChunkFiles(directory / "ids", meta["ids"], CHUNK_TOKENS, self.n_tokens, self.dtype)
        self._docs = ChunkFiles(
            directory / "docs", meta["docs"], DOC_CHUNK, self.n_documents, np.dtype(np.int64), 3
        )
        self._firsts = np.asarray(meta["doc_firsts"], np.int64)
        expect(
            len(self._firsts) == len(self._docs.entries) and self._firsts[0] == 0
            and bool(np.all(np.diff(self._firsts) > 0)) and self._firsts[-1] < self.n_tokens,
            "doc_firsts do not fit the documents",
        )  # fmt: skip

    def ids(self, lo: int, hi: int) -> np.ndarray:
        """Token ids ``lo:hi`` of the documents, concatenated without separators (int64)."""
        return self._ids.rows(lo, hi).astype(np.int64)

    def docs(self, lo: int, hi: int) -> np.ndarray:
        """Records of documents ``lo:hi``: (start in ids, input file, row), int64 (n, 3)."""
        return self._docs.rows(lo, hi)

    def doc_chunk_firsts(self) -> np.ndarray:
        """The first document start of each docs chunk (for a search that maps one chunk)."""
        return self._firsts

    def iter_docs(self) -> Iterator[np.ndarray]:
        """Document records, a chunk at a time."""
        for c in range(len(self._docs.entries)):
            yield self._docs.chunk(c)
