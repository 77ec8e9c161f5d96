"""The token cache: built once per dataset content and tokenizer, reused by every later run, never
used half-built, and keyed so that any change of content or tokenizer gives a new cache."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import blockcap
from blockcap.analysis.reader import IncompleteStoreWarning, open_store
from blockcap.analysis.tokens import TOKENS_NOT_CHECKED
from blockcap.cli import cli_words, main
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


def test_verify_lists_and_digests_the_dataset_once(run_args, root, monkeypatch):
    """A remote listing is round trips: verify lists the dataset once and reads its tokens from the
    cache the run built (no tokenizing)."""
    import blockcap.analysis.tokens as tokens_module
    import blockcap.data.corpus as corpus_module

    blockcap.run(**run_args)
    listed, built = [], []
    counted = lambda *a, **k: listed.append(a) or list_inputs(*a, **k)  # noqa: E731
    monkeypatch.setattr(tokens_module, "list_inputs", counted)
    monkeypatch.setattr(corpus_module, "list_inputs", counted)
    monkeypatch.setattr(cache_module, "_write", lambda *a, **k: built.append(a))
    assert blockcap.verify(run_args["out"]) == []
    assert len(listed) == 1 and built == []


def test_verify_with_dataset_options_that_cannot_list_it_names_the_problem(run_args, root, tmp_path):
    """Options given on purpose make a dataset that cannot be listed a problem, not a dataset gone
    (wrong credentials or endpoint look the same as a deleted object to the lister)."""
    fs = pytest.importorskip("fsspec").filesystem("memory")
    fs.pipe(f"/{tmp_path.name}/corpus.txt", Path(run_args["dataset"]).read_bytes())
    blockcap.run(**{**run_args, "dataset": f"memory://{tmp_path.name}/corpus.txt"})
    assert blockcap.verify(run_args["out"], dataset_storage_options={"anon": False}) == []  # checked
    fs.rm(f"/{tmp_path.name}", recursive=True)
    assert blockcap.verify(run_args["out"]) == []  # gone: a store may outlive its dataset
    problems = blockcap.verify(run_args["out"], dataset_storage_options={"anon": False})
    assert len(problems) == 1 and problems[0].startswith(TOKENS_NOT_CHECKED), problems
    with pytest.raises(BlockcapError, match="is not a file or directory"):
        blockcap.verify(run_args["out"], dataset="file://")  # not the working directory


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


def small_cache(tmp_path: Path, root: Path, n_chars: int = 5000):
    f = tmp_path / "d.txt"
    f.write_text(make_text(n_chars))
    files, tok = list_inputs(str(f)), CharTokenizer.from_text(f.read_text())
    return files, tok, build_cache(files, tok, None, root)


def whole(c, tok, files) -> bool:
    return np.array_equal(c.ids(0, c.n_tokens), tok.encode(Path(files[0].path).read_text()))


EDITS = {
    "fewer tokens": lambda m: {**m, "n_tokens": m["n_tokens"] - 1},
    "more tokens": lambda m: {**m, "n_tokens": m["n_tokens"] + 1},
    "no documents": lambda m: {**m, "n_documents": 0},
    "five documents": lambda m: {**m, "n_documents": 5},
    "no chunk files": lambda m: {**m, "ids": []},
    "a shorter chunk": lambda m: {**m, "ids": [{**m["ids"][0], "rows": 10}], "n_tokens": 10},
}


@pytest.mark.parametrize("resealed", [False, True], ids=["edited", "edited and resealed"])
@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_meta_json_is_a_damaged_cache_built_again(tmp_path, root, edit, resealed):
    files, tok, c = small_cache(tmp_path, root)
    path = c.directory / "meta.json"
    meta = EDITS[edit](json.loads(path.read_text()))
    if resealed:  # its sha256 recomputed: the chunk files still disagree with it
        meta.pop("sha256")
        meta["sha256"] = cache_module._seal(meta)
    path.write_text(json.dumps(meta))
    assert open_cache(root, c.key) is None
    again = build_cache(files, tok, None, root)
    assert again.n_tokens == c.n_tokens and again.n_documents == 1 and whole(again, tok, files)


def test_a_run_over_an_edited_cache_captures_every_window(run_args, root, tmp_path, capsys):
    blockcap.run(**run_args)
    (key,) = committed(root)
    path = root / key / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "n_tokens": meta["n_tokens"] // 2}))
    other = str(tmp_path / "other.zarr")
    blockcap.run(**{**run_args, "out": other})
    assert "is damaged (meta.json does not match its sha256" in capsys.readouterr().err
    assert open_store(other).n_windows == open_store(run_args["out"]).n_windows


@pytest.mark.parametrize(("damage", "chunk"), [("flip", 0), ("flip", -1), ("cut", 2), ("cut", -1)])
def test_a_damaged_chunk_file_is_found_at_open_and_built_again(tmp_path, root, monkeypatch, damage, chunk):
    monkeypatch.setattr(cache_module, "CHUNK_TOKENS", 1024)  # five chunk files
    files, tok, c = small_cache(tmp_path, root)
    path = c.directory / "ids" / c.meta["ids"][chunk]["file"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data if damage == "flip" else data[:-1]))
    assert len(c.meta["ids"]) == 5 and open_cache(root, c.key) is None
    assert whole(build_cache(files, tok, None, root), tok, files)


def flags(args: dict) -> list[str]:
    return ["run", *(f"--{k}={v}" for k, v in args.items())]


def cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err.strip()


def test_a_byte_flipped_deep_in_a_large_cache_stops_the_run_in_one_line(
    run_args, root, tmp_path, capsys, monkeypatch
):
    """Only the first and last chunk files are read when a cache opens: a flipped byte in another
    one is found when a run first reads it, which keeps what it committed and says what to do."""
    monkeypatch.setattr(cache_module, "CHUNK_TOKENS", 512)  # twelve chunk files
    args = {**run_args, "split": "all", "stride": 40, "chunk_windows": 16, "writers": 1}
    blockcap.run(**args)
    (key,) = committed(root)
    path = root / key / "ids" / "00006.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    args["out"] = str(tmp_path / "other.zarr")
    code, err = cli(flags(args), capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{path} is damaged (its checksum fails); delete {root / key} and re-run" in err
    with pytest.warns(IncompleteStoreWarning, match="units committed"):
        done = open_store(args["out"]).committed_windows()
    assert 0 < done.sum() < done.size


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
        said = waiter.stderr.readline()  # it waits for the builder (it cannot finish before)
        assert "waiting for another process" in said and waiter.poll() is None, said
        built = cache_module._build_locked(root, key, files, tok, None, None, None)
        inode = built.directory.stat().st_ino
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and out.split() == [key, "2000"], err
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


def test_a_read_only_cache_directory_serves_its_caches_and_names_the_fix(tmp_path, root, monkeypatch):
    files, tok, c = small_cache(tmp_path, root)
    real_open = os.open

    def read_only(path, flags, *a, **kw):  # root cannot create a file in a chmod-ed directory
        if str(path).startswith(str(root)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    assert build_cache(files, tok, None, root).key == c.key  # committed: read without a lock
    with pytest.raises(BlockcapError) as exc:
        build_cache(files, CharTokenizer(tok.vocab + "#"), None, root)  # not there: built under the lock
    message = str(exc.value)
    assert re.fullmatch(
        rf"cannot create [0-9a-f]{{32}}\.lock in the token cache directory {re.escape(str(root))} "
        rf"\(Read-only file system\); pass token_cache=A_WRITABLE_DIR or set {CACHE_ENV}",
        message,
    ), message
    assert "--token_cache=A_WRITABLE_DIR" in cli_words(message)


def test_no_lock_file_outlives_a_build_and_a_failed_build_leaves_no_directory(tmp_path):
    root = tmp_path / "made" / "tokens"
    files, tok, c = small_cache(tmp_path, root)
    assert [p.name for p in root.iterdir()] == [c.key]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fresh = tmp_path / "fresh" / "tokens"
    with pytest.raises(BlockcapError, match="is empty"):
        build_cache(list_inputs(str(empty)), tok, None, fresh)
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(BlockcapError, match="is empty"):  # a directory that was there stays
        build_cache(list_inputs(str(empty)), tok, None, root)
    assert [p.name for p in root.iterdir()] == [c.key]


def test_the_lock_excludes_while_its_file_comes_and_goes(tmp_path):
    """Holders delete the lock file: a process that waited on a deleted one locks the new file."""
    path, inside, most = tmp_path / "k.lock", [0], [0]

    def work() -> None:
        for _ in range(100):
            with cache_module._Lock(path):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and not path.exists()
