"""The chunk files of one array of a token cache, checked against what meta.json says of them.

``ChunkFiles`` checks on opening what costs one ``stat`` a file: the first and last file's ``.npy``
header and size against their rows, every other file's size against the first's (they hold as
many rows), and the crc32c of the first and last file (where a run starts reading unless the cache
is large). Any other file's header and crc32c are checked the first time this process reads it.
A cache that fails a check on opening raises ``Invalid`` (it is then built again); a file found
damaged later raises a BlockcapError naming the cache to delete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from blockcap.core.errors import BlockcapError


class Invalid(Exception):
    """A cache that is not whole or not what its meta.json says: treated as no cache (rebuilt)."""


def expect(ok: bool, why: str) -> None:
    if not ok:
        raise Invalid(why)


def count(value: Any, name: str) -> int:
    expect(type(value) is int and value > 0, f"{name} {value!r}")
    return int(value)


class ChunkFiles:
    """Chunk files of one array, read by ranges (no mapping is kept: memory is what a read returns);
    opening checks them as the module docstring says, raising Invalid."""

    def __init__(self, directory: Path, entries: list[dict[str, Any]], per_file: int, total: int,
                 dtype: np.dtype, width: int = 0) -> None:  # fmt: skip
        self.directory, self.entries, self.per_file, self.dtype = directory, entries, per_file, dtype
        self.row_shape = (width,) if width else ()
        expect(isinstance(entries, list) and len(entries) > 0, f"{directory.name}: no chunk files")
        for c, e in enumerate(entries):
            full = c + 1 < len(entries)
            expect(e["file"] == f"{c:05d}.npy" and type(e["crc32c"]) is int, f"{directory.name} entry {c}")
            expect(type(e["rows"]) is int and (e["rows"] == per_file if full else 0 < e["rows"] <= per_file),
                    f"{directory.name}/{e['file']}: {e['rows']!r} rows in a file of {per_file}")  # fmt: skip
        held = sum(e["rows"] for e in entries)
        expect(held == total, f"{directory.name} holds {held} rows, meta.json counts {total}")
        last = len(entries) - 1
        ends = {c: self._header(c) for c in (0, last)}  # (header bytes, file size)
        self.heads = [ends.get(c, ends[0])[0] for c in range(len(entries))]  # full files: one header
        for c in range(1, last):
            size = self._size(c)
            expect(
                size == ends[0][1],
                f"{directory.name}/{entries[c]['file']} has {size} bytes, not {ends[0][1]}",
            )
        self.checked: set[int] = set()
        for c in ends:
            expect(self._crc_ok(c), f"{directory.name}/{entries[c]['file']}: its checksum fails")

    def _size(self, c: int) -> int:
        try:
            return os.stat(self.directory / self.entries[c]["file"]).st_size
        except OSError as e:
            raise Invalid(f"{self.directory.name}/{self.entries[c]['file']}: {e.strerror}") from None

    def _header(self, c: int) -> tuple[bytes, int]:
        """The header bytes and size of chunk ``c``, once they are those of its rows."""
        path, rows = self.directory / self.entries[c]["file"], self.entries[c]["rows"]
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_2_0
                    if version >= (2, 0)
                    else np.lib.format.read_array_header_1_0
                )
                shape, fortran, dtype = read(f)
                offset, size = f.tell(), os.fstat(f.fileno()).st_size
                f.seek(0)
                head = f.read(offset)
        except (OSError, ValueError) as e:
            raise Invalid(f"{path.parent.name}/{path.name}: {e}") from None
        expect(shape == (rows, *self.row_shape) and not fortran and dtype == self.dtype,
                f"{path.parent.name}/{path.name} holds {shape} {dtype}, not {rows} rows")  # fmt: skip
        want = offset + rows * int(np.prod(self.row_shape)) * self.dtype.itemsize
        expect(size == want, f"{path.parent.name}/{path.name} has {size} bytes, not {want}")
        return head, size

    def _crc_ok(self, c: int) -> bool:
        """Chunk ``c``'s header is that of its rows and its data has its crc32c."""
        crc = 0
        with open(self.directory / self.entries[c]["file"], "rb") as f:
            head = f.read(len(self.heads[c]))
            while block := f.read(1 << 20):
                crc = google_crc32c.extend(crc, block)
        ok: bool = head == self.heads[c] and crc == self.entries[c]["crc32c"]
        if ok:
            self.checked.add(c)
        return ok

    def _damaged(self, c: int, why: str) -> BlockcapError:
        return BlockcapError(
            f"token cache file {self.directory / self.entries[c]['file']} is damaged ({why}); "
            f"delete {self.directory.parent} and re-run: the tokens are computed again"
        )

    def _read(self, c: int, lo: int, hi: int) -> np.ndarray:
        width = int(np.prod(self.row_shape))
        path = self.directory / self.entries[c]["file"]
        try:
            if c not in self.checked and not self._crc_ok(c):
                raise self._damaged(c, "its checksum fails")
            data = np.fromfile(path, self.dtype, (hi - lo) * width,
                               offset=len(self.heads[c]) + lo * width * self.dtype.itemsize)  # fmt: skip
        except OSError as e:
            raise self._damaged(c, e.strerror or str(e)) from None
        if data.size != (hi - lo) * width:
            raise self._damaged(c, "it is shorter than when the cache was opened")
        return data.reshape(hi - lo, *self.row_shape)

    def chunk(self, c: int) -> np.ndarray:
        return self._read(c, 0, self.entries[c]["rows"])

    def rows(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        for c in range(lo // self.per_file, (hi - 1) // self.per_file + 1) if hi > lo else ():
            base = c * self.per_file
            parts.append(self._read(c, max(lo, base) - base, min(hi, base + self.per_file) - base))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
