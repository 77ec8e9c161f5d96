"""Integrity check of a whole store: metadata, commit records, every object, tokens, statistics.

Checks, in order: the root document and state; every array's metadata document against the
layout; every unit's commit record; that every object of a committed unit exists (one listing
per array) and has the digest its record holds (every byte read once); the arrays written at
creation and at finish; the tokens against the dataset when it is still there; and, when asked,
the statistics against the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blockcap.analysis.reader import CaptureStore
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import site_path
from blockcap.core.spec import parse_storage_options
from blockcap.data.sources import dataset_sha256, token_stream
from blockcap.data.windows import Windows, split_tokens
from blockcap.storage.codecs import digest
from blockcap.storage.integrity import ABSENT, COMMITTED, DAMAGED
from blockcap.storage.lifecycle import damaged_metadata, repair_metadata
from blockcap.storage.location import Location
from blockcap.storage.lock import exclusive
from blockcap.storage.metadata import COMPLETE, CREATING, Opened, open_location, read_meta
from blockcap.storage.writer import as_float32

STATS_RTOL = 1e-5  # stored statistics against a float64 recomputation (see blockcap.stats)


def verify(
    path: str | Path, check_dataset: bool = True, check_stats: bool = False,
    storage_options: dict[str, Any] | str | None = None, repair: bool = False,
) -> list[str]:  # fmt: skip
    """Every problem found in the store at ``path`` (empty when it is whole).

    ``repair``: holding the store's lock, rewrite damaged metadata documents from the layout and
    delete every object (and commit record) found altered, so that re-running the capture
    recomputes exactly those units; a run only notices objects that are missing, not ones that
    were altered (that takes reading everything).

    Raises BlockcapError when ``path`` is not a blockcap store at all (nothing to verify); a
    store whose root document is missing or damaged is a problem found, not an error.
    """
    location = Location(str(path), parse_storage_options(storage_options))
    if not repair:
        return _verify(location, check_dataset, check_stats, repair=False)[0]
    if location.get("committed/zarr.json") is None:
        read_meta(location)  # not a store: one line, before any lock file appears beside it
    with exclusive(location, hint="wait for it to finish"):
        problems, altered = _verify(location, check_dataset, check_stats, repair=True)
        for key in altered:
            location.delete(key)
    if altered:
        problems.append(
            f"repair: deleted {len(altered)} altered objects; re-run the capture command to recompute them"
        )
    return problems


def _verify(
    location: Location, check_dataset: bool, check_stats: bool, repair: bool
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
    damaged = _metadata(opened)
    problems += damaged
    if damaged and any("metadata document" in p for p in damaged):
        if not repair:  # the data checks read arrays through their metadata
            return problems, []
        repair_metadata(location, opened.layout, meta)
        opened = open_location(location)
        problems.append(f"repair: rewrote {len(damaged)} metadata documents from the store's layout")
    altered: list[str] = []
    problems += _units(opened, altered)
    problems += _other_arrays(opened, altered)
    if problems:  # content checks read everything; they would only repeat the damage found
        return problems, altered
    try:
        if check_dataset:
            problems += _tokens(opened)
        if check_stats:
            problems += _stats(opened)
    except BlockcapError as e:
        problems.append(str(e))
    return problems, altered


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


def _units(opened: Opened, altered: list[str]) -> list[str]:
    """Commit records, presence of every object of committed units, and their digests."""
    index, location, layout = opened.index, opened.location, opened.layout
    records = index.load_all()
    problems = [f"{index.where('committed', u)}: commit record is damaged ({r.reason})"
                for u, r in records.items() if r.status == DAMAGED]  # fmt: skip
    altered += [k for u, r in records.items() if r.status == DAMAGED for k in index.record_keys(u)]
    absent = [u for u, r in records.items() if r.status == ABSENT]
    if absent:
        problems.append(f"{len(absent)} of {layout.n_units} units not committed (first: unit {absent[0]})")
    committed = [u for u, r in records.items() if r.status == COMMITTED]
    for path, i in index.objects.items():
        ndim = opened.array(path).ndim
        present = set(location.keys(f"{path}/c"))
        keys = {u: "/".join([path, "c", str(u), *["0"] * (ndim - 1)]) for u in committed}
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
        for u, data in zip(have, location.get_many([keys[u] for u in have]), strict=True):
            if data is None or digest(data) != records[u].digests[i]:
                problems.append(f"{index.where(path, u)}: object {keys[u]} differs from what was committed")
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
    """Objects written at creation and at finish: present, with the digests the root records."""
    digests = opened.meta.get("digests", {})
    keys = sorted(digests)
    problems = []
    for key, data in zip(keys, opened.location.get_many(keys), strict=True):
        if data is None:
            problems.append(f"{key.rpartition('/c/')[0]}: its data object {key} is missing")
        elif digest(data) != digests[key]:
            problems.append(f"{key.rpartition('/c/')[0]}: object {key} differs from what was written")
            altered.append(key)
    return problems


def _tokens(opened: Opened) -> list[str]:
    """Compare stored tokens and offsets with the dataset, when the dataset is still there unchanged."""
    meta, layout, params = opened.meta, opened.layout, opened.meta["params"]
    data = Path(meta["dataset"]["path"] if "dataset" in meta else meta.get("dataset_path", ""))
    if not data.exists() or dataset_sha256(data) != params["dataset_sha256"]:
        return []
    store = CaptureStore(opened)
    stream = token_stream(data, store.tokenizer, params.get("text_column"))
    windows = Windows(split_tokens(stream, params["split"]), params["sample_len"], params["stride"])
    n = layout.n_windows
    if len(windows) != n or not np.array_equal(
        store.tokens.np[:].astype(np.int64), windows.get(0, n).numpy()
    ):
        return [f"tokens differ from the windows of dataset {data}"]
    if not np.array_equal(store.offsets.np[:], windows.offsets(0, n)):
        return ["offsets differ from the window starts"]
    return []


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
