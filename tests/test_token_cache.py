"""The token cache: built once per dataset content and tokenizer, reused by every later run, never
used half-built, and keyed so that any change of content or tokenizer gives a new cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import blockcap
from blockcap.core.errors import BlockcapError
from blockcap.data import cache as cache_module
from blockcap.data.cache import CACHE_ENV, build_cache, cache_key, open_cache
from blockcap.data.corpus import open_corpus
from blockcap.data.inputs import list_inputs
from blockcap.data.tokenizers import CharTokenizer
from tests.conftest import make_text


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "tokens"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def committed(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_a_second_run_tokenizes_nothing(run_args, root, tmp_path, monkeypatch):
    blockcap.run(**run_args)
    first = committed(root)
    calls = []
    monkeypatch.setattr(cache_module, "_write", lambda *a, **k: calls.append(a))
    for i, (blocks, sites) in enumerate([("1", "ffwd_output"), ("0,2", "all")]):
        blockcap.run(
            **{**run_args, "out": str(tmp_path / f"other{i}.zarr"), "block_idx": blocks, "sites": sites}
        )
    assert calls == [] and committed(root) == first and len(first) == 1


def test_any_change_of_content_or_tokenizer_is_a_new_key(tmp_path):
    f = tmp_path / "d.txt"
    text = make_text(3000)
    f.write_text(text)
    tok = CharTokenizer.from_text(text + "#")
    key = cache_key(list_inputs(str(f)), tok, None)
    assert cache_key(list_inputs(str(f)), CharTokenizer.from_text(text + "%"), None) != key
    table = tmp_path / "d.jsonl"
    table.write_text(json.dumps({"text": text, "body": text + "!"}) + "\n")
    assert cache_key(list_inputs(str(table)), tok, "body") != cache_key(list_inputs(str(table)), tok, None)
    assert cache_key(list_inputs(str(table)), tok, "text") == cache_key(list_inputs(str(table)), tok, None)
    st = f.stat()
    f.write_text(text[:-1] + ("#" if text[-1] != "#" else "x"))  # same size, one byte changed
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the modification time restored (cp -p)
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert cache_key(list_inputs(str(f)), tok, None) != key


def test_the_cache_holds_each_documents_ids(tmp_path, root):
    docs = [make_text(n, seed=n) for n in (5, 900, 1, 40000)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = CharTokenizer.from_text("".join(docs))
    monkeypatch_chunks = pytest.MonkeyPatch()
    monkeypatch_chunks.setattr(cache_module, "CHUNK_TOKENS", 4096)  # several chunk files
    monkeypatch_chunks.setattr(cache_module, "DOC_CHUNK", 2)
    try:
        c = build_cache(list_inputs(str(f)), tok, None, root)
    finally:
        monkeypatch_chunks.undo()
    assert c.n_documents == 4 and c.n_tokens == sum(map(len, docs)) and c.dtype == np.uint8
    assert len(c.meta["ids"]) > 1 and len(c.meta["docs"]) == 2
    starts = c.docs(0, 4)[:, 0]
    for k, d in enumerate(docs):
        end = starts[k + 1] if k + 1 < 4 else c.n_tokens
        assert np.array_equal(c.ids(int(starts[k]), int(end)), tok.encode(d))


def test_a_damaged_cache_is_refused_or_rebuilt(tmp_path, root):
    f = tmp_path / "d.txt"
    f.write_text(make_text(5000))
    files, tok = list_inputs(str(f)), CharTokenizer.from_text(f.read_text())
    c = build_cache(files, tok, None, root)
    chunk = c.directory / "ids" / c.meta["ids"][0]["file"]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(BlockcapError, match="damaged .*checksum fails.*delete"):
        open_cache(root, c.key).ids(0, 10)
    chunk.unlink()  # a missing file: not a cache at all, built again
    rebuilt = build_cache(files, tok, None, root)
    assert np.array_equal(rebuilt.ids(0, rebuilt.n_tokens), tok.encode(f.read_text()))


def build_in_a_process(f: Path, vocab: str, root: Path) -> subprocess.Popen:
    code = (
        "import sys; from pathlib import Path; from blockcap.data.cache import build_cache\n"
        "from blockcap.data.inputs import list_inputs; from blockcap.data.tokenizers import CharTokenizer\n"
        "c = build_cache(list_inputs(sys.argv[1]), CharTokenizer(sys.argv[2]), None, Path(sys.argv[3]))\n"
        "print(c.key, c.n_tokens)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-c", code, str(f), vocab, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def test_processes_wanting_one_cache_wait_for_a_single_builder(tmp_path, root):
    f = tmp_path / "d.txt"
    f.write_text(make_text(2000))
    files, tok = list_inputs(str(f)), CharTokenizer.from_text(f.read_text())
    key = cache_key(files, tok, None)
    root.mkdir()
    with cache_module._Lock(root / f"{key}.lock"):  # this process builds; another one wants the cache
        waiter = build_in_a_process(f, tok.vocab, root)
        time.sleep(3)
        assert waiter.poll() is None  # it waits for the builder
        built = cache_module._build_locked(root, key, files, tok, None, None, None)
        inode = built.directory.stat().st_ino
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and out.split() == [key, "2000"], err
    assert "waiting for another process" in err
    assert (root / key).stat().st_ino == inode  # used, not built again


@pytest.mark.slow
@pytest.mark.parametrize("after", [0.5, 1.5, 3.0])
def test_a_build_killed_at_any_moment_leaves_nothing_used(tmp_path, root, after):
    f = tmp_path / "big.jsonl"
    f.write_text("".join(json.dumps({"text": make_text(2000, seed=i)}) + "\n" for i in range(3000)))
    tok = CharTokenizer.from_text(make_text(100000))
    proc = build_in_a_process(f, tok.vocab, root)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = list_inputs(str(f))
    key = cache_key(files, tok, None)
    found = open_cache(root, key)
    if found is not None:  # the build finished before the kill: then it is whole
        assert found.n_documents == 3000
    c = build_cache(files, tok, None, root)  # a later run: stale staging cleared, cache whole
    assert c.n_documents == 3000 and not list(root.glob(".*.building"))
    assert np.array_equal(c.ids(0, 2000), tok.encode(make_text(2000, seed=0)))


def test_the_cache_directory_option_and_bad_places(tmp_path, ckpt, run_args):
    where = tmp_path / "elsewhere"
    blockcap.run(**{**run_args, "token_cache": str(where)})
    assert len(committed(where)) == 1
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(BlockcapError, match="cannot create the token cache directory"):
        open_corpus(
            run_args["dataset"], CharTokenizer.from_text(make_text()), token_cache=str(blocked / "sub")
        )
