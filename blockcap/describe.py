"""Human-readable description of a store, for ``python -m blockcap info``."""

from __future__ import annotations

import json
from pathlib import Path

from blockcap.store import meta, open_group, read_committed, stored_bytes


def describe(path: Path) -> str:
    """Layout, shapes, dtypes, codecs, stored vs raw bytes, state and provenance of a store."""
    group = open_group(path)
    m = meta(group)
    committed = read_committed(group)
    lines = [
        f"store {path}",
        f"  state: {m.get('state')} ({int(committed.sum())}/{committed.size} chunks committed)",
    ]
    raw = 0
    names = sorted(name for name, _ in group.arrays()) + [
        f"{g}/{a}" for g, sub in sorted(group.groups()) for a, _ in sorted(sub.arrays())
    ]
    lines.append("  arrays:")
    for name in names:
        arr = group[name]
        stored = stored_bytes(path / name) if (path / name).is_dir() else 0
        nbytes = arr.nbytes
        raw += nbytes
        codecs = "+".join(c.to_dict()["name"] for c in arr.compressors) or "none"
        dims = ",".join(arr.metadata.dimension_names or ())
        kind = arr.attrs.get("blockcap_dtype", str(arr.dtype))
        lines.append(
            f"    {name:24} {str(tuple(arr.shape)):22} {kind:9} ({dims}) chunks {tuple(arr.chunks)} "
            f"{codecs} {nbytes / 1e6:,.1f} MB -> {stored / 1e6:,.1f} MB"
        )
    stored_all = stored_bytes(path)
    lines.append(
        f"  bytes: raw {raw / 1e6:,.1f} MB, stored {stored_all / 1e6:,.1f} MB, "
        f"ratio {raw / max(1, stored_all):.2f}x"
    )
    prov = {k: v for k, v in m.items() if k not in ("vocab",)}
    lines.append("  provenance:")
    lines += ["    " + line for line in json.dumps(prov, indent=2, sort_keys=True).splitlines()]
    return "\n".join(lines)
