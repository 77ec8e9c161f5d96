"""Reading documents out of input files, record by record, never a whole file in memory.

A ``.txt`` file is one document, read in pieces of ``PIECE_BYTES`` bytes; ``.jsonl`` lines,
``.parquet`` rows (by row group) and ``.arrow`` rows (a ``datasets`` directory) are one document
each, taken from the text column. Compressed files are decompressed as they are read. Every way a
file can be bad (not UTF-8, damaged, truncated: every compression and Arrow stream must reach its
end marker, not JSON, no text column, a value that is not text) is one InputError naming the file
and the record. A byte order mark at the start of a .txt or .jsonl file is dropped.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import io
import json
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from blockcap.core.errors import BlockcapError
from blockcap.data.inputs import JSONL, PARQUET, TEXT, InputFile

PIECE_BYTES = 1 << 20  # bytes of a .txt document read (and decoded) at a time
ROWS_PER_READ = 1024  # rows of a parquet or arrow file converted to Python strings at a time
ZSTD_FEED = 1 << 10  # compressed bytes decompressed per call (zstd can expand them ~32000 times)
DEFAULT_TEXT_COLUMN = "text"
ARROW_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end-of-stream marker of an Arrow IPC stream
_DECODE_ERRORS = (OSError, EOFError, zlib.error, ValueError)  # what a damaged compressed stream raises
_BOM = "\ufeff"
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


class InputError(BlockcapError):
    """A damaged or malformed input file; the message names the file (and record) already."""


@dataclass(frozen=True)
class Document:
    """One document: which file and row it came from, and its text (whole, or in pieces)."""

    file: int  # index into the dataset's input files
    row: int  # record number in its file, from 0 (a .jsonl's line number less one; 0 for a .txt file)
    text: str | None  # the text, for record formats
    pieces: Iterator[str] | None = None  # the text in pieces, for .txt files (possibly huge)
    at: int = 0  # bytes of the file (as stored) read when this document was, for progress


def _raw(f: InputFile, options: dict[str, Any]) -> IO[bytes]:
    if "://" in f.path and not f.path.startswith("file://"):
        import fsspec

        stream: IO[bytes] = fsspec.open(f.path, "rb", **options).open()
        return stream
    return open(f.path.removeprefix("file://"), "rb")  # noqa: SIM115 - closed by the caller


def open_binary(f: InputFile, options: dict[str, Any] | None = None) -> IO[bytes]:
    """The file's bytes, decompressed as they are read."""
    return _decompressed(f, _raw(f, dict(options or {})))


def _decompressed(f: InputFile, raw: IO[bytes]) -> IO[bytes]:
    if f.compression == "gzip":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw))
    if f.compression == "bz2":
        return bz2.BZ2File(raw)
    if f.compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise InputError(
                f"dataset file {f.path} is zstd-compressed; install blockcap with the zstd extra"
            ) from None
        return cast(IO[bytes], io.BufferedReader(_ZstdReader(raw, zstandard)))
    return raw


class _ZstdReader(io.RawIOBase):
    """zstd frames decompressed as they are read. zstandard's own stream reader ends quietly where a
    file is cut inside a frame; this one raises EOFError there, as gzip and bz2 do."""

    def __init__(self, raw: IO[bytes], zstandard: Any) -> None:
        self._raw, self._dctx, self._error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame: Any = None  # the decompressor of the frame being read (None between frames)
        self._input = b""  # compressed bytes read past a frame's end
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._output:
            data, self._input = self._input or self._raw.read(ZSTD_FEED), b""
            if not data:
                if self._frame is not None:
                    raise EOFError("the compressed data ends inside a zstd frame")
                return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            try:
                self._output = memoryview(self._frame.decompress(data))
            except self._error as e:
                raise ValueError(str(e)) from None
            if self._frame.eof:
                self._input, self._frame = self._frame.unused_data, None
        n = min(len(buffer), len(self._output))
        buffer[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _Tail(io.RawIOBase):
    """A stream that remembers the last bytes read from it (to check an Arrow stream's end marker)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream, self.last = stream, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._stream.readinto(buffer)  # type: ignore[attr-defined]
        self.last = (self.last + bytes(memoryview(buffer)[max(0, n - 8) : n]))[-8:]
        return int(n)


def _bad(f: InputFile, e: BaseException, where: str = "") -> InputError:
    """The error for a file its decompressor or parser could not read (cut short, or damaged)."""
    if isinstance(e, EOFError) and f.compression:
        return InputError(
            f"dataset file {f.path}{where} is truncated (its {f.compression} data ends before the end "
            f"marker); download or write it again"
        )
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    what = f.compression or f.format
    return InputError(
        f"dataset file {f.path}{where} is not a readable {what} file ({detail}); "
        f"replace it or remove it from the dataset"
    )


def _text(f: InputFile, options: dict[str, Any]) -> Iterator[str]:
    """The file's text, ``PIECE_BYTES`` at a time (a leading byte order mark dropped); bytes that are
    not UTF-8 are named by their offset in the (decompressed) file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    at = base = 0
    started = False
    try:
        with open_binary(f, options) as data:
            while True:
                chunk = data.read(PIECE_BYTES)
                base = at - len(decoder.getstate()[0])  # where the bytes now decoded start
                at += len(chunk)
                piece = decoder.decode(chunk, final=not chunk)
                if piece and not started:
                    piece, started = piece.removeprefix(_BOM), True
                if piece:
                    yield piece
                if not chunk:
                    return
    except UnicodeDecodeError as e:
        of = " of its decompressed text" if f.compression else ""
        raise InputError(
            f"dataset file {f.path} is not UTF-8 text ({e.reason} at byte {base + e.start}{of}); "
            f"convert it to UTF-8 or remove it from the dataset"
        ) from None
    except _DECODE_ERRORS as e:
        raise _bad(f, e) from None


def _jsonl(f: InputFile, column: str, options: dict[str, Any]) -> Iterator[tuple[int, str, int]]:
    n = 0
    try:
        with _raw(f, options) as raw, _decompressed(f, raw) as data:
            for n, line in enumerate(data, 1):
                if n == 1:
                    line = line.removeprefix(_BOM.encode())
                if not line.strip():
                    continue
                try:
                    text = json.loads(line.decode("utf-8"))[column]
                except (ValueError, TypeError, KeyError, IndexError, RecursionError):  # see _refused
                    raise _refused(f, line, n, column) from None
                if not isinstance(text, str) or _half_pair(text, line) is not None:
                    raise _refused(f, line, n, column)
                yield n - 1, text, raw.tell()
    except _DECODE_ERRORS as e:
        raise _bad(f, e, f" (after line {n})" if n else "") from None


def _half_pair(text: str, line: bytes) -> int | None:
    """Where ``text`` holds half a surrogate pair (None if nowhere): JSON can escape one, but it is no
    character (nor UTF-8). Looked for only where ``line`` has such an escape."""
    if text.isascii() or not (b"\\ud" in line or b"\\uD" in line):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _refused(f: InputFile, line: bytes, n: int, column: str) -> InputError:
    """Why line ``n`` of a .jsonl file gives no text (worked out once it did not)."""
    where = f"dataset file {f.path} line {n}"
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return InputError(
            f"{where} is not UTF-8 text ({e.reason} at byte {e.start} of the line); convert the file to UTF-8"
        )
    except json.JSONDecodeError as e:
        at = "" if e.msg.endswith(" at") else " at"
        return InputError(f"{where} is not JSON ({e.msg}{at} column {e.colno}); fix or remove it")
    except RecursionError:
        return InputError(f"{where} is JSON nested too deeply to read; fix or remove it")
    if not isinstance(row, dict):
        return InputError(
            f"{where} is not a JSON object (it is {_JSON_TYPES.get(type(row), 'null')}); "
            f'write each line as an object, e.g. {{"{column}": "..."}}'
        )
    if column not in row:
        return InputError(f"{where} has no text_column {column!r}; pass text_column=")
    text = row[column]
    if not isinstance(text, str):
        return _not_text(f, text, column, f"line {n}")
    half = _half_pair(text, line) or 0
    return InputError(
        f"{where}: text_column {column!r} holds a lone surrogate ({text[half]!r}, an escape no "
        f"character has); remove it or escape the whole pair"
    )


def _not_text(f: InputFile, value: Any, column: str, where: str) -> InputError:
    return InputError(
        f"dataset file {f.path} {where}: text_column {column!r} holds {type(value).__name__}, not text"
    )


@contextlib.contextmanager
def _seekable(f: InputFile, options: dict[str, Any]) -> Iterator[IO[bytes]]:
    """A seekable copy of a file (parquet needs one): the file itself, or a decompressed temporary."""
    src = open_binary(f, options)
    try:
        if f.compression is None and src.seekable():
            yield src
            return
        with tempfile.TemporaryFile() as tmp:
            shutil.copyfileobj(src, tmp, 1 << 20)
            tmp.seek(0)
            yield tmp
    finally:
        src.close()


def _columns(f: InputFile, names: list[str], column: str) -> None:
    if column not in names:
        raise InputError(
            f"dataset file {f.path} has no text_column {column!r}; its columns are {', '.join(names)}"
        )


def _table(f: InputFile, column: str, options: dict[str, Any]) -> Iterator[tuple[int, str, int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            f"dataset file {f.path}: reading .{f.format} needs pyarrow; install blockcap's parquet extra"
        ) from None
    row = 0
    stream = None
    try:
        with contextlib.ExitStack() as stack:
            if f.format == PARQUET:
                table = pq.ParquetFile(stack.enter_context(_seekable(f, options)))
                _columns(f, table.schema_arrow.names, column)
                batches = table.iter_batches(columns=[column], batch_size=ROWS_PER_READ)
                total = max(1, table.metadata.num_rows)

                def at() -> int:
                    return int(f.size * row // total)
            else:
                raw = stack.enter_context(_raw(f, options))
                stream = _Tail(stack.enter_context(_decompressed(f, raw)))
                reader = pa.ipc.open_stream(stream)
                _columns(f, reader.schema.names, column)
                batches = (b.select([column]) for b in reader)

                def at() -> int:
                    return raw.tell()

            for batch in batches:
                for value in batch.column(0).to_pylist():
                    if not isinstance(value, str):
                        raise _not_text(f, value, column, f"row {row}")
                    yield row, value, at()
                    row += 1
            if stream is not None and stream.last != ARROW_END:  # a stream cut after a whole batch
                raise InputError(
                    f"dataset file {f.path} is truncated after row {row} (its Arrow stream has no "
                    f"end-of-stream marker); write the dataset again (save_to_disk)"
                )
    except BlockcapError:
        raise
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise _bad(f, e, f" (at row {row})") from None


def text_column_of(files: list[InputFile], text_column: str | None) -> str | None:
    """The column documents are read from (None for .txt files, which have none)."""
    if files[0].format == TEXT:
        if text_column is not None:
            raise BlockcapError(
                f"text_column={text_column!r} is for .jsonl, .parquet and .arrow datasets, not .txt files"
            )
        return None
    return text_column or DEFAULT_TEXT_COLUMN


def documents(files: list[InputFile], text_column: str | None, options: dict[str, Any] | None = None
              ) -> Iterator[Document]:  # fmt: skip
    """Every document of the dataset, in file order, then record order."""
    opts = dict(options or {})
    column = text_column_of(files, text_column)
    for i, f in enumerate(files):
        if f.format == TEXT:
            yield Document(i, 0, None, _text(f, opts), f.size)
        else:
            name = column or DEFAULT_TEXT_COLUMN  # a record format always has one
            rows = _jsonl(f, name, opts) if f.format == JSONL else _table(f, name, opts)
            yield from (Document(i, row, text, None, at) for row, text, at in rows)
