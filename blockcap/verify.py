"""Integrity check of a whole store: state, shapes, every chunk's checksum, tokens vs dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blockcap.data import CharTokenizer, Windows, read_text, sha256_file, split_tokens
from blockcap.errors import BlockcapError
from blockcap.store import COMPLETE, Layout, damaged_chunks, meta, open_group, read_committed


def verify(path: str | Path, check_dataset: bool = True) -> list[str]:
    """Every problem found in the store at ``path`` (empty when it is whole)."""
    path = Path(path)
    try:
        group = open_group(path)
    except BlockcapError as e:
        return [str(e)]
    m = meta(group)
    problems = []
    if m.get("state") != COMPLETE:
        problems.append(
            f"state is {m.get('state')!r}, not 'complete': re-run the capture command to finish it"
        )
    committed = read_committed(group)
    if not committed.all():
        missing = np.flatnonzero(~committed)
        problems.append(
            f"{missing.size} of {committed.size} chunks not committed (first: chunk {missing[0]})"
        )
    try:
        shapes = Layout.from_meta(m).arrays()
    except (KeyError, TypeError, BlockcapError) as e:
        return [*problems, f"provenance attribute is missing {e}"]
    for name, shape in shapes.items():
        if name not in group:
            problems.append(f"array {name} is missing")
            continue
        arr = group[name]
        if tuple(arr.shape) != shape:
            problems.append(f"array {name} has shape {tuple(arr.shape)}, the metadata says {shape}")
            continue
        for where, e in damaged_chunks(arr, range(-(-shape[0] // arr.chunks[0]))):
            problems.append(f"array {name} {where} is unreadable: {e}")
    if check_dataset and not any("tokens" in p for p in problems):
        problems += _check_tokens(group, m)
    return problems


def _check_tokens(group, m: dict) -> list[str]:
    """Compare stored tokens and offsets with the dataset, when the dataset file is still there."""
    p = m["params"]
    data = Path(m.get("dataset_path", ""))
    if not data.is_file() or sha256_file(data) != p["dataset_sha256"]:
        return []
    tok = CharTokenizer(m["vocab"])
    stream = split_tokens(tok.encode_tensor(read_text(data)), p["split"], p["train_fraction"])
    windows = Windows(stream, p["sample_len"], p["stride"])
    n = p["n_windows"]
    problems = []
    if not np.array_equal(np.asarray(group["tokens"][:]).astype(np.int64), windows.get(0, n).numpy()):
        problems.append(f"tokens differ from the windows of dataset {data}")
    if not np.array_equal(np.asarray(group["offsets"][:]), windows.offsets(0, n).numpy()):
        problems.append("offsets differ from the window starts")
    return problems
