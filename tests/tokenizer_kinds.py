"""Tiny tokenizers of every kind blockcap streams, trained here on a synthetic corpus (no downloads).

* ``bytelevel``: GPT-2-style byte-level BPE;
* ``sentencepiece``: BPE with ``Metaspace(prepend_scheme="first", split=False)`` whose merges never
  cross a word start (as Llama 2, Mistral and Gemma conversions are);
* ``metaspace-spanning``: the same pre-tokenizer trained with ``split=False``, so merges span
  spaces (no place in a long text is a safe cut: the hard-cut rule's worst case);
* ``wordpiece``: BERT-style WordPiece with a lower-casing normalizer.
"""

from __future__ import annotations

import functools

import pytest

from blockcap.data.tokenizers import HFTokenizer
from tests.conftest import make_text

tokenizers = pytest.importorskip("tokenizers")
KINDS = ("bytelevel", "sentencepiece", "metaspace-spanning", "wordpiece")


@functools.cache
def tokenizer(kind: str) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    text = [make_text(30000, seed=3) + "héllo wörld 中文 ünïcödé\t tabs\n\n  spaces"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<eos>", "<bos>"], show_progress=False)  # fmt: skip
    elif kind in ("sentencepiece", "metaspace-spanning"):
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=kind == "sentencepiece")
        tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>", "<unk>"],
                                      show_progress=False)  # fmt: skip
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>", "[UNK]"],
                                            show_progress=False)  # fmt: skip
    tok.train_from_iterator(text, trainer)
    if kind.startswith(("sentence", "metaspace")):  # converted tokenizers do not split on spaces
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    return HFTokenizer(tok.to_str(), eos_id=0, bos_id=1)
