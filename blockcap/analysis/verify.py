"""Integrity check of a whole store: metadata, commit records, every object, tokens, statistics.

Checks, in order: the root document and state; every array's metadata document against the
layout; every unit's commit record; that every object of a committed unit exists (one listing
per array) and has the digest its record holds (every byte read once); the arrays written at
creation and at finish; the tokens against the dataset when it is still there; and, when asked,
the statistics against the data.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blockcap.analysis.reader import CaptureStore
from blockcap.analysis.tokens import check_tokens
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import CREATE, STATS_FINAL, object_key, site_path, stats_path
from blockcap.core.spec import parse_storage_options
from blockcap.data.inputs import is_url
from blockcap.storage.codecs import digest
from blockcap.storage.integrity import ABSENT, COMMITTED, DAMAGED, OTHER_STORE, Record
from blockcap.storage.lifecycle import damaged_metadata, final_stats
from blockcap.storage.location import Location
from blockcap.storage.lock import exclusive
from blockcap.storage.metadata import COMPLETE, CREATING, Opened, open_location, read_meta, recorded_keys
from blockcap.storage.writer import as_float32

STATS_RTOL = 1e-5  # stored statistics against a float64 recomputation (see blockcap.stats)


def verify(
    path: str | Path, check_dataset: bool = True, check_stats: bool = False,
    storage_options: dict[str, Any] | str | None = None, repair: bool = False, dataset: str | None = None,
    dataset_storage_options: dict[str, Any] | str | None = None,
) -> list[str]:  # fmt: skip
    """Every problem found in the store at ``path`` (empty when it is whole).

    ``repair``: holding the store's lock, rewrite damaged metadata documents from the layout and
    delete every object (and commit record) found altered, so that re-running the capture
    recomputes exactly those units; a run only notices objects that are missing, not ones that
    were altered (that takes reading everything). Nothing is rewritten or deleted on the word of
    a root document that the store's commit records do not confirm.

    ``dataset``: the dataset to check the tokens against (default: the one the store names, when
    it is a URL, a glob, or a regular file or directory that exists); ``dataset_storage_options``:
    its storage backend's options, as ``run`` took them (a store never records them).

    Raises BlockcapError when ``path`` is not a blockcap store at all (nothing to verify); a
    store whose root document is missing or damaged is a problem found, not an error.
    """
    location = Location(str(path), parse_storage_options(storage_options))
    named = Dataset(
        _named_dataset(dataset), parse_storage_options(dataset_storage_options, "dataset_storage_options")
    )
    if not repair:
        return _verify(location, check_dataset, check_stats, False, named)[0]
    location = location.resolved()
    if location.get("committed/zarr.json") is None:
        read_meta(location)  # not a store: one line, before any lock file appears beside it
    with exclusive(location, hint="wait for it to finish"):
        try:
            problems, altered = _verify(location, check_dataset, check_stats, True, named)
            for key in altered:
                location.delete(key)
        except OSError as e:
            raise BlockcapError(f"repair of {location} failed ({e}); nothing else was changed") from None
    if altered:
        problems.append(
            f"repair: deleted {len(altered)} altered objects; re-run the capture command to recompute them"
        )
    return problems


@dataclass(frozen=True)
class Dataset:
    """The dataset verify checks the tokens against: the user's (``path``), else the store's own."""

    path: str | None
    options: dict[str, Any]

    def readable(self, meta: dict[str, Any]) -> str | None:
        return _readable_dataset(meta, self.path)


def _named_dataset(dataset: str | None) -> str | None:
    if dataset is None:
        return None
    if _readable_dataset({}, str(dataset)) is None:
        raise BlockcapError(
            f"dataset={dataset!r} is not a file or directory; pass the dataset the store was captured from"
        )
    return str(dataset)


def _readable_dataset(meta: dict[str, Any], named: str | None = None) -> str | None:
    """The dataset verify may read to check the tokens: ``named`` (the user's), else the one the
    store names. URLs and globs as they are: ``blockcap.data.inputs`` lists them and reads regular
    files only; a local path only when it is a regular file or a directory that exists, never a
    device, FIFO or socket (which could feed endless bytes or block forever)."""
    raw: Any = named
    if raw is None:
        where = meta.get("dataset")
        raw = where.get("path") if isinstance(where, dict) else meta.get("dataset_path")
    if not isinstance(raw, str) or not raw or "\0" in raw:
        return None
    if is_url(raw):
        return raw if raw.split("://", 1)[1].strip("/") else None  # file:// alone: no dataset
    if any(c in raw for c in "*?["):
        return raw
    path = Path(raw).expanduser()
    try:
        mode = os.stat(path).st_mode  # what reading it would read: symbolic links followed
    except (OSError, ValueError):
        return None
    return str(path) if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else None


ROOT_NOT_CONFIRMED = (
    "the root document zarr.json does not match the store's commit records (its model sizes, window "
    "count, tokenizer, creation objects or parameters were edited, or it is another store's): nothing "
    "in it can be trusted and repair changes nothing; re-run the capture command that made the store "
    "to rebuild it"
)


def _root_trusted(opened: Opened, records: dict[int, Record]) -> bool | None:
    """True when a commit record carries the tag of the root's fields (format 3: every field that
    gives the bytes their meaning is as created); False when records exist and none carries it;
    None when nothing can confirm the root (format 1 and 2, or nothing committed yet)."""
    statuses = [r for r in records.values() if r.status != ABSENT]
    if opened.index.version >= 2 and any(r.status == COMMITTED for r in statuses):
        return True if opened.index.version >= 3 else None
    if opened.index.version >= 2 and any(r.reason == OTHER_STORE for r in statuses):
        return False
    return None


def _verify(
    location: Location, check_dataset: bool, check_stats: bool, repair: bool, dataset: Dataset
) -> tuple[list[str], list[str]]:
    """``verify``'s checks: (problems, keys of the objects found altered). ``repair`` rewrites
    damaged metadata documents first, so that the data can still be checked."""
    try:
        meta = read_meta(location)
        if meta.get("state") == CREATING:
            return [
                f"store {location} is being created (or its creation was interrupted): re-run the capture"
            ], []
        opened = open_location(location)
    except BlockcapError as e:
        if location.get("committed/zarr.json") is None:  # not one of ours: bad input, not damage
            raise
        return [str(e)], []
    problems = []
    if meta.get("state") != COMPLETE:
        problems.append(
            f"state is {meta.get('state')!r}, not 'complete': re-run the capture command to finish it"
        )
    listed, strays = opened.index.listed()  # bounded by the objects present, not by the root
    records = opened.index.load(listed)
    trusted = _root_trusted(opened, records)
    if trusted is False:
        return [*problems, ROOT_NOT_CONFIRMED], []
    if strays:
        problems.append(
            f"{len(strays)} commit record objects name no unit of the root's {opened.layout.n_units} "
            f"(first: {strays[0]}): the root's window count is wrong, or they are foreign"
        )
    damaged = _metadata(opened)
    problems += damaged
    if damaged and any("metadata document" in p for p in damaged):
        if not repair:  # the data checks read arrays through their metadata
            return problems, []
        fixed, kept = _repair_metadata(opened, trusted)
        if fixed:
            problems.append(f"repair: rewrote {fixed} metadata documents from the store's layout")
        if kept:
            problems.append(
                f"repair: left {kept} metadata documents that disagree with the root document: no commit "
                f"record confirms the root (format 2, or nothing committed), so it is not trusted over them"
            )
            return problems, []
        opened = open_location(location)
    altered: list[str] = []
    problems += _units(opened, listed, records, altered)
    problems += _other_arrays(opened, altered)
    if not problems:
        problems += _final_stats(opened, altered)
    if problems:  # content checks read everything; they would only repeat the damage found
        return problems, altered
    try:
        if check_dataset:
            named = dataset.path is not None or bool(dataset.options)  # options given: the user means it
            problems += check_tokens(opened, dataset.readable(opened.meta), dataset.options, named=named)
        if check_stats:
            problems += _stats(opened)
    except BlockcapError as e:
        problems.append(str(e))
    return problems, altered


def _repair_metadata(opened: Opened, trusted: bool | None) -> tuple[int, int]:
    """Rewrite damaged array metadata documents: all of them under a root the commit records
    confirm, else only those that are missing or unreadable. Returns (rewritten, left)."""
    bad = damaged_metadata(opened.location, opened.layout, opened.meta)
    fix = {k: doc for k, doc in bad.items() if trusted or _unreadable(opened.location.get(k))}
    for key, doc in fix.items():
        opened.location.put(key, doc)
    return len(fix), len(bad) - len(fix)


def _unreadable(raw: bytes | None) -> bool:
    try:
        return raw is None or not isinstance(json.loads(raw), dict)
    except ValueError:
        return True


def _metadata(opened: Opened) -> list[str]:
    """Every group and array metadata document says what the layout says (format 1: readable)."""
    if opened.index.version >= 2:
        bad = damaged_metadata(opened.location, opened.layout, opened.meta)
        return [
            f"metadata document {key} is missing or differs from the store's layout" for key in sorted(bad)
        ]
    problems = []
    for path in opened.index.objects:
        try:
            opened.array(path)
        except BlockcapError as e:
            problems.append(str(e))
    return problems


def _units(opened: Opened, listed: list[int], records: dict[int, Record], altered: list[str]) -> list[str]:
    """Commit records, presence of every object of committed units, and their digests (everything
    held is bounded by the objects listed, whatever unit count the root claims)."""
    index, location, layout = opened.index, opened.location, opened.layout
    problems = [f"{index.where('committed', u)}: commit record is damaged ({r.reason})"
                for u, r in records.items() if r.status == DAMAGED]  # fmt: skip
    altered += [k for u, r in records.items() if r.status == DAMAGED for k in index.record_keys(u)]
    have = [u for u in listed if records[u].status != ABSENT]
    if len(have) < layout.n_units:
        first = next((i for i, u in enumerate(have) if u != i), len(have))
        problems.append(
            f"{layout.n_units - len(have)} of {layout.n_units} units not committed (first: unit {first})"
        )
    committed = [u for u in listed if records[u].status == COMMITTED]
    arrays = {a.path: a for a in layout.arrays()}
    for path, first in index.objects.items():
        present = set(location.keys(f"{path}/c"))
        for piece in range(index.pieces[path]):  # an attention pattern split along queries: each piece
            i = first + piece
            keys = {u: object_key(arrays[path], u, piece) for u in committed}
            for u in committed:
                if keys[u] not in present:
                    problems.append(
                        f"{index.where(path, u)} is committed but its data object {keys[u]} is missing"
                    )
            have = [u for u in committed if keys[u] in present]
            if index.version == 1:  # no digests: decoding checks each chunk's own checksum
                for u in have:
                    problems += _decodes(opened, path, u)
                continue
            for u, data in zip(have, location.get_each(keys[u] for u in have), strict=True):
                if data is None or digest(data) != records[u].digests[i]:
                    problems.append(
                        f"{index.where(path, u)}: object {keys[u]} differs from what was committed"
                    )
                    altered.append(keys[u])
    return problems


def _decodes(opened: Opened, path: str, unit: int) -> list[str]:
    lo, hi = opened.layout.unit_range(unit)
    try:
        opened.array(path)[lo:hi]
    except Exception as e:
        return [f"{opened.index.where(path, unit)} is unreadable ({e})"]
    return []


def _other_arrays(opened: Opened, altered: list[str]) -> list[str]:
    """Objects written at creation and at finish: the root names exactly the store's own (a name
    it gives that is not one is never read), and each is present with the digest recorded."""
    digests = opened.meta.get("digests", {})
    if opened.index.version == 1:
        return []
    arrays, recorded = {a.path: a for a in opened.layout.arrays()}, recorded_keys(opened.layout)
    problems, keys, counts = [], [], dict.fromkeys(recorded, 0)
    for key in sorted(digests):
        path, _, coords = key.rpartition("/c/")
        n = recorded.get(path, ("", 0))[1]
        first = coords.split("/", 1)[0]
        if not (first.isdigit() and int(first) < n and key == object_key(arrays[path], int(first))):
            problems.append(f"the root document names an object {key!r} that is not one of the store's")
            continue
        counts[path] += 1
        keys.append(key)
    for path, (when, n) in recorded.items():
        if counts[path] < n and (when == CREATE or opened.meta.get("state") == COMPLETE):
            problems.append(
                f"{path}: the root document lacks the digests of {n - counts[path]} of its objects"
            )
    for key, data in zip(keys, opened.location.get_each(keys), strict=True):
        if data is None:
            problems.append(f"{key.rpartition('/c/')[0]}: its data object {key} is missing")
        elif digest(data) != digests[key]:
            problems.append(f"{key.rpartition('/c/')[0]}: object {key} differs from what was written")
            altered.append(key)
    return problems


def _final_stats(opened: Opened, altered: list[str]) -> list[str]:
    """The final statistics of a complete store are the merge of its committed partials, exactly
    (format 3): so they are authenticated by the commit records, not only by the root's digests."""
    layout = opened.layout
    if opened.index.version < 3 or not layout.stats or opened.meta.get("state") != COMPLETE:
        return []
    arrays, problems = {a.path: a for a in layout.arrays()}, []
    for (b, site), st in final_stats(opened).items():
        for name in STATS_FINAL:
            path = stats_path(b, site, name)
            stored = np.asarray(opened.array(path)[:])
            if not np.array_equal(stored, np.asarray(getattr(st, name), "<f8"), equal_nan=True):
                problems.append(f"{path}: the statistics differ from the merge of the committed partials")
                altered.append(object_key(arrays[path], 0))
    return problems


def _stats(opened: Opened) -> list[str]:
    """Recompute every site's statistics in float64 from the stored data and compare.

    A lossy store's statistics are those of the values as computed, before rounding: the stored
    data must agree with them within the worst relative error the writer measured (``eps``),
    that error must be within keep_bits' bound, and no stored value may carry more bits.
    """
    store = CaptureStore(opened)
    keep = opened.layout.keep_bits
    low = np.uint32((1 << (23 - keep)) - 1) if keep is not None else np.uint32(0)
    problems = []
    for b, site in opened.layout.stat_outputs():
        want = store.stats(site, b)
        arr = store.site(site, b)
        total, s, ss = 0, 0.0, 0.0
        lo_v, hi_v = np.inf, -np.inf
        norms = np.zeros(opened.layout.sample_len)
        extra_bits = 0
        for lo in range(0, store.n_windows, arr.chunk_windows):
            x = as_float32(
                np.asarray(arr._rows(lo, min(lo + arr.chunk_windows, store.n_windows))),
                opened.layout.dtype_name,
            )
            if keep is not None:
                extra_bits += int(((x.view(np.uint32) & low) != 0)[np.isfinite(x)].sum())
            x = x.astype(np.float64)
            total += x.shape[0] * x.shape[1]
            s = s + x.sum(axis=(0, 1))
            ss = ss + np.square(x).sum(axis=(0, 1))
            lo_v, hi_v = np.minimum(lo_v, x.min(axis=(0, 1))), np.maximum(hi_v, x.max(axis=(0, 1)))
            norms += np.linalg.norm(x, axis=2).sum(axis=0)
        mean = s / total
        var = ss / total - mean**2
        name = site_path(b, site)
        scale = np.abs(mean).max() + np.sqrt(np.abs(var).max())
        eps = want.max_rel_error or 0.0
        rms = np.sqrt(ss / total)
        checks = {
            "mean": np.allclose(want.mean, mean, rtol=STATS_RTOL, atol=STATS_RTOL * scale + 2 * eps * rms),
            "var": np.allclose(
                want.var, var, rtol=STATS_RTOL * 10, atol=STATS_RTOL * scale**2 + 3 * eps * rms**2
            ),  # fmt: skip
            "min": np.all(np.abs(want.min - lo_v) <= 2 * eps * np.abs(want.min)),
            "max": np.all(np.abs(want.max - hi_v) <= 2 * eps * np.abs(want.max)),
            "norm_mean": np.allclose(want.norm_mean, norms / store.n_windows, rtol=STATS_RTOL + 2 * eps),
        }
        problems += [f"statistics {name} {k} differ from the data" for k, ok in checks.items() if not ok]
        if keep is not None and not eps <= 2.0**-keep:
            problems.append(f"{name}: its recorded worst relative error {eps:.3g} exceeds keep_bits:{keep}")
        if extra_bits:
            problems.append(
                f"{name}: {extra_bits} stored values have more mantissa bits than keep_bits:{keep}"
            )
    return problems
