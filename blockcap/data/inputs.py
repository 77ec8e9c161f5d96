"""What a ``dataset`` names: the input files, their format and compression, and their content identity.

A dataset is a file, a directory (every file under it, recursively, in path order), a glob, or a
URL (``s3://``, ``gs://``, ``az://``, ``memory://``, read through fsspec). A path that exists is used
as it is; only one that does not is a glob. Listing a directory (as ``DIR/**/*``) or a glob skips names
starting with "." below the directory or the glob's literal prefix, ``**`` does not enter linked
directories, and a file is listed once however many links lead to it. Formats: ``.txt`` (one document
per file), ``.jsonl`` (one per line), ``.parquet`` (one per row, read by row group), each optionally
compressed (``.gz``, ``.bz2``, ``.zst``), and a Hugging Face ``datasets`` directory
written by ``save_to_disk`` (its ``.arrow`` files). One dataset has one format. Identity is by
content: each file's sha256 (remote objects: the store's content hash), never its path or mtime.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blockcap.core.errors import BlockcapError
from blockcap.data.digest import sha256_files

TEXT, JSONL, PARQUET, ARROW = "txt", "jsonl", "parquet", "arrow"
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
FORMATS = {".txt": TEXT, ".jsonl": JSONL, ".parquet": PARQUET, ".arrow": ARROW}
RECORD_FORMATS = (JSONL, PARQUET, ARROW)  # formats whose documents are rows of a text column
URL_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "memory://", "file://")
_SKIPPED = {"dataset_info.json", "state.json", "dataset_dict.json"}  # save_to_disk's own documents


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, how to read it, how big it is and what it holds."""

    path: str  # local path or URL
    format: str  # TEXT, JSONL, PARQUET or ARROW
    compression: str | None  # "gzip", "bz2", "zstd" or None
    size: int  # bytes as stored
    sha256: str  # content digest (remote: "<hash kind>:<value>" from the object store)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "size": self.size, "sha256": self.sha256}


def kind_of(name: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name's suffixes; format None when it is not an input file."""
    stem, compression = name, None
    for suffix, codec in COMPRESSIONS.items():
        if stem.endswith(suffix):
            stem, compression = stem[: -len(suffix)], codec
            break
    fmt = next((f for s, f in FORMATS.items() if stem.endswith(s)), None)
    return fmt, compression


def is_url(dataset: str) -> bool:
    return dataset.startswith(URL_SCHEMES)


def _hf_arrow_files(directory: Path) -> list[Path] | None:
    """The ``.arrow`` files of a ``datasets`` ``save_to_disk`` directory (None if it is not one)."""
    state = directory / "state.json"
    if not state.is_file() or not (directory / "dataset_info.json").is_file():
        return None
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BlockcapError(f"dataset {directory}: its state.json is not a datasets index ({e})") from None
    missing = next((n for n in names if not (directory / n).is_file()), None)
    if missing is not None:
        raise BlockcapError(
            f"dataset {directory}: its state.json lists {missing}, which is missing; write the dataset again"
        )
    return [directory / n for n in names]


def _magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _split(parts: list[str]) -> tuple[list[str], list[str]]:
    """A glob's parts: its literal prefix, and the pattern below it (a last ``**``: every file below)."""
    i = next(i for i, part in enumerate(parts) if _magic(part))
    return parts[:i], parts[i:] + (["*"] if parts[-1] == "**" else [])


def _children(directory: Path) -> list[Path]:
    """The entries of ``directory`` whose names do not start with "." (none if it is no directory)."""
    try:
        with os.scandir(directory) as entries:
            return [directory / e.name for e in entries if not e.name.startswith(".")]
    except OSError:
        return []


def _matches(directory: Path, parts: list[str]) -> Iterator[Path]:
    """The paths below ``directory`` that the pattern ``parts`` names. Wildcards never match a hidden
    name, and ``**`` does not enter linked directories, so a link loop cannot repeat files (a
    directory dataset is ``**/*``: listed by the same rule)."""
    if not parts:
        yield directory
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        yield from _matches(directory, rest)
        for child in _children(directory):
            if child.is_dir() and not child.is_symlink():
                yield from _matches(child, parts)
    elif _magic(part):
        for child in _children(directory):
            if fnmatch.fnmatchcase(child.name, part):
                yield from _matches(child, rest)
    elif os.path.lexists(directory / part):
        yield from _matches(directory / part, rest)


def _files(directory: Path, pattern: list[str]) -> list[Path]:
    """The input files ``pattern`` names below ``directory``: in path order, each file once (by the
    file it resolves to, so a link to a file also listed is not read twice)."""
    found = sorted(p for p in _matches(directory, pattern) if p.is_file() and p.name not in _SKIPPED)
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(os.path.realpath(p), p)
    return list(unique.values())


def _local_files(dataset: str) -> list[Path]:
    """The files a local dataset names, in path order. A path that exists is used as it is (even
    with ``[``, ``*`` or ``?`` in its name); only one that does not is a glob."""
    root = Path(dataset).expanduser()
    if not os.path.lexists(root) and _magic(str(root)):
        literal, pattern = _split(list(root.parts))
        found = _files(Path(*literal) if literal else Path("."), pattern)
        if not found:
            raise BlockcapError(f"dataset={dataset!r} matches no file; check the pattern")
        return found
    if not root.exists():
        raise BlockcapError(f"dataset {root} does not exist; pass a file, a directory, a glob or a URL")
    if root.is_dir():
        arrow = _hf_arrow_files(root)
        if arrow is not None:
            return arrow
        files = _files(root, ["**", "*"])
        if not files:
            raise BlockcapError(f"dataset directory {root} has no files; pass a directory of documents")
        return files
    if not root.is_file():
        raise BlockcapError(f"dataset {root} is not a regular file or directory; pass a file of documents")
    return [root]


def _hidden(path: str, base: str) -> bool:
    """Whether a name below ``base`` on the way to ``path`` starts with "." (skipped, as locally)."""
    below = path[len(base) :] if path.startswith(base) else path.rsplit("/", 1)[-1]
    return any(part.startswith(".") for part in below.split("/"))


def _remote_files(dataset: str, options: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(URL, size, content hash) of each object a URL dataset names (a prefix, glob or object)."""
    try:
        import fsspec
    except ImportError:
        raise BlockcapError(
            f"dataset={dataset!r} needs fsspec (and s3fs for s3://); install blockcap with the s3 extra"
        ) from None
    try:
        fs, path = fsspec.url_to_fs(dataset, **options)
        protocol = dataset.split("://", 1)[0]
        base = path
        if _magic(path) and not fs.exists(path):
            base = "/".join(_split(path.split("/"))[0])
            infos = fs.glob(path, detail=True)
        elif fs.isdir(path):
            infos = fs.find(path, detail=True)
        else:
            infos = {path: fs.info(path)}  # named: used as it is
    except FileNotFoundError:
        raise BlockcapError(f"dataset={dataset!r} does not exist; check the URL") from None
    except Exception as e:  # each backend raises its own kinds (credentials, network, bucket)
        first = (str(e).strip().splitlines() or [""])[0]
        raise BlockcapError(
            f"dataset={dataset!r}: the object store failed ({type(e).__name__}: {first})"
        ) from None
    out = []
    for p, info in sorted(infos.items()):
        if info.get("type") == "directory" or p.rsplit("/", 1)[-1] in _SKIPPED or _hidden(p, base):
            continue
        out.append((f"{protocol}://{p}", int(info.get("size") or 0), _remote_hash(fs, info, p)))
    if not out:
        raise BlockcapError(f"dataset={dataset!r} names no object; check the URL")
    return out


def _remote_hash(fs: Any, info: dict[str, Any], path: str) -> str:
    """An object's content hash as its store reports it (a content fact, unlike a path or a time),
    else the sha256 of its bytes, read once for it."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "content_md5", "sha256"):
        if info.get(key):
            return f"{key.lower()}:{str(info[key]).strip(chr(34))}"
    with fs.open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_inputs(dataset: str, options: dict[str, Any] | None = None) -> list[InputFile]:
    """The input files of ``dataset`` with their format, size and content digest; one format only."""
    if is_url(dataset) and not dataset.startswith("file://"):
        entries = _remote_files(dataset, dict(options or {}))
    else:
        local = [p.absolute() for p in _local_files(dataset.removeprefix("file://"))]
        entries = [(str(p), p.stat().st_size, "") for p in local]
    files: list[InputFile] = []
    formats: dict[str, str] = {}
    for path, size, digest in entries:
        fmt, compression = kind_of(path.rsplit("/", 1)[-1])
        if fmt is None:
            raise BlockcapError(
                f"dataset file {path} is not .txt, .jsonl, .parquet or .arrow (optionally .gz, .bz2 or "
                f".zst); remove it from the dataset or name the files with a glob"
            )
        formats.setdefault(fmt, path)
        files.append(InputFile(path, fmt, compression, size, digest))
    if len(formats) > 1:
        (a, fa), (b, fb) = list(formats.items())[:2]
        raise BlockcapError(
            f"dataset={dataset!r} mixes formats ({fa} is {a}, {fb} is {b}); pass one format, e.g. a glob"
        )
    hashed = iter(sha256_files([f.path for f in files if not f.sha256]))  # one read, one write of the cache
    return [f if f.sha256 else replace(f, sha256=next(hashed)) for f in files]


def content_digest(files: list[InputFile]) -> str:
    """The dataset's identity: a lone file's sha256, else the sha256 of its files' names and digests.

    (A lone file keeps the plain sha256 that ``sha256sum`` prints, so a pin is easy to write; a flat
    directory of ``.txt`` files keeps the identity blockcap 0.2 gave it.)
    """
    if len(files) == 1 and ":" not in files[0].sha256:
        return files[0].sha256
    lines = "".join(f"{name}\0{f.sha256}\n" for name, f in zip(relative_names(files), files, strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()


def relative_names(files: list[InputFile]) -> list[str]:
    """Each file's path below the files' common directory (where the dataset lives is no part of it)."""
    parts = [f.path.split("://", 1)[-1].split("/") for f in files]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]
