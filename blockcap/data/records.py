"""Reading documents out of input files, record by record, never a whole file in memory.

A ``.txt`` file is one document, read in pieces of ``PIECE_CHARS`` characters; ``.jsonl`` lines,
``.parquet`` rows (by row group) and ``.arrow`` rows (a ``datasets`` directory) are one document
each, taken from the text column. Compressed files are decompressed as they are read. Every way a
file can be bad (not UTF-8, truncated, not JSON, no text column, a value that is not a string) is
one BlockcapError naming the file and the record.
"""

from __future__ import annotations

import bz2
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

PIECE_CHARS = 1 << 20  # characters of a .txt document read (and encoded) at a time
ROWS_PER_READ = 1024  # rows of a parquet or arrow file converted to Python strings at a time
DEFAULT_TEXT_COLUMN = "text"
_DECODE_ERRORS = (OSError, EOFError, zlib.error, ValueError)  # what a damaged compressed stream raises


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
            raise BlockcapError(
                f"dataset file {f.path} is zstd-compressed; install blockcap with the zstd extra"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def _bad(f: InputFile, e: BaseException, where: str = "") -> BlockcapError:
    what = {"gzip": "gzip", "bz2": "bz2", "zstd": "zstd"}.get(f.compression or "", f.format)
    return BlockcapError(
        f"dataset file {f.path}{where} is not a readable {what} file ({type(e).__name__}: {e})"
    )


def _text(f: InputFile, options: dict[str, Any]) -> Iterator[str]:
    try:
        with open_binary(f, options) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
            while piece := text.read(PIECE_CHARS):
                yield piece
    except UnicodeDecodeError as e:
        raise BlockcapError(
            f"dataset file {f.path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except _DECODE_ERRORS as e:
        raise _bad(f, e) from None


def _jsonl(f: InputFile, column: str, options: dict[str, Any]) -> Iterator[tuple[int, str, int]]:
    n = 0
    try:
        with _raw(f, options) as raw, _decompressed(f, raw) as data:
            for n, line in enumerate(io.TextIOWrapper(data, encoding="utf-8"), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BlockcapError(f"dataset file {f.path} line {n} is not JSON ({e.msg})") from None
                if not isinstance(row, dict) or column not in row:
                    raise BlockcapError(
                        f"dataset file {f.path} line {n} has no text_column {column!r}; pass text_column="
                    )
                yield n - 1, _string(f, row[column], column, f"line {n}"), raw.tell()
    except UnicodeDecodeError as e:
        raise BlockcapError(f"dataset file {f.path} line {n + 1} is not UTF-8 text ({e.reason})") from None
    except _DECODE_ERRORS as e:
        raise _bad(f, e, f" (after line {n})") from None


def _string(f: InputFile, value: Any, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise BlockcapError(
            f"dataset file {f.path} {where}: text_column {column!r} holds {type(value).__name__}, not text"
        )
    return value


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
        raise BlockcapError(
            f"dataset file {f.path} has no text_column {column!r}; its columns are {', '.join(names)}"
        )


def _table(f: InputFile, column: str, options: dict[str, Any]) -> Iterator[tuple[int, str, int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BlockcapError(
            f"dataset file {f.path}: reading .{f.format} needs pyarrow; install blockcap's parquet extra"
        ) from None
    row = 0
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
                reader = pa.ipc.open_stream(stack.enter_context(_decompressed(f, raw)))
                _columns(f, reader.schema.names, column)
                batches = (b.select([column]) for b in reader)

                def at() -> int:
                    return raw.tell()

            for batch in batches:
                for value in batch.column(0).to_pylist():
                    yield row, _string(f, value, column, f"row {row}"), at()
                    row += 1
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
