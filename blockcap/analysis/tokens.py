"""Stored tokens against the dataset they came from, a unit at a time.

The store names its dataset and how its windows were cut; the dataset's token cache (built by
streaming tokenization when there is none) gives the windows again, and every unit's stored
tokens, offsets and sources must equal them. A dataset that is gone is not compared (a store may
outlive its dataset); one whose content is not the store's is a problem (named, not compared).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blockcap.analysis.reader import CaptureStore
from blockcap.core.errors import BlockcapError
from blockcap.core.spec import CaptureSpec
from blockcap.data.corpus import corpus_windows, open_corpus
from blockcap.data.inputs import content_digest, list_inputs
from blockcap.storage.metadata import Opened

TOKENS_NOT_CHECKED = "tokens not checked"  # the start of the problem a dataset of other content gives


def _spec(opened: Opened) -> CaptureSpec:
    """The spec that cut the store's windows (format 1 predates specs: the few fields it had)."""
    store = CaptureStore(opened)
    if store.spec is not None:
        return store.spec
    p = opened.meta["params"]
    return CaptureSpec(split=p["split"], sample_len=p["sample_len"], stride=p["stride"],
                       dataset_sha256=p.get("dataset_sha256"))  # fmt: skip


def check_tokens(
    opened: Opened, dataset: str | None, options: dict[str, Any] | None = None, named: bool = False,
    token_cache: str | None = None,
) -> list[str]:  # fmt: skip
    """Problems with the stored tokens, offsets and sources against ``dataset`` (the store's own, or
    one the user ``named``), listed once with its storage ``options``: none when the store's own
    is gone (a store may outlive its dataset), one when its content is not the store's or a named
    one cannot be listed."""
    if not dataset:
        return []
    spec = _spec(opened)
    try:
        files = list_inputs(str(dataset), options)
    except BlockcapError as e:
        return [f"{TOKENS_NOT_CHECKED}: {e}"] if named else []
    digest = content_digest(files)
    if spec.dataset_sha256 and digest != spec.dataset_sha256:
        return [
            f"{TOKENS_NOT_CHECKED}: dataset {dataset} is not the one the store was captured from (its "
            f"sha256 is {digest[:16]}..., the store's {spec.dataset_sha256[:16]}...); pass dataset=PATH "
            f"of the original, or dataset_check=False"
        ]
    corpus = open_corpus(str(dataset), CaptureStore(opened).tokenizer, spec.text_column,
                         spec.dataset_sha256, token_cache, options, files=files)  # fmt: skip
    windows = corpus_windows(corpus, spec, opened.layout.dims.vocab_size)
    store, layout = CaptureStore(opened), opened.layout
    n = layout.n_windows
    if len(windows) != n:
        return [f"the dataset gives {len(windows):,} windows where the store has {n:,}"]
    has_sources = any(a.path == "sources" for a in layout.arrays())
    step = store.tokens.chunk_windows
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        if not np.array_equal(store.tokens.np[lo:hi].astype(np.int64), windows.get(lo, hi).numpy()):
            return [f"tokens of windows {lo}..{hi - 1} differ from the windows of dataset {dataset}"]
        if not np.array_equal(store.offsets.np[lo:hi], windows.offsets(lo, hi)):
            return [f"offsets of windows {lo}..{hi - 1} differ from the window starts"]
        if has_sources and not np.array_equal(store.sources.np[lo:hi], windows.sources(lo, hi)):
            return [f"sources of windows {lo}..{hi - 1} differ from the dataset's documents"]
    return []
