"""A store as other tools see it: an xarray Dataset, and TransformerLens hook names.

``to_xarray(store)`` gives one lazy, dask-backed variable per (block, site), named
``block{b}.{site}`` (a dot, not a slash: netCDF and xarray's own writers refuse "/" in names),
with named dimensions::

    residual sites   (window, position, embed)            block_input, proj_output, resid_mid, ...
    heads_output     (window, position, head, head_dim)   per head, like TransformerLens' hook_z
    mlp_hidden       (window, position, mlp)
    router_logits    (window, position, expert)               mixture-of-experts models
    attention        (window, head, query, key)

and ``tokens``, ``offsets`` and ``committed`` (False: a window not yet written, read as zeros)
as coordinates. bfloat16 is widened to float32. Dedup stores work too: each dask block looks up
its windows' rows through ``prefix_rows`` (the reader's gather), so a dedup store reads as if
every window were stored.

Without blockcap, ``xarray.open_zarr(path, group="block0", consolidated=False)`` opens a block's
sites (and the root group ``tokens``, ``offsets``, ``committed``). What a plain reader sees of
bfloat16 is the bit pattern: ``uint16`` with the attribute ``blockcap_dtype: bfloat16``; widen it
with ``(bits.astype(np.uint32) << 16).view(np.float32)``. There the last dimension is ``embed``
for residual sites, ``head_features`` for ``heads_output``, ``mlp`` for ``mlp_hidden`` and
``expert`` for ``router_logits``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from blockcap.analysis.arrays import LazyArray
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import TARGET_CHUNK_BYTES
from blockcap.core.sites import ATTENTION, EXPERTS, HEADS, MLP, TRANSFORMER_LENS, VECTOR_SITES

DIMS = {HEADS: ("head", "head_dim"), MLP: ("mlp",), EXPERTS: ("expert",)}


class _Dask:
    """A LazyArray as dask reads it: numpy out, bfloat16 widened, the last axis optionally split."""

    def __init__(self, lazy: LazyArray, split: tuple[int, int] | None = None) -> None:
        self.lazy, self.split = lazy, split
        self.shape = (*lazy.shape[:-1], *split) if split else tuple(lazy.shape)
        self.dtype = np.dtype(np.float32) if lazy.bfloat16 else np.dtype(lazy.zarr.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if self.split is None:
            return self.lazy.np[key]
        lead = len(self.lazy.shape) - 1  # index the unsplit axes, then split and index the rest
        data = self.lazy.np[key[:lead]]
        return data.reshape(*data.shape[:-1], *self.split)[(slice(None),) * lead + tuple(key[lead:])]


def _dask_array(
    store: Any, lazy: LazyArray, name: str, windows: int, split: tuple[int, int] | None = None
) -> Any:
    """``lazy`` as a dask array of ``windows``-window blocks, named uniquely for this store's run."""
    import dask.array as da
    from dask.base import tokenize

    src = _Dask(lazy, split)
    token = tokenize(str(store.location), store.meta.get("run_id"), name)
    return da.from_array(src, chunks=(windows, *src.shape[1:]), name=f"{name}-{token}", lock=False,
                         fancy=False, meta=np.empty((0,) * src.ndim, src.dtype))  # fmt: skip


def _block_windows(store: Any, lazy: LazyArray) -> int:
    """Windows per dask block: one store chunk, so a selection reads only the chunks it touches
    (dask reads whole blocks); a dedup store's windows map to scattered rows, so about as many
    windows as a chunk holds bytes."""
    if store.dedup:
        return max(1, TARGET_CHUNK_BYTES // (4 * int(np.prod(lazy.shape[1:]))))
    return lazy.chunk_windows


def _site_variable(store: Any, block: int, site: str, key: str) -> tuple[tuple[str, ...], Any]:
    lazy = store.site(site, block)
    dims: tuple[str, ...]
    if site == ATTENTION:
        dims, split = ("window", "head", "query", "key"), None
    else:
        kind = VECTOR_SITES[site]
        split = (store.layout.dims.n_head, store.layout.dims.head_dim) if kind == HEADS else None
        dims = ("window", "position", *DIMS.get(kind, ("embed",)))
    return dims, _dask_array(store, lazy, key, _block_windows(store, lazy), split)


def to_xarray(store: Any) -> Any:
    """The store as a lazy ``xarray.Dataset`` (see the module docstring for names and dims)."""
    try:
        import dask.array  # noqa: F401
        import xarray as xr
    except ImportError:
        raise BlockcapError(
            "to_xarray needs xarray and dask; install them with pip install 'blockcap[xarray]'"
        ) from None
    data_vars = {}
    for block, site in store.layout.outputs():
        key = f"block{block}.{site}"
        dims, data = _site_variable(store, block, site, key)
        attrs = {"site": site, "block": block, "blockcap_dtype": store.layout.dtype_name}
        if site in TRANSFORMER_LENS:  # router_logits has no TransformerLens name
            attrs["transformer_lens"] = TRANSFORMER_LENS[site].format(b=block)
        data_vars[key] = xr.Variable(dims, data, attrs)
    window_blocks = store.tokens.chunk_windows
    coords = {
        "window": np.arange(store.n_windows),
        "position": np.arange(store.sample_len),
        "tokens": (("window", "position"), _dask_array(store, store.tokens, "tokens", window_blocks)),
        "offsets": (("window",), _dask_array(store, store.offsets, "offsets", window_blocks)),
        "committed": (("window",), store.committed_windows()),
    }
    attrs = {"store": str(store.location), "state": store.meta.get("state", ""),
             "run_id": store.meta.get("run_id", ""), "dedup": int(store.dedup)}  # fmt: skip
    return xr.Dataset(data_vars, coords, attrs)


# --- TransformerLens names -------------------------------------------------------------------------------
# each site's short TransformerLens name, as utils.get_act_name takes it: mlp_out, z, pattern, ...
SHORT = {site: template.rsplit("hook_", 1)[1] for site, template in TRANSFORMER_LENS.items()}
SHORT_NAMES = {short: site for site, short in SHORT.items()}
_PATTERNS = {
    site: re.compile(re.escape(template).replace(re.escape("{b}"), r"(\d+)"))
    for site, template in TRANSFORMER_LENS.items()
}


def _parse(key: Any) -> tuple[str, int] | None:
    """(site, block) of a TransformerLens hook name or a (short name, layer) pair; None if neither."""
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str):
        name, block = key
        site = SHORT_NAMES.get(name.removeprefix("hook_"))
        ok = isinstance(block, (int, np.integer)) and not isinstance(block, bool) and block >= 0
        return (site, int(block)) if site and ok else None
    if isinstance(key, str):
        for site, pattern in _PATTERNS.items():
            m = pattern.fullmatch(key)
            if m:
                return site, int(m.group(1))
    return None


def tl_lookup(store: Any, key: Any) -> LazyArray:
    """The lazy array a TransformerLens name stands for: ``"blocks.0.hook_mlp_out"`` or ``("mlp_out", 0)``.

    The same arrays as ``store.site``; ``hook_z`` is the per-head view (``store.heads``).
    """
    parsed = _parse(key)
    if parsed is None or parsed[1] not in store.blocks or parsed[0] not in store.sites:
        named = [s for s in store.sites if s in TRANSFORMER_LENS]
        what = "not a TransformerLens name" if parsed is None else "not captured in this store"
        if not named:
            raise BlockcapError(f"{key!r} is {what}; this store has no site TransformerLens names")
        templates = ", ".join(TRANSFORMER_LENS[s].replace("{b}", "N") for s in named)
        raise BlockcapError(
            f"{key!r} is {what}; it has {templates} for N in {', '.join(map(str, store.blocks))}, "
            f"or (short name, N) pairs like {(SHORT[named[0]], store.blocks[0])!r}"
        )
    site, block = parsed
    return store.heads(block) if site == "heads_output" else store.site(site, block)


class Interop:
    """What ``CaptureStore`` offers other tools: TransformerLens names as keys, and ``to_xarray``."""

    def __getitem__(self, key: Any) -> LazyArray:
        """A site by TransformerLens name: ``store["blocks.0.hook_mlp_out"]`` or ``store["mlp_out", 0]``."""
        return tl_lookup(self, key)

    def to_xarray(self) -> Any:
        """The store as a lazy xarray Dataset (needs the ``xarray`` extra); see this module's docstring."""
        return to_xarray(self)
