"""Content identity of input files: sha256 digests of datasets and weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """Per-user cache directory (``$XDG_CACHE_HOME/blockcap``, else ``~/.cache/blockcap``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blockcap"


def _hash_cache() -> Path:
    return cache_dir() / "sha256.json"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, remembered by (path, size, mtime) so big files hash once."""
    p = Path(path).resolve()
    st = p.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        known = json.loads(_hash_cache().read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(p)) if isinstance(known, dict) else None
    if isinstance(entry, list) and entry[:2] == stamp:
        return entry[2]
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:
        cache = _hash_cache()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}), str(p): [*stamp, value]}))
        os.replace(tmp, cache)
    except OSError:
        pass  # the cache is an optimisation only
    return value
