"""Tokenizers: the char GPT's character table and Hugging Face fast tokenizers, behind one interface.

Both encode text streamed in pieces (a text of several GB is never one Python string) and decode
ids back to text. A store keeps what it needs to decode without the model: the char vocabulary,
or the fast tokenizer's ``tokenizer.json`` bytes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from blockcap.core.errors import BlockcapError

PIECE_CHARS = 1 << 20  # characters encoded per call when streaming
TAIL_CHARS = 4096  # re-encoded with the next piece, so a cut falls on a word boundary


class Tokenizer(Protocol):
    kind: str
    vocab_size: int  # ids are 0..vocab_size-1
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...
    def encode_stream(self, pieces: Iterable[str]) -> np.ndarray: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def record(self) -> tuple[dict[str, Any], bytes | None]: ...


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class CharTokenizer:
    """Maps characters to ids in the order of ``vocab`` (sorted unique characters, as the original)."""

    kind = "char"
    eos_id = None

    def __init__(self, vocab: str) -> None:
        if len(set(vocab)) != len(vocab):
            raise BlockcapError("vocabulary has repeated characters")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}
        codes = [ord(c) for c in vocab]
        self._table = np.full(max(codes, default=0) + 1, -1, np.int64)
        self._table[codes] = np.arange(len(vocab))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as int64, via a code-point lookup table (fast on megabytes)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        inside = codes < len(self._table)
        ids = np.full(codes.shape, -1, np.int64)
        ids[inside] = self._table[codes[inside]]
        if (ids < 0).any():
            bad = chr(int(codes[np.argmax(ids < 0)]))
            raise BlockcapError(
                f"character {bad!r} is not in the model's vocabulary; "
                f"use a checkpoint trained on this text or remove the character"
            )
        return ids

    def encode_stream(self, pieces: Iterable[str]) -> np.ndarray:
        return _concat([self.encode(p) for p in pieces])

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def check_covers(self, text: str, what: str) -> None:
        """Raise naming the characters of ``text`` missing from the vocabulary."""
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            raise BlockcapError(
                f"{what} has {len(missing)} characters not in the model's vocabulary "
                f"({''.join(missing[:20])!r}); use weights trained on this dataset"
            )

    def record(self) -> tuple[dict[str, Any], bytes | None]:
        return {"kind": self.kind, "vocab": self.vocab}, None


class HFTokenizer:
    """A Hugging Face fast tokenizer (the ``tokenizers`` library), without special tokens added.

    Streaming cuts the text only where a new pre-token (word) starts, then re-encodes from there,
    so the ids equal one call on the whole text for the usual byte-level BPE tokenizers. Where
    they would not (a tokenizer that marks the start of every input), the piece is not cut.
    """

    kind = "hf"

    def __init__(self, json_text: str, eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer as Backend

        try:
            self.backend = Backend.from_str(json_text)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise BlockcapError(f"tokenizer.json is not a readable fast tokenizer ({e})") from None
        self.json_text = json_text
        self.eos_id = eos_id
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.sha256 = hashlib.sha256(json_text.encode()).hexdigest()
        self.cuttable = True

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def _head(self, buf: str) -> tuple[np.ndarray, int] | None:
        """Ids of ``buf`` up to the first word start in its last ``TAIL_CHARS``, and that start.

        None when there is no word start there, or when encoding from the cut does not give the
        same ids as encoding the whole buffer (then the caller keeps the text and cuts later).
        """
        enc = self.backend.encode(buf, add_special_tokens=False)
        ids, words, offsets = enc.ids, enc.word_ids, enc.offsets
        first = bisect.bisect_left([o[0] for o in offsets], len(buf) - TAIL_CHARS)
        for j in range(max(first, 1), len(ids)):
            if words[j] is not None and words[j] != words[j - 1]:
                start = offsets[j][0]
                if self.backend.encode(buf[start:], add_special_tokens=False).ids != ids[j:]:
                    self.cuttable = False  # a property of the tokenizer: stop trying
                    return None
                return np.asarray(ids[:j], dtype=np.int64), start
        return None

    def encode_stream(self, pieces: Iterable[str]) -> np.ndarray:
        out, buf = [], ""
        for piece in pieces:
            buf += piece
            if self.cuttable and len(buf) >= 2 * PIECE_CHARS:
                head = self._head(buf)
                if head is not None:
                    out.append(head[0])
                    buf = buf[head[1] :]
        out.append(self.encode(buf))
        return _concat(out)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def record(self) -> tuple[dict[str, Any], bytes | None]:
        return {"kind": self.kind, "eos_id": self.eos_id, "sha256": self.sha256}, self.json_text.encode()


def from_record(record: dict[str, Any], blob: bytes | None) -> Tokenizer:
    """The tokenizer a store recorded."""
    if record.get("kind") == "hf":
        if blob is None:
            raise BlockcapError("the store's tokenizer array is missing")
        return HFTokenizer(blob.decode(), record.get("eos_id"))
    return CharTokenizer(record.get("vocab", ""))
