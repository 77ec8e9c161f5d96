"""Content identity of input files: sha256 digests of datasets and weights.

Big files are hashed once and remembered, but a remembered digest is used only when it cannot
be another content's: the entry is keyed by the file's device, inode, size, mtime *and ctime*
(no user-space call sets ctime: replacing a file's content and restoring its mtime, as ``cp -p``,
``rsync -t`` or ``tar`` do, changes it), the file's sampled bytes must still hash the same, and
the entry must carry a MAC made with a per-user secret key, so a cache file written or copied by
anyone else vouches for nothing. The cache is ignored where another user could write it. A list
of files (a dataset's) is looked up with one read and at most one write of the cache, which keeps
the ``MAX_ENTRIES`` digests used last.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from blockcap.core.errors import BlockcapError

SAMPLES, SAMPLE_BYTES = 16, 4096  # blocks read at evenly spaced offsets for the sampled-bytes check
MAX_ENTRIES = 20_000  # digests remembered (about 400 bytes each), the least recently used dropped
BLOCK = 1 << 20


def cache_dir() -> Path:
    """Per-user cache directory (``$XDG_CACHE_HOME/blockcap``, else ``~/.cache/blockcap``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blockcap"


def _private(path: Path) -> bool:
    """Owned by this user and writable by no one else (else its content proves nothing)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _key(create: bool) -> bytes | None:
    """This user's secret key for the cache's MACs (made on first use), or None if not private."""
    d, path = cache_dir(), cache_dir() / "sha256.key"
    if create and not path.exists():
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        except OSError:
            pass  # another process made it, or the cache is not writable: read what is there
    if not (_private(d) and _private(path)):
        return None
    try:
        key = path.read_bytes()
    except OSError:
        return None
    return key if len(key) == 32 else None


def _mac(key: bytes, entry: list[Any]) -> str:
    return hmac.new(key, json.dumps(entry).encode(), hashlib.sha256).hexdigest()


def _sample(f: BinaryIO, size: int) -> str:
    """sha256 of ``SAMPLES`` blocks at evenly spaced offsets and of the last block."""
    h = hashlib.sha256()
    for i in range(SAMPLES + 1):
        f.seek(max(0, size - SAMPLE_BYTES) if i == SAMPLES else size * i // SAMPLES)
        h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, remembered (see the module docstring) so big files hash once."""
    return sha256_files([path])[0]


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """``sha256_file`` of each path, reading and writing the cache of remembered digests once for
    all of them (a dataset of many files is hashed in time linear in their number). The cache keeps
    the ``MAX_ENTRIES`` digests used last."""
    cache = cache_dir() / "sha256.json"
    key = _key(create=True)
    known = _load(cache) if key is not None and _private(cache) else {}
    before, fresh, out = list(known), False, []
    try:
        for path in paths:
            p = Path(path).resolve()
            value, record = _lookup(p, known.get(str(p)), key)
            out.append(value)
            if record is not None:
                fresh = fresh or known.get(str(p)) != record
                known.pop(str(p), None)
                known[str(p)] = record  # the most recently used last
    finally:
        if key is not None and (fresh or list(known) != before):
            _save(cache, dict(list(known.items())[-MAX_ENTRIES:]))
    return out


def _lookup(p: Path, hit: Any, key: bytes | None) -> tuple[str, list[Any] | None]:
    """The sha256 of ``p`` and its cache record (None where it must not be remembered)."""
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block here: it is refused below
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BlockcapError(f"{p} is not a regular file (a device, FIFO or socket); pass a file")
        entry = [str(p), *_stamp(st), _sample(f, st.st_size)]
        if (
            key is not None and isinstance(hit, list) and len(hit) == 3 and hit[0] == entry
            and isinstance(hit[1], str) and isinstance(hit[2], str)
            and hmac.compare_digest(hit[2], _mac(key, [*entry, hit[1]]))
        ):  # fmt: skip
            return hit[1], hit
        f.seek(0)
        value = _hash(f)
        if key is None or _stamp(os.fstat(f.fileno())) != entry[1:6]:  # changed while hashed: no entry
            return value, None
    return value, [entry, value, _mac(key, [*entry, value])]


def _save(cache: Path, known: dict[str, Any]) -> None:
    try:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # the cache is an optimisation only


def _hash(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


def _load(cache: Path) -> dict[str, Any]:
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
