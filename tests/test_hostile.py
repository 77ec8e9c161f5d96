"""Hostile stores and inputs: a store handed over by someone else can neither reach outside itself
nor make wrong data pass for right; pins and resume cannot be fooled by a file swapped in place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import zarr

import blockcap
from blockcap.analysis.verify import ROOT_NOT_CONFIRMED
from blockcap.cli import main
from blockcap.core.errors import BlockcapError
from blockcap.data.digest import cache_dir, sha256_file
from blockcap.storage.codecs import digest
from blockcap.storage.integrity import DamagedError
from blockcap.storage.location import Location, check_key
from tests import crashkit

ROOT_SAYS = "root document zarr.json does not match the store's commit records"


@pytest.fixture
def store(run_args) -> Path:
    blockcap.run(**{**run_args, "chunk_windows": 16})
    return Path(run_args["out"])


def edit_root(store: Path, **changes) -> None:
    """Change fields of the root's ``blockcap`` attribute by hand (``dims.x`` for a nested one)."""
    path = store / "zarr.json"
    doc = json.loads(path.read_text())
    meta = doc["attributes"]["blockcap"]
    for name, value in changes.items():
        *outer, last = name.split(".")
        target = meta
        for part in outer:
            target = target[part]
        target[last] = value
    path.write_text(json.dumps(doc))


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err.strip()


# --- keys confined ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["relative", "absolute", "nested"])
def test_a_store_cannot_make_verify_read_or_delete_a_file_outside_it(store, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    key = {"relative": "../victim.txt", "absolute": str(victim),
           "nested": "block0/stats/ffwd_output/mean/c/../../../../../../victim.txt"}[name]  # fmt: skip
    digests = json.loads((store / "zarr.json").read_text())["attributes"]["blockcap"]["digests"]
    edit_root(store, digests={**digests, key: 12345})
    problems = blockcap.verify(store)
    assert any("names an object" in p and "not one of the store's" in p for p in problems), problems
    blockcap.verify(store, repair=True)
    assert victim.read_text() == "precious"


def test_a_symbolic_link_inside_a_store_never_leads_a_delete_out_of_it(store, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(store / "block0/ffwd_output/c", outside)
    chunk = outside / "0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    shutil.rmtree(store / "block0/ffwd_output/c")
    (store / "block0/ffwd_output/c").symlink_to(outside)
    assert any("differs from what was committed" in p for p in blockcap.verify(store))
    with pytest.raises(BlockcapError, match="leads outside the store"):
        blockcap.verify(store, repair=True)
    assert chunk.read_bytes() == bytes(data)


@pytest.mark.parametrize(
    "key", ["../x", "/etc/passwd", "a/../../x", "a//b", ".hidden", "a\\b", "a\x00b", "~/x"]
)
def test_a_key_outside_the_store_is_refused_before_any_access(tmp_path, key):
    loc = Location(str(tmp_path / "s.zarr"))
    with pytest.raises(BlockcapError, match="not a name inside a store"):
        check_key(key)
    for op in (lambda: loc.get(key), lambda: loc.put(key, b"x"), lambda: loc.delete(key)):
        with pytest.raises(BlockcapError, match="not a name inside a store"):
            op()
    assert not (tmp_path / "x").exists()


# --- the root: authenticated, bounded, checked ----------------------------------------------------------
def test_a_huge_window_count_is_refused_without_allocating_and_repair_changes_nothing(store, capsys):
    edit_root(store, n_windows=2**40)
    before = snapshot(store)
    t0 = time.perf_counter()
    assert ROOT_NOT_CONFIRMED in blockcap.verify(store)
    assert ROOT_NOT_CONFIRMED in blockcap.verify(store, repair=True)
    assert cli(["info", str(store)], capsys)[0] == 0  # counts the records present, not the root's claim
    assert time.perf_counter() - t0 < 60
    assert snapshot(store) == before
    with pytest.raises(DamagedError, match="commit record of another store"):
        blockcap.open_store(store).site("ffwd_output")[0]


def test_a_lowered_window_count_hides_nothing_and_the_capture_rebuilds_the_root(store, run_args):
    want = crashkit.files(store)
    n = json.loads((store / "zarr.json").read_text())["attributes"]["blockcap"]["n_windows"]
    edit_root(store, n_windows=n - 16)
    before = snapshot(store)
    assert ROOT_NOT_CONFIRMED in blockcap.verify(store, repair=True)
    assert snapshot(store) == before  # not one array document rewritten from the edited root
    summary = blockcap.run(**{**run_args, "chunk_windows": 16})  # the command that made it
    assert summary.status.startswith("resumed") and summary.windows_computed == 0
    assert crashkit.files(store) == want and blockcap.verify(store) == []


def test_a_reversed_vocabulary_does_not_pass_verify(store):
    vocab = json.loads((store / "zarr.json").read_text())["attributes"]["blockcap"]["tokenizer"]["vocab"]
    edit_root(store, **{"tokenizer.vocab": vocab[::-1]})
    assert ROOT_NOT_CONFIRMED in blockcap.verify(store)
    with pytest.raises(DamagedError, match="another store"):
        blockcap.open_store(store).text(0)


@pytest.mark.parametrize("digests", ["emptied", "recomputed"])
def test_statistics_rewritten_through_plain_zarr_do_not_pass_verify(store, run_args, digests):
    want = crashkit.files(store)
    g = zarr.open_group(str(store), mode="r+")
    g["block0/stats/ffwd_output/mean"][:] = 0.5
    meta = json.loads((store / "zarr.json").read_text())["attributes"]["blockcap"]
    new = {k: digest((store / k).read_bytes()) for k in meta["digests"]} if digests == "recomputed" else {}
    edit_root(store, digests=new)
    problems = blockcap.verify(store)
    expect = (
        "lacks the digests" if digests == "emptied" else "differ from the merge of the committed partials"
    )
    assert any(expect in p for p in problems), problems
    if digests == "emptied":
        with pytest.raises(DamagedError, match="no digest for its object"):
            blockcap.open_store(store).stats("ffwd_output")
        return
    blockcap.verify(store, repair=True)
    assert blockcap.run(**{**run_args, "chunk_windows": 16}).status == "resumed and completed"
    assert crashkit.files(store) == want and blockcap.verify(store) == []


@pytest.mark.parametrize(
    "field, value",
    [("n_windows", "abc"), ("n_windows", -5), ("n_windows", 2**60), ("dims.d_model", "32"),
     ("dims.n_head", -1), ("dims.d_model", 2**40), ("tokenizer_bytes", 2**50), ("dims", None),
     ("params", []), ("digests", {"x": "y"}), ("state", 7)],
)  # fmt: skip
def test_odd_values_in_the_root_are_one_line(store, field, value, capsys):
    edit_root(store, **{field: value})
    before = snapshot(store)
    problems = blockcap.verify(store)
    assert problems and all("\n" not in p for p in problems)
    code, err = cli(["verify", str(store), "--repair"], capsys)
    assert code == 1 and "Traceback" not in err
    code, err = cli(["info", str(store)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "damaged" in err, err
    assert snapshot(store) == before


def _returns_within(fn, seconds: float):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"did not return within {seconds} s"
    return out[0]


@pytest.mark.parametrize("kind", ["fifo", "device", "missing"])
def test_verify_never_reads_a_device_or_fifo_that_the_store_names(store, tmp_path, kind):
    path = {"fifo": tmp_path / "fifo", "device": Path("/dev/zero"), "missing": tmp_path / "none"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    edit_root(store, **{"dataset.path": str(path)})
    assert _returns_within(lambda: blockcap.verify(store), 60) == []


def test_verify_checks_tokens_against_the_dataset_the_user_names(store, text_file, tmp_path):
    edit_root(store, **{"dataset.path": str(tmp_path / "moved.txt")})
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    store_sha = json.loads((store / "zarr.json").read_text())["attributes"]["blockcap"]["params"]
    assert store_sha["dataset_sha256"] == sha256_file(text_file)
    assert blockcap.verify(store, dataset=str(text_file)) == []
    with pytest.raises(BlockcapError, match="is not a file or directory"):
        blockcap.verify(store, dataset="/dev/zero")


# --- identity by content ------------------------------------------------------------------------------
def swap_keeping_size_and_mtime(path: Path, text: str) -> None:
    """Replace ``path``'s content by ``text`` (same length) and restore its mtime, as ``cp -p`` does."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def dataset(text_file, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "d.txt"
    path.write_text(text_file.read_text())
    return path


def test_a_same_size_swap_with_the_old_mtime_is_hashed_anew(dataset):
    old = sha256_file(dataset)  # remembered
    swap_keeping_size_and_mtime(dataset, dataset.read_text()[::-1])
    assert sha256_file(dataset) == hashlib.sha256(dataset.read_bytes()).hexdigest() != old


def test_a_cache_entry_blockcap_did_not_make_vouches_for_nothing(dataset, tmp_path, monkeypatch):
    true = sha256_file(dataset)
    cache = cache_dir() / "sha256.json"
    known = json.loads(cache.read_text())
    entry = known[str(dataset.resolve())]
    known[str(dataset.resolve())] = [entry[0], "0" * 64, entry[2]]  # a forged digest, the old MAC
    cache.write_text(json.dumps(known))
    assert sha256_file(dataset) == true
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-user"))  # a cache copied from elsewhere
    (tmp_path / "other-user").mkdir()
    shutil.copytree(cache.parent, tmp_path / "other-user" / "blockcap")
    (tmp_path / "other-user/blockcap/sha256.key").write_bytes(os.urandom(32))
    known[str(dataset.resolve())] = [entry[0], "0" * 64, entry[2]]
    (tmp_path / "other-user/blockcap/sha256.json").write_text(json.dumps(known))
    assert sha256_file(dataset) == true


def test_a_pinned_dataset_swapped_in_place_is_refused(run_args, dataset, tmp_path):
    pin = sha256_file(dataset)
    blockcap.run(**{**run_args, "dataset": str(dataset), "dataset_sha256": pin})
    swap_keeping_size_and_mtime(dataset, dataset.read_text()[::-1])
    with pytest.raises(BlockcapError, match=f"expected {pin}"):
        blockcap.run(
            **{**run_args, "dataset": str(dataset), "dataset_sha256": pin, "out": str(tmp_path / "b")}
        )


def test_resuming_over_a_changed_dataset_is_refused_in_one_line(run_args, dataset, capsys):
    args = {**run_args, "dataset": str(dataset)}
    blockcap.run(**args)
    edit_root(Path(args["out"]), state="incomplete")  # as if interrupted
    before = snapshot(Path(args["out"]))
    swap_keeping_size_and_mtime(dataset, dataset.read_text()[::-1])
    code, err = cli(["run", *(f"--{k}={v}" for k, v in args.items())], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "was started on other dataset (dataset_sha256" in err and "restore them to resume" in err
    assert snapshot(Path(args["out"])) == before


@pytest.mark.parametrize("change", [+8, -8])
def test_a_format_2_root_is_not_trusted_over_its_array_documents(tmp_path, change):
    """Format 2's tag covers the parameters only: a window count edited there is reported, and
    repair rewrites no array document from it (nor deletes the records beyond it)."""
    store = tmp_path / "v2.zarr"
    shutil.copytree(Path(__file__).parent / "data" / "store-v2", store)
    n = json.loads((store / "zarr.json").read_text())["attributes"]["blockcap"]["n_windows"]
    edit_root(store, n_windows=n + change)
    before = snapshot(store)
    problems = blockcap.verify(store, repair=True, check_dataset=False)
    assert any("not trusted over them" in p for p in problems), problems
    if change < 0:
        assert any("name no unit of the root's" in p for p in problems), problems
    assert snapshot(store) == before


def test_hashing_many_files_reads_and_writes_the_digest_cache_once(dataset, tmp_path, monkeypatch):
    from blockcap.data import digest as digest_module

    paths = [tmp_path / "many" / f"{i}.txt" for i in range(300)]
    paths[0].parent.mkdir()
    for i, p in enumerate(paths):
        p.write_text(f"file {i}\n")
    sha256_file(dataset)  # a cache file to read
    calls = {"_load": 0, "_save": 0}

    def counted(name):
        real = getattr(digest_module, name)

        def call(*a):
            calls[name] += 1
            return real(*a)

        return call

    for name in calls:
        monkeypatch.setattr(digest_module, name, counted(name))
    want = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert digest_module.sha256_files(paths) == want and calls == {"_load": 1, "_save": 1}
    assert digest_module.sha256_files(paths) == want and calls == {"_load": 2, "_save": 1}  # all known
    assert len(json.loads((cache_dir() / "sha256.json").read_text())) == 301


def test_the_digest_cache_keeps_the_digests_used_last(dataset, tmp_path, monkeypatch):
    from blockcap.data import digest as digest_module

    monkeypatch.setattr(digest_module, "MAX_ENTRIES", 50)
    paths = [tmp_path / f"{i}.txt" for i in range(120)]
    for i, p in enumerate(paths):
        p.write_text(f"file {i}\n")
    digest_module.sha256_files(paths[:100])
    digest_module.sha256_files([paths[10], *paths[100:]])  # one old digest used again, 20 new ones
    kept = list(json.loads((cache_dir() / "sha256.json").read_text()))
    assert kept == [str(p.resolve()) for p in [*paths[71:100], paths[10], *paths[100:]]]
