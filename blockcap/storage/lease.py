"""One writer per object-store prefix: a lease object beside the store, taken with conditional writes.

A lease is a small JSON object ``.<store>.lock`` next to the store, written only with
compare-and-swap: created with ``If-None-Match: *`` (absent -> ours) and changed with ``If-Match``
on the version read (unchanged -> ours), so of two runs racing for it exactly one wins. It names
its holders and when each last renewed it; a thread renews it every quarter of ``LEASE_SECONDS``.
A run that finds a live lease is refused in one line naming the holder; a lease whose holders
all stopped renewing more than ``LEASE_SECONDS`` ago (a killed run), or whose holders were
processes of this host that have ended, is taken over, again by compare-and-swap. ``part``
processes hold one lease together (``shared``).

The holder never writes after losing its lease: before every write, a guard (``stops.add_guard``)
stops the run when the lease was taken over, or when its last renewal is older than
``LEASE_SECONDS`` (a run paused that long may have lost it). Clocks of the machines involved are
assumed to agree within ``SKEW_SECONDS``.

Backends: S3 and S3-compatible stores with conditional writes (AWS since 2024, MinIO, moto).
Other object stores have no lease yet (see the README's guarantees).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from blockcap.core.errors import BlockcapError
from blockcap.storage.location import Location, _wrote
from blockcap.storage.stops import add_guard, remove_guard

LEASE_SECONDS = 60.0  # renewed every quarter of it; tests shorten it
SKEW_SECONDS = 5.0  # clock difference between machines tolerated before taking a lease over
TRIES = 20  # compare-and-swap rounds before giving up (each lost round means another run wrote)


class StoreInUse(BlockcapError):
    """Another process is writing the store."""


class LostRace(BlockcapError):
    """A conditional write found the object changed (another run wrote it first)."""


def _lost_race(e: BaseException) -> bool:
    if isinstance(e, (FileExistsError, FileNotFoundError)):  # If-None-Match; If-Match on a deleted object
        return True
    response = getattr(e.__cause__, "response", None) or getattr(e, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")


class S3Objects:
    """Conditional reads and writes of one S3 object (through s3fs's client)."""

    def __init__(self, location: Location, path: str) -> None:
        self.location, self.fs = location, location.fs
        self.bucket, _, self.key = path.partition("/")

    def _call(self, method: str, **kw: Any) -> Any:
        def call() -> Any:
            try:
                return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kw)
            except Exception as e:
                if _lost_race(e):
                    raise LostRace(str(e)) from None
                raise

        return self.location._remote(call)

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with r["Body"] as body:
                return await body.read(), r["ETag"]

        try:
            found: tuple[bytes, str] = self.location._remote(sync, self.fs.loop, get)
            return found
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str:
        etag: str = self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]
        return etag

    def replace(self, data: bytes, version: str) -> str:
        etag: str = self._call("put_object", Body=data, IfMatch=version)["ETag"]
        return etag

    def delete(self, version: str) -> None:
        self._call("delete_object", IfMatch=version)


def backend(location: Location) -> S3Objects | None:
    """Conditional writes of the lease object beside ``location``, where the store supports them."""
    if location.local or location.url.split("://", 1)[0] not in ("s3", "s3a"):
        return None
    return S3Objects(location, location.beside(f".{location.name}.lock"))


def _alive(holder: dict[str, Any], now: float) -> bool:
    """Whether a lease holder may still be running: it renewed within the lease's time, and it is
    not a process of this host that has ended (so a run killed here is resumed here at once)."""
    if now - holder["renewed"] >= LEASE_SECONDS + SKEW_SECONDS:
        return False
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # another user's process: alive
    return True


class Lease:
    """This process's hold on the lease of ``location`` (see the module docstring)."""

    def __init__(self, location: Location, objects: S3Objects, shared: bool, hint: str) -> None:
        self.location, self.objects, self.shared, self.hint = location, objects, shared, hint
        self.me = uuid.uuid4().hex[:12]
        self.who = f"process {os.getpid()} on host {socket.gethostname()}"
        self.entry = {"who": self.who, "pid": os.getpid(), "host": socket.gethostname()}
        self.renewed = 0.0  # this process's clock at the last successful write of the lease
        self.lost: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew_loop, name="blockcap-lease", daemon=True)

    def _doc(self, holders: dict[str, Any]) -> bytes:
        return json.dumps({"lease": "blockcap", "shared": self.shared, "seconds": LEASE_SECONDS,
                           "holders": holders}, sort_keys=True).encode()  # fmt: skip

    def _read(self) -> tuple[dict[str, Any], str] | None:
        found = self.objects.read()
        if found is None:
            return None
        try:
            doc = json.loads(found[0])
            for v in doc["holders"].values():
                v["renewed"] + 0.0  # noqa: B018 - a number, or the lease is not ours to read
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StoreInUse(
                f"{self.location}: the object beside it, {self.objects.bucket}/{self.objects.key}, is not a "
                f"blockcap lease; delete it if no run uses the store"
            ) from None
        return doc, found[1]

    def acquire(self) -> None:
        for _ in range(TRIES):
            found = self._read()
            now = time.time()
            try:
                if found is None:
                    self.objects.create(self._doc({self.me: {**self.entry, "renewed": now}}))
                else:
                    doc, version = found
                    live = {h: v for h, v in doc["holders"].items() if _alive(v, now)}
                    if live and not (self.shared and doc.get("shared")):
                        raise self._in_use(live, now)
                    holders = {**live, self.me: {**self.entry, "renewed": now}}
                    self.objects.replace(self._doc(holders), version)
            except LostRace:
                continue
            self.renewed = time.monotonic()
            _wrote("lock", self.location.url)
            add_guard(self.guard)
            self.thread.start()
            return
        raise StoreInUse(f"store {self.location} is in use (its lease keeps changing); {self.hint}")

    def _in_use(self, live: dict[str, Any], now: float) -> StoreInUse:
        latest = max(live.values(), key=lambda v: v["renewed"])
        age = max(0.0, now - latest["renewed"])
        left = LEASE_SECONDS + SKEW_SECONDS - age
        return StoreInUse(
            f"store {self.location} is in use by {latest.get('who', 'another process')} (its lease was "
            f"renewed {age:.0f} s ago; if that run has ended, the lease expires in {left:.0f} s); {self.hint}"
        )

    def _update(self, change: Any) -> bool:
        """Apply ``change(holders) -> holders | None`` by compare-and-swap; False if not held any more."""
        for _ in range(TRIES):
            found = self._read()
            if found is None or self.me not in found[0]["holders"]:
                return False
            holders = change(dict(found[0]["holders"]))
            try:
                if holders:
                    self.objects.replace(self._doc(holders), found[1])
                else:
                    self.objects.delete(found[1])
                return True
            except LostRace:
                continue
        raise LostRace("the lease keeps changing")  # others keep writing it (parts joining): next round

    def _renew_loop(self) -> None:
        while not self.stop.wait(LEASE_SECONDS / 4):
            try:
                t = time.monotonic()
                held = self._update(lambda h: {**h, self.me: {**self.entry, "renewed": time.time()}})
            except BlockcapError:
                continue  # a failed renewal is retried; the guard stops writes once it is too old
            if not held:
                self.lost = "another run took it over"
                return
            self.renewed = t

    def guard(self) -> None:
        """Raise before a write when this run may no longer hold the lease."""
        if self.lost is None and time.monotonic() - self.renewed > LEASE_SECONDS:
            self.lost = f"it was not renewed for {LEASE_SECONDS:.0f} s (the process was paused or cut off)"
        if self.lost is not None:
            raise BlockcapError(
                f"stopped writing {self.location}: this run lost its lease ({self.lost}); the store is "
                f"incomplete and resumable: re-run the same command once the other run has ended"
            )

    def release(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        remove_guard(self.guard)
        if self.lost is None:
            try:
                self._update(lambda h: {k: v for k, v in h.items() if k != self.me})
                _wrote("unlock", self.location.url)
            except BlockcapError:
                pass  # it expires by itself
