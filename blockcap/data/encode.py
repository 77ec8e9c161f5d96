"""Encoding documents in order, in batches on every core, while the next batch is read.

Record documents (``.jsonl``, table rows) are gathered into batches of about ``BATCH_CHARS``
characters and encoded together by the tokenizer's batch call (the tokenizers library spreads a
batch over every core and releases the GIL, so a thread reading and parsing the next batch runs
beside it). A streamed ``.txt`` document is encoded by the tokenizer's linear streaming rule.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import cast

import numpy as np

from blockcap.core.errors import BlockcapError
from blockcap.data.records import Document, InputError
from blockcap.data.tokenizers import Tokenizer

BATCH_CHARS = 4 << 20  # characters of record documents encoded per batch call
BATCH_DOCS = 8192  # documents per batch call at most
_END = object()


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    """Record documents in batches; a streamed document alone."""
    batch: list[Document] = []
    size = 0
    for doc in docs:
        if doc.pieces is not None:
            if batch:
                yield batch
                batch, size = [], 0
            yield [doc]
            continue
        batch.append(doc)
        size += len(doc.text or "")
        if size >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _prefetched(batches: Iterator[list[Document]]) -> Iterator[list[Document]]:
    """``batches`` read one ahead on a thread (errors re-raised here, in order)."""
    box: queue.Queue[object] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for b in batches:
                if stop.is_set():
                    return
                box.put(b)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            box.put(e)
            return
        box.put(_END)

    thread = threading.Thread(target=read, name="blockcap-read", daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield cast(list[Document], item)
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting to hand over a batch
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _encode(
    tokenizer: Tokenizer, batch: list[Document], names: list[str]
) -> Iterator[tuple[Document, np.ndarray, bool]]:
    """A batch's ids (a streamed document's, a step at a time); an encoding error names the file
    and record of the document that caused it."""
    doc = batch[0]
    try:
        if doc.pieces is not None:
            for ids, hard in tokenizer.encode_stream(doc.pieces):
                yield doc, ids, hard
            return
        texts = [d.text or "" for d in batch]
        yield from ((d, ids, False) for d, ids in zip(batch, tokenizer.encode_batch(texts), strict=True))
    except InputError:  # a streamed document's file failed as it was read: it names itself
        raise
    except BlockcapError as e:
        for d in batch if len(batch) > 1 else []:
            try:
                tokenizer.encode(d.text or "")
            except BlockcapError:
                doc = d
                break
        where = f" row {doc.row}" if doc.pieces is None else ""
        raise BlockcapError(f"dataset file {names[doc.file]}{where}: {e}") from None


def encoded(
    tokenizer: Tokenizer,
    docs: Iterator[Document],
    progress: Callable[[int, int, int], None],
    names: list[str],
) -> Iterator[tuple[Document, np.ndarray, int]]:
    """(document, its token ids, hard cuts) for every document, in order.

    ``progress(file, at, tokens)`` is told after each batch how far into which input file reading
    got and how many tokens came out so far (a streamed document's pieces are read as it is
    encoded, so a lone huge file reports when done).
    """
    tokens = 0
    for batch in _prefetched(_batches(docs)):
        for doc, ids, hard in _encode(tokenizer, batch, names):
            tokens += ids.size
            yield doc, ids, hard
        progress(batch[-1].file, batch[-1].at, tokens)
