"""Where a store lives: a local directory or an object-store URL (s3://, gs://, az://, memory://).

Every byte blockcap writes into a store passes through ``Location.put``, ``delete`` or
``rename_to``: one choke point, atomic per object (a local file is written to a temporary name
and renamed into place; an object-store PUT is atomic by itself). Reading goes through zarr's own
store for the same place (``zarr_store``). Tests register ``WRITE_HOOKS`` to count writes and
kill the process after any one of them.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from blockcap.core.errors import BlockcapError

PARTIAL = ".partial"  # suffix of a local file not yet renamed into place
# Called as hook(operation, key) after every mutation (and before a local rename: "put-partial").
WRITE_HOOKS: list[Callable[[str, str], None]] = []


def _wrote(op: str, key: str) -> None:
    for hook in WRITE_HOOKS:
        hook(op, key)


def is_url(out: str) -> bool:
    return "://" in out and not out.startswith("file://")


class Location:
    """A store's place; ``key``s are relative to its root, with ``/`` separators."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(out)
        self.storage_options = dict(storage_options or {})
        self.local = not is_url(self.url)
        if self.local:
            self.root = Path(self.url.removeprefix("file://")).expanduser()
            self.fs = None
            self.path = str(self.root)
        else:
            self.fs, self.path = _filesystem(self.url, self.storage_options)
            self.root = None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def sibling(self, suffix: str) -> Location:
        """The location named like this one plus ``suffix`` (e.g. ``out.replaced``)."""
        return Location(self.url.rstrip("/") + suffix, self.storage_options)

    def _remote(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """An object-store call whose failures (credentials, network, permissions) are one line."""
        try:
            return fn(*args, **kw)
        except (FileNotFoundError, BlockcapError):
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise BlockcapError(
                f"{self.url}: the object store failed ({type(e).__name__}: {first})"
            ) from None

    def _remote_write(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """As ``_remote``, as an OSError: a failed write leaves a resumable store, like a full disk."""
        try:
            return self._remote(fn, *args, **kw)
        except BlockcapError as e:
            raise OSError(str(e)) from None

    # --- reading -----------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        try:
            if self.local:
                return (self.root / key).read_bytes()
            return self._remote(self.fs.cat_file, f"{self.path}/{key}")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def exists(self, key: str = "") -> bool:
        if self.local:
            return (self.root / key).exists()
        return self._remote(self.fs.exists, f"{self.path}/{key}".rstrip("/"))

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under ``prefix`` (relative keys, sorted); local temp files left out."""
        if self.local:
            base = self.root / prefix
            if not base.is_dir():
                return []
            found = []
            for dirpath, _, files in os.walk(base):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                found += [f if rel == "." else f"{rel}/{f}" for f in files if not f.endswith(PARTIAL)]
            return sorted(found)
        base = f"{self.path}/{prefix}".rstrip("/")
        self._remote(self.fs.invalidate_cache, base)  # other processes write too: no cached listing
        try:
            return sorted(p[len(self.path) + 1 :] for p in self._remote(self.fs.find, base))
        except FileNotFoundError:
            return []

    def sizes(self) -> dict[str, int]:
        """Every object's size in bytes, from one listing."""
        if self.local:
            return {k: (self.root / k).stat().st_size for k in self.keys()}
        self._remote(self.fs.invalidate_cache, self.path)
        found = self._remote(self.fs.find, self.path, detail=True)
        return {p[len(self.path) + 1 :]: int(info.get("size", 0)) for p, info in found.items()}

    def is_empty(self) -> bool:
        """Nothing stored here (an empty local directory, or no object under the prefix)."""
        if self.local:
            if os.path.islink(self.root) and not self.root.exists():
                return False  # a dangling symbolic link is something in the way, not nothing
            return not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))
        self._remote(self.fs.invalidate_cache, self.path)
        try:
            return not self._remote(self.fs.ls, self.path)
        except FileNotFoundError:
            return True

    def is_file(self) -> bool:
        return self.local and self.root.is_file()

    def partial_files(self) -> list[Path]:
        """Temporary files a killed writer left behind (local stores only)."""
        return sorted(self.root.rglob(f"*{PARTIAL}")) if self.local and self.root.is_dir() else []

    def free_bytes(self) -> int | None:
        """Free space where the store would go (None for object storage)."""
        if not self.local:
            return None
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def check_parent(self) -> None:
        """One line when a local store could not be created where asked."""
        if not self.local:
            return
        if self.root.is_file():
            raise BlockcapError(f"out={self.url!r} is a file; pass a directory path for the store")
        if os.path.islink(self.root) and not self.root.exists():
            raise BlockcapError(
                f"out={self.url!r} is a symbolic link to nothing; remove it or choose another out=PATH"
            )
        parent = self.root.absolute().parent
        if not parent.is_dir():
            raise BlockcapError(f"out={self.url!r}: directory {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise BlockcapError(f"out={self.url!r}: directory {parent} is not writable")

    # --- writing: every mutation of a store goes through here ---------------------------------
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Write one object atomically: readers see the old object, or the new one whole."""
        if self.local:
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{PARTIAL}")
            with open(tmp, "wb") as f:
                f.write(data)
            _wrote("put-partial", key)
            os.replace(tmp, path)
        else:
            self._remote_write(self.fs.pipe_file, f"{self.path}/{key}", bytes(data))
        _wrote("put", key)

    def put_many(self, objects: dict[str, bytes]) -> None:
        """Write several independent objects: in key order locally, concurrently on object storage."""
        if self.local:
            for key in sorted(objects):
                self.put(key, objects[key])
            return
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda kv: self.put(*kv), sorted(objects.items())))

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Read several objects (concurrently on object storage, where each read is a round trip)."""
        if self.local:
            return [self.get(k) for k in keys]
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(self.get, keys))

    def put_first(self, key: str, data: bytes) -> None:
        """Write the first object of a new store; a local store directory appears with it, atomically.

        (Otherwise a reader could find the directory already made and still empty.)
        """
        if not self.local or self.root.exists():
            self.put(key, data)
            return
        staging = self.root.with_name(f".{self.root.name}.{uuid.uuid4().hex[:12]}.creating")
        try:
            Location(str(staging)).put(key, data)
            os.rename(staging, self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _wrote("rename", str(self.root))

    def delete(self, key: str) -> None:
        if self.local:
            (self.root / key).unlink(missing_ok=True)
        elif self._remote(self.fs.exists, f"{self.path}/{key}"):
            self._remote_write(self.fs.rm_file, f"{self.path}/{key}")
        _wrote("delete", key)

    def remove_partial_files(self) -> int:
        files = self.partial_files()
        for p in files:
            p.unlink(missing_ok=True)
            _wrote("delete", str(p))
        return len(files)

    def rename_to(self, dst: Location) -> None:
        """Move the whole store (local: one atomic rename)."""
        if not (self.local and dst.local):
            raise ValueError("rename_to is for local stores; object stores copy")
        os.replace(self.root, dst.root)
        _wrote("rename", str(dst.root))

    def remove_tree(self) -> None:
        """Delete the whole store. Local: renamed out of sight first, so it vanishes at once."""
        if self.local:
            if not self.root.exists():
                return
            trash = self.root.with_name(f".{self.root.name}.{uuid.uuid4().hex[:12]}.trash")
            os.replace(self.root, trash)
            _wrote("rename", str(trash))
            shutil.rmtree(trash, ignore_errors=True)
        else:  # the root document last: a half-deleted store is still recognisably ours
            keys = self.keys()
            rest = [f"{self.path}/{k}" for k in keys if k != "zarr.json"]
            if rest:
                self._remote_write(self.fs.rm, rest)
            if "zarr.json" in keys:
                self._remote_write(self.fs.rm_file, f"{self.path}/zarr.json")
        _wrote("delete", "")

    def copy_to(self, dst: Location, keys: list[str]) -> None:
        """Copy objects to the same keys under ``dst`` (server-side on object stores)."""
        if self.local or dst.local or type(self.fs) is not type(dst.fs):
            for key in keys:
                dst.put(key, self.get(key))
            return
        if keys:
            self._remote_write(
                self.fs.copy, [f"{self.path}/{k}" for k in keys], [f"{dst.path}/{k}" for k in keys]
            )
        _wrote("copy", dst.url)

    def stale_trash(self) -> list[Path]:
        """Directories a kill left beside this store: trash being removed, or a store being staged.

        Recognised by the exact names blockcap gives them (a 12-digit hex token), nothing looser.
        """
        if not self.local or not self.root.parent.is_dir():
            return []
        mine = re.compile(rf"\.{re.escape(self.root.name)}\.[0-9a-f]{{12}}\.(trash|creating)")
        return sorted(p for p in self.root.parent.iterdir() if mine.fullmatch(p.name) and p.is_dir())

    # --- zarr -----------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool = True) -> Any:
        """zarr's own store for this place, for reading arrays."""
        if self.local:
            from zarr.storage import LocalStore

            return LocalStore(self.root, read_only=read_only)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)


def _filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise BlockcapError(
            f"{url} needs fsspec (and s3fs for s3://); install blockcap with the s3 extra"
        ) from None
    try:
        fs, path = fsspec.url_to_fs(url, **options)
    except ImportError as e:
        raise BlockcapError(
            f"cannot open {url}: {e}; install the fsspec backend for it (s3fs for s3://)"
        ) from None
    except Exception as e:  # bad storage_options: each backend raises its own kind
        raise BlockcapError(
            f"cannot open {url} with storage_options={options!r} ({type(e).__name__}: {e})"
        ) from None
    return fs, path.rstrip("/")
