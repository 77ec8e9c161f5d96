"""Encoding: every document's ids are the tokenizer's own ``encode(document)``; streamed documents
longer than the whole-document limit follow the linear cut rule (exact where the tokenizer's own
encoding checks out; hard cuts counted where it cannot)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from blockcap.data import tokenizers as T
from blockcap.data.encode import encoded
from blockcap.data.records import Document
from blockcap.data.tokenizers import CharTokenizer
from tests.conftest import make_text
from tests.tokenizer_kinds import KINDS, tokenizer


def streamed(tok, pieces) -> tuple[np.ndarray, int]:
    """A streamed document's ids, whole, and its hard cuts."""
    parts = list(tok.encode_stream(pieces))
    return np.concatenate([ids for ids, _ in parts]), sum(hard for _, hard in parts)


def documents(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    text = make_text(40000, seed=seed) + " héllo wörld 中文\t\t x  y\n\n"
    out = ["", " ", "\n", "a", "中", "  leading spaces", "trailing spaces  "]
    while len(out) < n:
        a = rng.randrange(len(text))
        out.append(text[a : a + rng.choice([1, 7, 60, 900, 5000])])
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_batched_documents_are_their_own_encoding(kind):
    tok = tokenizer(kind)
    docs = documents(1, 120)
    stream = (Document(0, i, d) for i, d in enumerate(docs))
    got = list(encoded(tok, stream, lambda *a: None, ["docs"]))
    assert [r.row for r, _, _ in got] == list(range(len(docs)))
    for (_, ids, hard), d in zip(got, docs, strict=True):
        assert not hard and ids.tolist() == tok.encode(d).tolist()


@pytest.fixture
def small_limits(monkeypatch):
    """The streaming rule at a size a test can afford: whole up to 60 K characters, steps of 20 K."""
    monkeypatch.setattr(T, "WHOLE_CHARS", 60_000)
    monkeypatch.setattr(T, "STEP_CHARS", 20_000)
    monkeypatch.setattr(T, "TAIL_CHARS", 500)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_documents_up_to_the_limit_are_one_call(kind, small_limits):
    tok = tokenizer(kind)
    doc = make_text(59_000, seed=5)
    ids, hard = streamed(tok, (doc[i : i + 7000] for i in range(0, len(doc), 7000)))
    assert hard == 0 and ids.tolist() == tok.encode(doc).tolist()


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece", "wordpiece"])
def test_long_documents_are_cut_where_the_encoding_checks_out(kind, small_limits):
    tok = tokenizer(kind)
    rng = random.Random(kind)
    for trial in range(6):
        doc = make_text(rng.randrange(60_001, 150_000), seed=trial)
        if trial % 2:
            doc = doc.replace("\n", " é中 ")
        ids, hard = streamed(tok, (doc[i : i + 7000] for i in range(0, len(doc), 7000)))
        assert hard == 0 and ids.tolist() == tok.encode(doc).tolist(), trial


@pytest.mark.parametrize("kind", KINDS)
def test_text_without_boundaries_takes_hard_cuts_and_keeps_every_character(kind, small_limits):
    tok = tokenizer(kind)
    doc = "ab" * 75_000  # one 150 K-character "word"
    ids, hard = streamed(tok, (doc[i : i + 7000] for i in range(0, len(doc), 7000)))
    assert hard >= 5  # one a step: 150 K / 20 K, less the last
    if kind != "wordpiece":  # WordPiece maps an over-long word to [UNK]: nothing to compare
        assert tok.decode(ids.tolist()).replace(" ", "") == doc


def test_spanning_merges_are_hard_cuts_not_silent_mismatches(small_limits):
    tok = tokenizer("metaspace-spanning")
    doc = make_text(100_000, seed=9)
    ids, hard = streamed(tok, (doc[i : i + 7000] for i in range(0, len(doc), 7000)))
    assert hard > 0 or ids.tolist() == tok.encode(doc).tolist()


def test_char_tokenizer_streams_exactly():
    text = make_text(30_000)
    tok = CharTokenizer.from_text(text)
    ids, hard = streamed(tok, (text[i : i + 999] for i in range(0, len(text), 999)))
    assert hard == 0 and np.array_equal(ids, tok.encode(text))


class _Counting:
    """A tokenizer backend that counts the characters it is asked to encode."""

    def __init__(self, backend) -> None:
        self.backend, self.chars = backend, 0

    def encode(self, text, **kw):
        self.chars += len(text)
        return self.backend.encode(text, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("doc", ["words", "one word"])
def test_streaming_work_is_linear(kind, doc, small_limits, monkeypatch):
    """Characters encoded grow linearly with the document (the old rule re-encoded the whole buffer
    for every piece when it found no cut: quadratic), whatever the text and tokenizer."""
    tok = tokenizer(kind)
    counter = _Counting(tok.backend)
    monkeypatch.setattr(tok, "backend", counter)
    work = []
    for n in (200_000, 800_000):
        text = make_text(n, seed=2) if doc == "words" else "ab" * (n // 2)
        counter.chars = 0
        streamed(tok, (text[i : i + 7000] for i in range(0, n, 7000)))
        work.append(counter.chars / n)
    assert max(work) < 1.5 and work[1] < 1.2 * work[0], work


@pytest.mark.parametrize("kind", KINDS)
def test_prefixes_decode_every_prefix_in_one_pass(kind):
    tok = tokenizer(kind)
    text = "the king, my lord; héllo 中文 wörld"
    ids = tok.encode(text).tolist()
    prefixes = tok.prefixes(ids)
    assert len(prefixes) == len(ids) and prefixes[-1] == tok.decode(ids)
    for p, got in enumerate(prefixes):
        whole = tok.decode(ids[: p + 1])
        assert got == whole or ("\ufffd" in whole and whole.startswith(got)), (p, got, whole)
