"""Where a store lives: a local directory or an object-store URL (s3://, gs://, az://, memory://).

Every byte blockcap writes into a store passes through ``Location.put``, ``delete`` or
``rename_to``: one choke point, atomic per object (a local file is written to a temporary name
and renamed into place; an object-store PUT is atomic by itself); when ``durable``, every object
and the directory entries naming it are on disk before an object that vouches for it (a commit
record, the root document: ``Location.commit``) appears, so on power loss a commit never
outlives what it vouches for. Reading goes through zarr's own store for the same place
(``zarr_store``). Tests register ``WRITE_HOOKS`` to count writes and kill the process after any
one of them.

Keys are confined: every key is checked to be a relative name of the store's own kind (no
``..``, no absolute path, no odd characters) before any read, write or delete, and a local
write or delete must land inside the store's real directory (no symbolic link inside a store
leads a write out of it), so a hostile store's metadata cannot make blockcap touch anything
outside the store. Before every mutation ``stops.check_stop`` honours a stop a signal requested
and the guards that forbid writing (a lease lost).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from blockcap.core.errors import BlockcapError
from blockcap.storage.durable import fsync_all, fsync_dir, makedirs, start_writeback
from blockcap.storage.stops import check_stop

READ_AHEAD = 16  # objects read concurrently, and held at most, by ``get_each`` on object storage
PARTIAL = ".partial"  # suffix of a local file not yet renamed into place
# Called as hook(operation, key) after every mutation (and before a local rename: "put-partial").
WRITE_HOOKS: list[Callable[[str, str], None]] = []
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}(/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}){0,31}")


def _wrote(op: str, key: str) -> None:
    for hook in WRITE_HOOKS:
        hook(op, key)


def check_key(key: str) -> str:
    """``key`` if it names an object inside a store (relative, no ``..``, the store's characters)."""
    if key != "" and not (isinstance(key, str) and _KEY.fullmatch(key) and ".." not in key.split("/")):
        raise BlockcapError(
            f"the store names an object {key!r} that is not a name inside a store (absolute, '..' or "
            f"odd characters); refusing to touch it: the store's metadata is damaged or hostile"
        )
    return key


def is_url(out: str) -> bool:
    return "://" in out and not out.startswith("file://")


class Location:
    """A store's place; ``key``s are relative to its root, with ``/`` separators."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None, durable: bool = True) -> None:
        self.url = str(out)
        self.storage_options = dict(storage_options or {})
        self.local = not is_url(self.url)
        self.durable = durable  # fsync local files and directories (object-store PUTs are durable)
        self._real: str | None = None
        self._pending: set[Path] = set()  # files and directories written since the last commit
        self._lock, self._sync_lock = threading.Lock(), threading.Lock()
        self._root: Path | None = None  # a local store's directory
        self._fs: Any = None  # an object store's fsspec file system (fsspec ships no types)
        if self.local:
            self._root = Path(self.url.removeprefix("file://")).expanduser()
            self.path = str(self._root)
        else:
            self._fs, self.path = _filesystem(self.url, self.storage_options)

    @property
    def root(self) -> Path:
        """The store's directory (a local location's only)."""
        assert self._root is not None, f"{self.url} is on object storage: it has no local directory"
        return self._root

    @property
    def fs(self) -> Any:
        """The fsspec file system of an object-store location."""
        assert self._fs is not None, f"{self.url} is local: it has no fsspec file system"
        return self._fs

    def resolved(self) -> Location:
        """This place named once and for all: a local path made absolute with every symbolic link
        resolved (an overwrite then replaces the store behind a link, on its file system), a URL
        as it is. Messages keep the name as given unless a link was resolved. A dangling link
        stays as it is, for ``check_parent`` to refuse."""
        if not self.local or (os.path.islink(self.root) and not self.root.exists()):
            return self
        try:
            real = os.path.realpath(self.root)
        except OSError as e:
            raise BlockcapError(f"out={self.url!r} cannot be used ({e.strerror})") from None
        linked = real != os.path.abspath(self.root)
        out = Location(real if linked else self.url, self.storage_options, self.durable)
        out._root, out.path = Path(real), real
        return out

    def _local_path(self, key: str, write: bool = False) -> Path:
        """The file of ``key``; for a write or delete, checked to lie inside the store's real directory."""
        path = self.root / check_key(key)
        if write and key:
            if self._real is None:
                self._real = os.path.realpath(self.root)
            where = os.path.realpath(path.parent)
            if where != self._real and not where.startswith(self._real.rstrip(os.sep) + os.sep):
                raise BlockcapError(
                    f"store {self.url}: {key} leads outside the store (through a symbolic link to "
                    f"{where}); refusing to write or delete it"
                )
        return path

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def sibling(self, suffix: str) -> Location:
        """The location named like this one plus ``suffix`` (e.g. ``out.replaced``)."""
        return Location(self.url.rstrip("/") + suffix, self.storage_options, self.durable)

    def beside(self, name: str) -> str:
        """The full path of object ``name`` next to the store (``.<store>.lock``), outside it."""
        parent = self.path.rstrip("/").rpartition("/")[0]
        return f"{parent}/{name}" if parent else name

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
                return self._local_path(key).read_bytes()
            data: bytes = self._remote(self.fs.cat_file, f"{self.path}/{check_key(key)}")
            return data
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def exists(self, key: str = "") -> bool:
        if self.local:
            return self._local_path(key).exists()
        found: bool = self._remote(self.fs.exists, f"{self.path}/{check_key(key)}".rstrip("/"))
        return found

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under ``prefix`` (relative keys, sorted); local temp files left out."""
        if self.local:
            base = self._local_path(prefix)
            if not base.is_dir():
                return []
            found = []
            for dirpath, _, files in os.walk(base):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                found += [f if rel == "." else f"{rel}/{f}" for f in files if not f.endswith(PARTIAL)]
            return sorted(found)
        where = f"{self.path}/{check_key(prefix)}".rstrip("/")
        self._remote(self.fs.invalidate_cache, where)  # other processes write too: no cached listing
        try:
            return sorted(p[len(self.path) + 1 :] for p in self._remote(self.fs.find, where))
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
        """One line when a store could not be created where asked."""
        if not self.local:
            self._check_bucket()
            return
        try:
            self._check_local_parent()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise BlockcapError(f"out={self.url[:80]!r}...: {e.strerror}; choose a shorter out=PATH"
                                if e.errno == errno.ENAMETOOLONG else
                                f"out={self.url!r} cannot be used ({e.strerror})") from None  # fmt: skip

    def _check_bucket(self) -> None:
        """A store in a bucket needs the bucket (else every write would fail, one by one)."""
        if self.url.split("://", 1)[0] not in BUCKETS:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            self._remote(self.fs.info, bucket)  # network and credential failures: their own line
        except FileNotFoundError:
            raise BlockcapError(
                f"out={self.url!r}: bucket {bucket!r} does not exist or is not visible with these "
                f"credentials; create it, or fix out= or storage_options="
            ) from None

    def _check_local_parent(self) -> None:
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
    def put(self, key: str, data: bytes | memoryview, finishing: bool = False) -> None:
        """Write one object atomically: readers see the old object, or the new one whole. When
        ``durable``, it is on disk, with the directory entries naming it, by the next ``commit``.
        ``finishing``: it completes work already done, so a stop request does not stop it
        (``check_stop``)."""
        check_stop(finishing)
        if self.local:
            path = self._local_path(key, write=True)
            made = makedirs(path.parent)
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{PARTIAL}")
            with open(tmp, "wb") as f:
                f.write(data)
                if self.durable:
                    start_writeback(f.fileno())
            _wrote("put-partial", key)
            os.replace(tmp, path)
            if self.durable:
                with self._lock:
                    self._pending.update([path, path.parent, *(m.parent for m in made)])
        else:
            self._remote_write(self.fs.pipe_file, f"{self.path}/{check_key(key)}", bytes(data))
        _wrote("put", key)

    def commit(self, key: str, data: bytes | memoryview) -> None:
        """Put an object that vouches for others (a commit record, the root document): when
        ``durable``, everything put before it is on disk before it appears (one batch of
        concurrent fsyncs per unit, not a flush per object)."""
        self.sync()
        self.put(key, data)

    def sync(self) -> None:
        """Make every object put since the last commit, and its directory entries, durable (local,
        ``durable``): fsyncs issued concurrently, so the file system batches them."""
        if not (self.local and self.durable):
            return
        with self._sync_lock:  # a commit waits for a sync another thread started
            with self._lock:
                todo, self._pending = self._pending, set()
            fsync_all(todo)

    def put_many(self, objects: dict[str, bytes]) -> None:
        """Write several independent objects: in key order locally, concurrently on object storage."""
        if self.local:
            for key in sorted(objects):
                self.put(key, objects[key])
            return
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda kv: self.put(*kv), sorted(objects.items())))

    def get_each(self, keys: Iterable[str]) -> Iterator[bytes | None]:
        """Each object of ``keys`` in order (None where missing), read ahead ``READ_AHEAD`` at a time
        on object storage, where each read is a round trip: never more held, so a scan of a whole
        array (``verify``) streams in bounded memory."""
        if self.local:
            yield from map(self.get, keys)
            return
        with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
            ahead: deque[Future[bytes | None]] = deque()
            for key in keys:
                ahead.append(pool.submit(self.get, key))
                if len(ahead) >= READ_AHEAD:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def put_first(self, key: str, data: bytes) -> None:
        """Write the first object of a new store; a local store directory appears with it, atomically.

        (Otherwise a reader could find the directory already made and still empty.)
        """
        if not self.local or self.root.exists():
            self.commit(key, data)
            return
        staging = self.root.with_name(f".{self.root.name}.{uuid.uuid4().hex[:12]}.creating")
        try:
            first = Location(str(staging), durable=self.durable)
            first.put(key, data)
            first.sync()
            check_stop()
            os.rename(staging, self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.durable:
            fsync_dir(self.root.parent)
        _wrote("rename", str(self.root))

    def delete(self, key: str) -> None:
        check_stop()
        if self.local:
            self._local_path(key, write=True).unlink(missing_ok=True)
        elif self._remote(self.fs.exists, f"{self.path}/{check_key(key)}"):
            self._remote_write(self.fs.rm_file, f"{self.path}/{key}")
        _wrote("delete", key)

    def remove_partial_files(self) -> int:
        files = self.partial_files()
        for p in files:
            self._local_path(p.relative_to(self.root).as_posix(), write=True).unlink(missing_ok=True)
            _wrote("delete", str(p))
        return len(files)

    def rename_to(self, dst: Location) -> None:
        """Move the whole store (local: one atomic rename)."""
        if not (self.local and dst.local):
            raise ValueError("rename_to is for local stores; object stores copy")
        check_stop()
        os.replace(self.root, dst.root)
        if self.durable:
            fsync_dir(dst.root.parent)
        _wrote("rename", str(dst.root))

    def remove_tree(self) -> None:
        """Delete the whole store. Local: renamed out of sight first, so it vanishes at once."""
        check_stop()
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
                data = self.get(key)
                if data is None:  # listed by the caller, gone now: another process changed the store
                    raise BlockcapError(f"store {self.url}: {key} vanished while being copied; retry")
                dst.put(key, data)
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


BUCKETS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # protocols whose first path part is a bucket


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
