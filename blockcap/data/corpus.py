"""A dataset ready to cut windows from: its input files, their content digest, and its tokens.

``open_corpus`` lists the inputs, checks a pin against their content, and opens the token cache
of this dataset and tokenizer, building it first when there is none (with a progress bar of the
input bytes read). Every process of a run calls it: the first builds, the others wait for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from blockcap.core.errors import BlockcapError
from blockcap.core.spec import DOCUMENTS, SEPARATORS, CaptureSpec
from blockcap.data.cache import TokenCache, build_cache, cache_key, cache_root, open_cache
from blockcap.data.inputs import InputFile, content_digest, is_url, list_inputs
from blockcap.data.stream import JoinedStream
from blockcap.data.tokenizers import Tokenizer
from blockcap.data.windows import Windows, split_range

EOS, BOS, NONE = SEPARATORS


@dataclass
class Corpus:
    """A dataset's inputs and its committed token cache."""

    dataset: str
    files: list[InputFile]
    sha256: str  # the dataset's content identity (``content_digest``)
    cache: TokenCache
    tokenizer: Tokenizer
    seconds: float  # spent opening (and building) the cache
    reused: bool  # the cache was there already

    def separator_id(self, separator: str) -> int | None:
        """The id joined between documents for ``separator`` (eos, bos or none)."""
        if separator == NONE:
            return None
        found = self.tokenizer.eos_id if separator == EOS else self.tokenizer.bos_id
        if found is None:
            raise BlockcapError(
                f"separator={separator!r}: this tokenizer has no {separator.upper()} token; "
                f"use separator=none or another separator"
            )
        return found

    def default_separator(self) -> str:
        """eos where the tokenizer has one, else none (how blockcap has always joined documents)."""
        return EOS if self.tokenizer.eos_id is not None else NONE

    def stream(self, separator: str) -> JoinedStream:
        return JoinedStream(self.cache, self.separator_id(separator))

    def record(self) -> dict[str, Any]:
        """The store's dataset record: what was read, its identity, and the cache it was read through."""
        where = self.dataset if is_url(self.dataset) else str(Path(self.dataset).expanduser().absolute())
        return {
            "path": where, "sha256": self.sha256, "files": [f.record() for f in self.files],
            "documents": self.cache.n_documents, "tokens": self.cache.n_tokens,
            "token_cache": self.cache.key, "hard_cuts": int(self.cache.meta.get("hard_cuts", 0)),
        }  # fmt: skip


def open_corpus(
    dataset: str, tokenizer: Tokenizer, text_column: str | None = None, sha256: str | None = None,
    token_cache: str | None = None, options: dict[str, Any] | None = None, progress: bool = False,
    build: bool = True, files: list[InputFile] | None = None,
) -> Corpus:  # fmt: skip
    """The dataset's inputs (``files`` when the caller has listed them already), checked against
    ``sha256``, and its token cache: built if missing when ``build`` (one process per machine of a
    torchrun job), else waited for."""
    t0 = time.perf_counter()
    files = list_inputs(dataset, options) if files is None else files
    digest = content_digest(files)
    if sha256 and digest != sha256:
        raise BlockcapError(
            f"dataset {dataset} has sha256 {digest}, expected {sha256}; pass the right dataset"
        )
    bar = _Progress(files, progress)
    root = cache_root(token_cache)
    found = open_cache(root, cache_key(files, tokenizer, text_column))  # opened (and checked) once
    try:
        cache = found or build_cache(files, tokenizer, text_column, root, options, bar, wait=not build)
    finally:
        bar.close()
    reused = found is not None
    return Corpus(dataset, files, digest, cache, tokenizer, time.perf_counter() - t0, reused)


class _Progress:
    """A bar of input bytes read, with tokens/s, shown once a build starts reporting."""

    def __init__(self, files: list[InputFile], shown: bool) -> None:
        self.sizes = [f.size for f in files]
        self.before = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.shown = shown
        self.bar: tqdm | None = None
        self.t0 = time.perf_counter()

    def __call__(self, file: int, at: int, tokens: int) -> None:
        if not self.shown:
            return
        if self.bar is None:
            self.bar = tqdm(
                total=sum(self.sizes), unit="B", unit_scale=True, desc="tokenize", dynamic_ncols=True
            )
        self.bar.update(self.before[file] + min(at, self.sizes[file]) - self.bar.n)
        rate = tokens / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def corpus_windows(corpus: Corpus, spec: CaptureSpec, vocab_size: int) -> Windows:
    """The windows ``spec`` (separator resolved) cuts from ``corpus``, checked against the model."""
    if corpus.cache.max_id >= vocab_size:
        raise BlockcapError(
            f"the tokenizer gives ids up to {corpus.cache.max_id} but the model's embedding has "
            f"{vocab_size} rows; the tokenizer does not belong to this model"
        )
    bos = None
    if spec.prepend_bos:
        bos = corpus.tokenizer.bos_id
        if bos is None:
            raise BlockcapError("prepend_bos=True: this tokenizer has no BOS token; drop prepend_bos")
    stream = corpus.stream(spec.separator or corpus.default_separator())
    span = split_range(len(stream), spec.split)
    windows = Windows(stream, spec.sample_len, spec.stride, span, spec.windows, bos)
    if len(windows) == 0:
        where = " within one document" if spec.windows == DOCUMENTS else ""
        raise BlockcapError(
            f"the {spec.split} split of {corpus.dataset} has {span[1] - span[0]} tokens, fewer than one "
            f"window{where} (sample_len={spec.sample_len}); use a smaller sample_len or a longer dataset"
        )
    return windows
