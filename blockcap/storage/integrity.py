"""Commit records, and reads that never mistake missing or wrong data for zeros.

A write unit is committed by one record object written after every object of the unit: a row of
``committed`` holding a magic number, the unit's index, the store's tag and the digest of each of
the unit's objects, in the order ``committed.attrs["objects"]`` lists. The tag is a digest of
what gives the store's bytes their meaning: in format 2 the spec's identity; from format 3 also
the model's dimensions, the window and row counts, the tokenizer and the digests of the objects
written at creation (``root_tag``), so an edit of any of these in the root document makes every
record "of another store". Objects written at creation and at finish (tokenizer, a dedup store's
index, final statistics) have their digests in the root document; final statistics are
authenticated by ``verify``, which merges the committed partials again. Hence:

* a unit without a record was never finished: its windows read as the fill value (zeros), unless
  the store is complete, where every record must exist;
* a record that fails its checksum, has the wrong magic or names another unit or store is damage;
* an object that is missing, or whose bytes differ from its digest, is damage.

``CommitIndex.check`` applies these rules to every object a read fetches (zarr alone reads an
absent chunk as zeros); ``CheckedStore`` makes zarr's own reads go through it too. Format-1
stores have one uint8 flag per chunk and no digests: their chunks are checked for presence only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import google_crc32c
import numpy as np
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from blockcap.core.errors import BlockcapError
from blockcap.core.layout import CREATE, FINISH, Layout
from blockcap.storage.codecs import digest
from blockcap.storage.location import Location

MAGIC = 0x424C4B43  # "BLKC"
COMMITTED, ABSENT, DAMAGED = "committed", "absent", "damaged"


class DamagedError(BlockcapError):
    """Stored data is missing or differs from what was committed."""


def store_tag(identity: dict[str, Any]) -> int:
    """A format-2 store's tag in its commit records: a digest of its spec's identity."""
    return int(google_crc32c.value(json.dumps(identity, sort_keys=True).encode()))


def root_tag(covered: dict[str, Any]) -> int:
    """A format-3 store's tag: the first 32 bits of the sha256 of the root fields that give its
    bytes their meaning (a cryptographic digest: no edit of them keeps the tag by arithmetic)."""
    raw = hashlib.sha256(json.dumps(covered, sort_keys=True).encode()).digest()
    return int.from_bytes(raw[:4], "little")


def encode_record(unit: int, tag: int, digests: list[int]) -> np.ndarray:
    """The commit record row of ``unit`` in the store tagged ``tag``."""
    return np.asarray([MAGIC, unit, tag, *digests], dtype="<u4")


@dataclass(frozen=True)
class Record:
    status: str  # COMMITTED, ABSENT or DAMAGED
    digests: tuple[int, ...] = ()
    reason: str = ""


CHECKSUM_FAILS = "its checksum fails"  # damage that proves nothing about whose record it was
OTHER_STORE = "it is a commit record of another store"  # or of this store, under an edited root


def _decode_record(raw: bytes | None, unit: int, n_fields: int, version: int, tag: int) -> Record:
    if raw is None:
        return Record(ABSENT)
    body, tail = raw[:-4], raw[-4:]
    if len(raw) < 5 or np.frombuffer(tail, "<u4")[0] != google_crc32c.value(body):
        return Record(DAMAGED, reason=CHECKSUM_FAILS)
    if version == 1:  # one uint8 flag per chunk
        return Record(COMMITTED) if body == b"\x01" else Record(DAMAGED, reason=f"flag {body!r} is not 1")
    row = np.frombuffer(body, "<u4") if len(body) % 4 == 0 else np.zeros(0, "<u4")
    if row.size != n_fields or row[0] != MAGIC or row[1] != unit:
        return Record(DAMAGED, reason="it is not a commit record of this unit (forged or misplaced)")
    if row[2] != tag:
        return Record(DAMAGED, reason=OTHER_STORE)
    return Record(COMMITTED, tuple(int(x) for x in row[3:]))


class CommitIndex:
    """The commit records of one store, loaded on demand and cached once committed."""

    def __init__(
        self, location: Location, layout: Layout, version: int, objects: list[str], tag: int = 0,
        digests: dict[str, int] | None = None, complete: bool = False,
    ) -> None:  # fmt: skip
        self.location = location
        self.layout = layout
        self.version = version
        self.objects: dict[str, int] = {}  # path -> its first digest's field (then one per piece)
        for i, path in enumerate(objects):
            self.objects.setdefault(path, i)
        self.pieces = {path: objects.count(path) for path in self.objects}
        self.n_fields = 3 + len(objects)
        self.tag = tag
        self.digests = dict(digests or {})  # objects outside the unit protocol that must be as recorded
        self.complete = complete  # then every unit must have its record
        # arrays written at creation and at finish: from format 2 each of their objects has a digest
        self.recorded = {a.path: a.when for a in layout.arrays() if a.when in (CREATE, FINISH)}
        self.records: dict[int, Record] = {}
        self.lock = threading.Lock()

    def record_keys(self, unit: int) -> list[str]:
        """The record objects of ``unit``: one row (format 2), or one flag per chunk (format 1)."""
        if self.version == 1:
            k = self.layout.shard_chunks
            return [f"committed/c/{c}" for c in range(unit * k, min((unit + 1) * k, self.layout.n_chunks))]
        return [f"committed/c/{unit}/0"]

    def record(self, unit: int, cached: bool = True) -> Record:
        if cached and unit in self.records:
            return self.records[unit]
        parts = [
            _decode_record(self.location.get(k), unit, self.n_fields, self.version, self.tag)
            for k in self.record_keys(unit)
        ]
        rec = next((p for p in parts if p.status == DAMAGED), None) or next(
            (p for p in parts if p.status == ABSENT), parts[0]
        )
        if rec.status != ABSENT:  # absent records may still appear while a run goes on
            with self.lock:
                self.records[unit] = rec
        return rec

    def listed(self) -> tuple[list[int], list[str]]:
        """(units with a record object, record objects that name no unit of this layout), from one
        listing: bounded by the objects present, whatever the root document claims."""
        k, units, strays = self.layout.shard_chunks, set(), []
        for key in self.location.keys("committed/c"):
            parts = key.split("/")[2:]
            ok = parts and all(p.isdigit() for p in parts) and len(parts) == (1 if self.version == 1 else 2)
            if self.version == 1:
                ok = ok and int(parts[0]) < self.layout.n_chunks
                unit = int(parts[0]) // k if ok else -1
            else:
                ok = ok and parts[1] == "0" and int(parts[0]) < self.layout.n_units
                unit = int(parts[0]) if ok else -1
            if ok:
                units.add(unit)
            else:
                strays.append(key)
        return sorted(units), strays

    def load(self, units: list[int], threads: int = 16) -> dict[int, Record]:
        """The records of ``units``, read concurrently (object stores have high latency)."""
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return dict(zip(units, pool.map(self.record, units), strict=True))

    def load_all(self, threads: int = 16) -> dict[int, Record]:
        """Every unit's record: cached ones as they are, the listed others read concurrently,
        the unlisted ones absent (absent records are listed again each time: a run may add them)."""
        n = self.layout.n_units
        if len(self.records) == n:
            return dict(self.records)
        listed, _ = self.listed()
        found = self.load(listed, threads)
        return {u: found.get(u) or Record(ABSENT) for u in range(n)}

    def committed_mask(self) -> np.ndarray:
        recs = self.load_all()
        return np.asarray([recs[u].status == COMMITTED for u in range(self.layout.n_units)], dtype=bool)

    def where(self, path: str, unit: int) -> str:
        """``"block0/x: chunk 3 (windows 48..63)"`` (or a unit of several chunks, when sharded)."""
        lo, hi = self.layout.unit_range(unit)
        what = "rows" if self.layout.dedup and path not in ("tokens", "offsets") else "windows"
        k = self.layout.shard_chunks
        where = f"chunk {unit}" if k == 1 else f"shard {unit} (chunks {unit * k}..{unit * k + k - 1})"
        return f"{path}: {where} ({what} {lo}..{hi - 1})"

    def check(self, key: str, data: Any, whole: bool) -> Any:
        """``data`` read for ``key`` (None: absent), as a read should see it; DamagedError if damaged.

        Objects outside the unit protocol must match the root document's digests where it has
        them. Objects of a unit never committed read as absent (the fill value), never as
        half-written data; in a complete store every unit must be committed.
        """
        path, sep, coords = key.rpartition("/c/")
        if not sep or path not in self.objects:
            if key in self.digests:
                if data is None:
                    raise DamagedError(f"{path}: its data object {key} is missing")
                if whole and digest(data) != self.digests[key]:
                    raise DamagedError(f"{path}: object {key} differs from what was written")
            elif self.version >= 2 and self.recorded.get(path) in (
                (CREATE, FINISH) if self.complete else (CREATE,)
            ):
                raise DamagedError(f"{path}: the root document has no digest for its object {key}")
            return data
        parts = coords.split("/")
        unit, piece = int(parts[0]), int(parts[2]) if len(parts) == 4 else 0
        if piece >= self.pieces[path]:
            raise DamagedError(f"{path}: {key} is not one of the store's objects (its metadata was altered)")
        rec = self.record(unit)
        if rec.status == DAMAGED:
            raise DamagedError(f"{self.where(path, unit)}: its commit record is damaged ({rec.reason})")
        if rec.status == ABSENT:
            if self.complete:
                raise DamagedError(
                    f"{self.where(path, unit)}: its commit record is missing from a complete store"
                )
            return None
        if data is None:
            raise DamagedError(f"{self.where(path, unit)} is committed but its data object {key} is missing")
        if whole and rec.digests and digest(data) != rec.digests[self.objects[path] + piece]:
            raise DamagedError(f"{self.where(path, unit)}: object {key} differs from what was committed")
        return data


class CheckedStore(WrapperStore[Store]):
    """zarr store wrapper applying ``CommitIndex.check`` to every chunk read."""

    def __init__(self, store: Store, index: CommitIndex) -> None:
        super().__init__(store)
        self.index = index

    def _with_store(self, store: Store) -> Self:
        return type(self)(store, self.index)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        if "/c/" not in key:
            return buf
        raw = None if buf is None else buf.as_numpy_array()
        return None if self.index.check(key, raw, byte_range is None) is None else buf
