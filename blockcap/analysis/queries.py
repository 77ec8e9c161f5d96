"""Queries for search: vectors given directly, or texts run through the model the store was captured
with (checked by its weights' hash), taking a site's vector at the text's last token."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from blockcap.analysis.arrays import LazyArray
from blockcap.analysis.reader import CaptureStore
from blockcap.core.errors import BlockcapError


def query_texts(queries: Any) -> list[str] | None:
    """``queries`` as a list of texts, or None when they are vectors."""
    if isinstance(queries, str):
        return [queries]
    if isinstance(queries, (list, tuple)) and queries and all(isinstance(q, str) for q in queries):
        return list(queries)
    return None


def query_matrix(queries: Any, arr: LazyArray) -> torch.Tensor:
    """Vector queries as a (q, width) float32 tensor, checked against the site's width."""
    C = arr.shape[-1]
    try:
        q = torch.as_tensor(np.asarray(queries) if isinstance(queries, (list, tuple)) else queries)
    except (TypeError, ValueError, RuntimeError):
        raise BlockcapError(
            f"queries of type {type(queries).__name__} are neither text (a str or list of str) nor "
            f"vectors; pass a ({C},) or (q, {C}) tensor"
        ) from None
    if q.dtype == torch.bool or q.is_complex() or q.ndim not in (1, 2) or q.numel() == 0:
        raise BlockcapError(
            f"queries of shape {tuple(q.shape)} and dtype {q.dtype} are not vectors; "
            f"pass a ({C},) or (q, {C}) real tensor"
        )
    if q.ndim == 1 and q.shape[0] != C:
        raise BlockcapError(f"query has {q.shape[0]} values but {arr.name} vectors have {C}")
    if q.ndim == 2 and q.shape[1] != C:
        raise BlockcapError(
            f"queries have width {q.shape[1]} but {arr.name} vectors have {C}; pass a (q, {C}) tensor"
        )
    q = q.detach().cpu().float().reshape(-1, C)
    if not torch.isfinite(q).all():
        raise BlockcapError("queries hold NaN or infinite values; pass finite vectors")
    return q


# --- text queries -------------------------------------------------------------------------------------
def _check_texts(store: CaptureStore, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, refusing empty text and characters the vocabulary lacks."""
    out = []
    vocab = getattr(store.tokenizer, "stoi", None)  # a char tokenizer's table
    for text in texts:
        missing = sorted(set(text) - vocab.keys()) if vocab is not None else []
        if missing:
            raise BlockcapError(
                f"query {text!r} has characters not in the model's vocabulary ({''.join(missing)!r}); "
                f"remove them"
            )
        ids = store.tokenizer.encode(text) if text else np.zeros(0, np.int64)
        if ids.size == 0:
            raise BlockcapError(f"query {text!r} has no tokens; pass some text")
        out.append(ids)
    return out


def load_store_model(store: CaptureStore, model: str | None = None, weights: str | None = None) -> Any:
    """The model adapter the store was captured with (``model``/``weights``: where it is now).

    Refuses any model whose weights hash differs from the one the store recorded, so query
    vectors always come from the same model as the stored ones.
    """
    spec = store.spec
    if spec is None:
        raise BlockcapError(
            f"store {store.location} predates recorded specs (format 1); pass query vectors instead of text"
        )
    if model is not None or weights is not None:
        spec = replace(spec, model=model, weights=weights, revision=None)
    from blockcap.capture import load_model

    # a raw state dict has no vocabulary: the store's own (its dataset's sorted characters) is it
    adapter = load_model(spec, lambda: getattr(store.tokenizer, "vocab", ""))
    if adapter.model_sha256 != spec.model_sha256:
        where = f"model={spec.model!r}" if spec.model else f"weights={spec.weights!r}"
        raise BlockcapError(
            f"{where} has sha256 {adapter.model_sha256}, but the store was captured with "
            f"{spec.model_sha256}; pass model= or weights= naming the weights it was captured with"
        )
    adapter.to(torch.device("cpu"), getattr(torch, spec.model_dtype))
    return adapter


def text_vectors(
    store: CaptureStore, texts: list[str], site: str, block: int, model: str | None = None,
    weights: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """(len(texts), width): each text's ``site`` vector of ``block`` at its last position."""
    ids = _check_texts(store, texts)
    adapter = load_store_model(store, model, weights)
    context = adapter.dims.context
    for text, i in zip(texts, ids, strict=True):
        if i.size > context:
            raise BlockcapError(
                f"query {text[:40]!r}... is {i.size} tokens, longer than the model's context of "
                f"{context}; shorten it"
            )
    assert store.spec is not None  # load_store_model refuses a store without one (format 1)
    module = adapter.capture_module((block,), (site,), fused=store.spec.fused)
    with torch.inference_mode():
        return torch.stack([module(torch.as_tensor(i)[None])[0][0, -1].float() for i in ids])
