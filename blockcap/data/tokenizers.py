"""Tokenizers: the char GPT's character table and Hugging Face fast tokenizers, behind one interface.

Both encode documents in batches, and a document streamed in pieces (a text of several GB is
never one Python string) in linear time, and decode ids back to text. A store keeps what it needs
to decode without the model: the char vocabulary, or the fast tokenizer's ``tokenizer.json`` bytes.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from blockcap.core.errors import BlockcapError

WHOLE_CHARS = 4 << 20  # a streamed document up to this many characters is encoded by one call
STEP_CHARS = 2 << 20  # a longer one is encoded this many characters at a time, then cut
TAIL_CHARS = 4096  # a step is cut within this many characters of its end
MAX_CUT_TRIES = 16  # candidate cuts checked per step before a hard cut


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...  # ids are 0..vocab_size-1

    eos_id: int | None
    bos_id: int | None
    sha256: str  # identity: of tokenizer.json, or of the char vocabulary

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
    def encode_stream(self, pieces: Iterable[str]) -> Iterator[tuple[np.ndarray, bool]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def prefixes(self, ids: Sequence[int]) -> list[str]: ...
    def record(self) -> tuple[dict[str, Any], bytes | None]: ...


def _clean(offsets: list[tuple[int, int]], j: int) -> bool:
    """Whether tokens ``j - 1`` and ``j`` meet between two characters (not inside one's bytes)."""
    return offsets[j - 1][1] <= offsets[j][0] and offsets[j][0] > offsets[j - 1][0]


class CharTokenizer:
    """Maps characters to ids in the order of ``vocab`` (sorted unique characters, as the original)."""

    kind = "char"
    eos_id: int | None = None
    bos_id: int | None = None

    def __init__(self, vocab: str) -> None:
        if len(set(vocab)) != len(vocab):
            raise BlockcapError("vocabulary has repeated characters")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}
        codes = [ord(c) for c in vocab]
        self._table = np.full(max(codes, default=0) + 1, -1, np.int64)
        self._table[codes] = np.arange(len(vocab))
        self.sha256 = hashlib.sha256(vocab.encode("utf-8", "surrogatepass")).hexdigest()

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
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[tuple[np.ndarray, bool]]:
        """Ids of the text ``pieces`` make, a piece at a time (characters never interact: no cut is hard)."""
        for piece in pieces:
            yield self.encode(piece), False

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def prefixes(self, ids: Sequence[int]) -> list[str]:
        """The text of ``ids[:1]``, ``ids[:2]``, ... (every token is one character)."""
        return list(itertools.accumulate(self.vocab[i] for i in ids))

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

    Documents are encoded whole (``encode_batch``, on every core). A document streamed in pieces
    (a ``.txt`` file of any size) is buffered up to ``STREAM_CHARS`` characters, encoded, and cut
    near the buffer's end at a token boundary where encoding from the cut gives the same ids as
    the whole buffer did (a new pre-token, or a token after whitespace: up to ``MAX_CUT_TRIES``
    candidates); the rest is kept for the next buffer. That gives the ids of one ``encode`` of the
    whole document, in linear time. Where no candidate checks out (a stretch of ``STREAM_CHARS``
    without a word boundary: base64, DNA, one repeated character), the cut is *hard*: at a clean
    token boundary near the end, each side encoded on its own; ids may then differ from one
    whole-document call around the cut, and the cut is counted.
    """

    kind = "hf"

    def __init__(self, json_text: str, eos_id: int | None = None, bos_id: int | None = None) -> None:
        from tokenizers import Tokenizer as Backend

        try:
            self.backend = Backend.from_str(json_text)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise BlockcapError(f"tokenizer.json is not a readable fast tokenizer ({e})") from None
        self.json_text = json_text
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.sha256 = hashlib.sha256(json_text.encode()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids, encoded in parallel by the tokenizers library (offsets not computed)."""
        encs = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def _cut(self, buf: str) -> tuple[np.ndarray, int, bool]:
        """(ids of ``buf`` before a cut near its end, where the cut is, whether it checked out)."""
        enc = self.backend.encode(buf, add_special_tokens=False)
        ids, words, offsets = enc.ids, enc.word_ids, enc.offsets
        first = bisect.bisect_left([o[0] for o in offsets], len(buf) - TAIL_CHARS)
        clean = [j for j in range(max(first, 1), len(ids)) if _clean(offsets, j)]
        if not clean:  # no clean token boundary near the end: the last one anywhere
            clean = [next((j for j in range(first - 1, 0, -1) if _clean(offsets, j)), 0)]
            if not clean[0]:  # one token, or tokens all inside one character: the step whole
                return np.asarray(ids, dtype=np.int64), len(buf), False
        candidates = [
            j for j in clean
            if words[j] != words[j - 1] or buf[offsets[j][0] - 1].isspace() or buf[offsets[j][0]].isspace()
        ]  # fmt: skip
        for j in candidates[:MAX_CUT_TRIES]:
            start = offsets[j][0]
            if self.backend.encode(buf[start:], add_special_tokens=False).ids == ids[j:]:
                return np.asarray(ids[:j], dtype=np.int64), start, True
        j = clean[0]
        return np.asarray(ids[:j], dtype=np.int64), offsets[j][0], False

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[tuple[np.ndarray, bool]]:
        """Ids of the text ``pieces`` make, a step at a time, each with whether it ends at a hard cut
        (see the class docstring); memory holds one step, whatever the document's length."""
        it = iter(pieces)
        buf = ""
        for piece in it:
            buf += piece
            if len(buf) > WHOLE_CHARS:
                break
        else:
            yield self.encode(buf), False
            return
        for more in itertools.chain(it, [None]):
            buf += more or ""
            while len(buf) > (STEP_CHARS if more is None else 2 * STEP_CHARS):
                head, start, exact = self._cut(buf[:STEP_CHARS])
                yield head, not exact
                buf = buf[start:]
        yield self.encode(buf), False

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def prefixes(self, ids: Sequence[int]) -> list[str]:
        """The text of ``ids[:1]``, ``ids[:2]``, ... in one pass (the tokenizers library's streaming
        decoder): a token that ends inside a multi-byte character adds nothing until it completes."""
        from tokenizers.decoders import DecodeStream

        stream, text, out = DecodeStream(skip_special_tokens=False), "", []
        for i in ids:
            text += stream.step(self.backend, int(i)) or ""
            out.append(text)
        return out

    def record(self) -> tuple[dict[str, Any], bytes | None]:
        record = {"kind": self.kind, "eos_id": self.eos_id, "sha256": self.sha256}
        if self.bos_id is not None:
            record["bos_id"] = self.bos_id
        return record, self.json_text.encode()


def from_record(record: dict[str, Any], blob: bytes | None) -> Tokenizer:
    """The tokenizer a store recorded."""
    if record.get("kind") == "hf":
        if blob is None:
            raise BlockcapError("the store's tokenizer array is missing")
        return HFTokenizer(blob.decode(), record.get("eos_id"), record.get("bos_id"))
    return CharTokenizer(record.get("vocab", ""))
