"""Human-readable description of a store, for ``python -m blockcap info``."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.core.metadata import ArrayV3Metadata

from blockcap.analysis.reader import CaptureStore
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import SITE_MEANINGS
from blockcap.storage.integrity import COMMITTED


def describe(store: CaptureStore) -> str:
    """Layout, shapes, dtypes, codecs, stored vs raw bytes, state, statistics and provenance."""
    m, layout = store.meta, store.layout
    index = store.opened.index
    listed, _ = index.listed()  # bounded by the records present, whatever unit count the root claims
    done = sum(r.status == COMMITTED for r in index.load(listed).values())
    lines = [
        f"store {store.location}",
        f"  state: {m.get('state')} ({done}/{layout.n_units} units committed), "
        f"format {m.get('format_version')}",
        f"  windows {layout.n_windows:,} x {layout.sample_len} tokens"
        + (f", {layout.n_rows:,} distinct prefix rows (dedup)" if layout.dedup else ""),
    ]
    sizes: dict[str, int] = defaultdict(int)
    for key, size in store.location.sizes().items():
        path, sep, _ = key.rpartition("/c/")
        if sep:
            sizes[path] += size
    raw_total = stored_total = 0
    lines.append("  arrays:")
    for path in _array_paths(store):
        try:
            arr = store.opened.array(path)
        except BlockcapError as e:
            lines.append(f"    {path:34} {e}")
            continue
        nbytes, stored = arr.nbytes, sizes.get(path, 0)
        raw_total, stored_total = raw_total + nbytes, stored_total + stored
        meta = arr.metadata
        assert isinstance(meta, ArrayV3Metadata)  # the store's group is opened as zarr v3
        compressors = [c for c in arr.compressors if isinstance(c, BytesBytesCodec)]  # a v3 array's are
        codecs = "+".join(str(c.to_dict()["name"]) for c in compressors) or "none"
        dims = ",".join(str(d) for d in meta.dimension_names or ())
        kind = arr.attrs.get("blockcap_dtype", str(arr.dtype))
        lines.append(
            f"    {path:34} {str(tuple(arr.shape)):22} {kind:9} ({dims}) chunks {tuple(arr.chunks)} "
            f"{codecs} {nbytes / 1e6:,.1f} MB -> {stored / 1e6:,.1f} MB"
        )
    lines.append(
        f"  bytes: raw {raw_total / 1e6:,.1f} MB, stored {stored_total / 1e6:,.1f} MB, "
        f"ratio {raw_total / max(1, stored_total):.2f}x"
    )
    if layout.stats and store.complete:
        lines.append("  statistics (over every token; mean/std over channels):")
        for b, site in layout.stat_outputs():
            st = store.stats(site, b)
            lines.append(
                f"    block{b}/{site:24} mean {np.mean(st.mean):+.4g}, std {np.mean(st.std):.4g}, "
                f"min {st.min.min():+.4g}, max {st.max.max():+.4g}, mean norm {np.nanmean(st.norm_mean):.4g}"
                + ("" if st.max_rel_error is None else f", stored within {st.max_rel_error:.3g} relative")
            )
    family = (m.get("model") or {}).get("family")
    meanings = SITE_MEANINGS.get(family, {}) if isinstance(family, str) else {}
    if meanings:
        lines.append(f"  sites, in {family} blocks:")
        lines += [f"    {site:14} {meanings[site]}" for site in layout.sites if site in meanings]
    lines += _dataset_lines(m.get("dataset"))
    prov = {k: v for k, v in m.items() if k not in ("tokenizer", "dataset")}
    if isinstance(prov.get("digests"), dict):  # one per object written at creation: a count says enough
        prov["digests"] = f"{len(prov['digests']):,} objects"
    lines.append("  provenance:")
    lines += ["    " + line for line in json.dumps(prov, indent=2, sort_keys=True).splitlines()]
    return "\n".join(lines)


SHOWN_FILES = 5  # input files listed by name; a sharded corpus has thousands


def _dataset_lines(record: object) -> list[str]:
    """The dataset a store was captured from: where, its identity, its size, its first input files
    (values shown as they are: a store is data, a damaged record still prints)."""
    if not isinstance(record, dict):
        return [f"  dataset: {record}"] if record else []
    files = record["files"] if isinstance(record.get("files"), list) else []
    lines = [f"  dataset: {record.get('path')}", f"    sha256 {record.get('sha256')}"]
    if "documents" in record:
        lines.append(
            f"    {_count(record.get('documents'))} documents, {_count(record.get('tokens'))} tokens in "
            f"{len(files):,} input files; token cache {record.get('token_cache')}, "
            f"{_count(record.get('hard_cuts', 0))} hard cuts"
        )
    for f in files[:SHOWN_FILES]:
        if isinstance(f, dict):
            lines.append(f"    {f.get('path')} ({_count(f.get('size'))} bytes, {f.get('format')})")
    if len(files) > SHOWN_FILES:
        lines.append(f"    ... and {len(files) - SHOWN_FILES:,} more files")
    return lines


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _array_paths(store: CaptureStore) -> list[str]:
    if store.opened.index.version >= 2:
        return [a.path for a in store.layout.arrays()]
    return ["tokens", "offsets", "committed", *(f"block{b}/{s}" for b, s in store.layout.outputs())]
