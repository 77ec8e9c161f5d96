"""Crash safety, resume, integrity checks and bad input that loses nothing."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import blockcap
from blockcap.analysis.reader import IncompleteStoreWarning
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import object_key
from tests import crashkit

ROOT = Path(__file__).resolve().parent.parent
UNIT_WRITES = 9  # tokens, offsets, three sites, three statistics partials, one commit record


@pytest.fixture(scope="module")
def crash_base(ckpt, text_file) -> list[str]:
    return [
        "run",
        f"--weights={ckpt}",
        f"--dataset={text_file}",
        "--split=all",
        "--sample_len=16",
        "--stride=6",
        "--batch_size=16",
        "--chunk_windows=32",
        "--block_idx=2",
        "--progress=False",
    ]


@pytest.fixture
def crash_args(crash_base, tmp_path) -> list[str]:
    return [*crash_base, f"--out={tmp_path / 'crash.zarr'}"]


@pytest.fixture(scope="module")
def reference(crash_base, tmp_path_factory) -> Path:
    """The same capture, uninterrupted."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    finish([*crash_base, f"--out={out}"])
    return out


def finish(args: list[str]) -> None:
    """Run ``blockcap args`` to the end in a child forked with blockcap already imported
    (``crashkit``): no interpreter start-up per resume."""
    assert crashkit.run(args) == 0


def data_files(store: Path) -> dict[str, bytes]:
    """Every chunk file of every array, by relative path (metadata files excluded)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def assert_identical(store: Path, ref: Path) -> None:
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(ref), mode="r")
    names = ["tokens", "offsets", "committed"] + [
        f"block2/{s}" for s in ("heads_output", "proj_output", "ffwd_output")
    ]
    for name in names:
        assert np.asarray(a[name][:]).tobytes() == np.asarray(b[name][:]).tobytes(), name
    assert data_files(store) == data_files(ref)  # the chunk files themselves, byte for byte
    assert blockcap.verify(store) == []


def start_cli(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blockcap", *args], cwd=ROOT, **popen)


def wait_for_commits(store: Path, proc: subprocess.Popen, n: int) -> None:
    """Until ``n`` chunks of ``store`` are committed, or the run ends (2 minutes at most)."""
    committed = store / "committed" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if committed.is_dir() and len(list(committed.iterdir())) >= n:
            return
        time.sleep(0.002)


def n_chunks(ref: Path) -> int:
    return zarr.open_group(str(ref), mode="r")["committed"].shape[0]


@pytest.mark.slow
def test_external_sigkill_mid_write_then_resume(crash_args, reference, tmp_path):
    """A kill from outside at an arbitrary instant, possibly inside a file write."""
    store = tmp_path / "crash.zarr"
    proc = start_cli(crash_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_commits(store, proc, 3)
    proc.kill()
    proc.wait()
    finish(crash_args)
    assert not list(store.rglob("*.partial"))
    assert_identical(store, reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_cleanly_and_resumes(crash_args, reference, tmp_path, sig):
    store = tmp_path / "crash.zarr"
    proc = start_cli(crash_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_commits(store, proc, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "to resume, re-run python -m blockcap run" in err
    assert len(err.strip().splitlines()) == 1
    assert zarr.open_group(str(store), mode="r").attrs["blockcap"]["state"] == "incomplete"
    finish(crash_args)
    assert_identical(store, reference)


@pytest.mark.slow
def test_full_disk_stops_with_a_resumable_store(crash_args, reference, tmp_path):
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))

    proc = subprocess.run(
        [sys.executable, "-m", "blockcap", *crash_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "failed" in err and "File too large" in err and "re-run the same command" in err
    assert len(err.splitlines()) == 1
    store = tmp_path / "crash.zarr"
    assert zarr.open_group(str(store), mode="r").attrs["blockcap"]["state"] == "incomplete"
    finish(crash_args)
    assert_identical(store, reference)


def test_resume_refuses_other_parameters(run_args):
    blockcap.run(**run_args)
    g = zarr.open_group(run_args["out"], mode="r+")
    g.attrs["blockcap"] = {**g.attrs["blockcap"], "state": "incomplete"}
    with pytest.raises(BlockcapError, match="other parameters"):
        blockcap.run(**{**run_args, "dtype": "float16"})
    assert blockcap.run(**run_args).status == "resumed and completed"  # same parameters: finishes it


def corrupt_first_chunk(store: Path, array: str, how: str, index: int = 0) -> Path:
    chunk = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())[index]
    data = bytearray(chunk.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    chunk.write_bytes(bytes(data))
    return chunk


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupted_chunks_are_detected(run_args, how, capsys):
    blockcap.run(**{**run_args, "chunk_windows": 16})
    store = Path(run_args["out"])
    corrupt_first_chunk(store, "block0/proj_output", how)
    s = blockcap.open_store(store)
    assert s.site("heads_output")[:].shape[0] == s.n_windows  # other arrays still read
    with pytest.raises(
        BlockcapError, match=r"block0/proj_output: chunk 0 \(windows 0..15\): object .* differs"
    ):
        s.site("proj_output")[:20]
    problems = blockcap.verify(store)
    assert any("block0/proj_output: chunk 0 (windows 0..15)" in p for p in problems), problems
    from blockcap.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["verify", str(store)])
    assert exc.value.code == 1


def test_verify_repair_then_rerun_restores_altered_objects_exactly(run_args, capsys):
    """A run notices missing objects only; verify --repair turns altered ones (data, a commit record,
    an object written at finish) into missing ones, rewriting damaged metadata first, and the
    rerun recomputes just those units."""
    from blockcap.cli import main

    blockcap.run(**{**run_args, "chunk_windows": 16})
    store = Path(run_args["out"])
    want = crashkit.files(store)
    corrupt_first_chunk(store, "block0/proj_output", "flip")
    corrupt_first_chunk(store, "committed", "truncate", index=-1)
    corrupt_first_chunk(store, "block0/stats/ffwd_output/mean", "flip")
    assert blockcap.run(**{**run_args, "chunk_windows": 16}).status == "already complete"  # unnoticed
    (store / "block0" / "ffwd_output" / "zarr.json").unlink()  # repaired in the same pass
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(store)])
    assert exc.value.code == 1 and "hint: verify --repair" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", str(store), "--repair"])
    err = capsys.readouterr().err
    assert "rewrote 1 metadata documents" in err and "deleted 3 altered objects" in err
    summary = blockcap.run(**{**run_args, "chunk_windows": 16})
    last_unit = (summary.n_windows - 1) % 16 + 1
    assert summary.status.startswith("resumed") and summary.windows_computed == 16 + last_unit
    assert crashkit.files(store) == want
    assert blockcap.verify(store, check_stats=True) == []


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_lost_root_document_is_rebuilt_by_the_same_capture_only(run_args, how, capsys):
    """The commit records carry the spec's tag, so the same command can prove the data its own."""
    blockcap.run(**{**run_args, "chunk_windows": 16})
    store = Path(run_args["out"])
    want = crashkit.files(store)
    root = store / "zarr.json"
    root.write_bytes(root.read_bytes()[:20]) if how == "truncate" else root.unlink()
    assert len(blockcap.verify(store)) == 1
    raw = lambda: {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}  # noqa: E731
    damaged = raw()
    with pytest.raises(BlockcapError, match="refusing to touch it"):
        blockcap.run(**{**run_args, "chunk_windows": 16, "stride": 6})  # another capture: not ours
    assert raw() == damaged
    summary = blockcap.run(**{**run_args, "chunk_windows": 16})
    assert summary.status.startswith("resumed") and summary.windows_computed == 0
    assert crashkit.files(store) == want
    assert blockcap.verify(store, check_stats=True) == []


def test_verify_checks_tokens_against_dataset(run_args):
    blockcap.run(**run_args)
    g = zarr.open_group(run_args["out"], mode="r+")
    toks = np.asarray(g["tokens"][:])
    toks[0, 0] = (toks[0, 0] + 1) % 10
    g["tokens"][:] = toks  # a valid chunk with the wrong content
    problems = blockcap.verify(run_args["out"])
    assert any("tokens: chunk 0" in p and "differs from what was committed" in p for p in problems), problems


def test_open_store_errors(run_args, tmp_path):
    with pytest.raises(BlockcapError, match="does not exist"):
        blockcap.open_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BlockcapError, match="is an empty directory, not a blockcap store"):
        blockcap.open_store(tmp_path / "plain")
    (tmp_path / "plain" / "x").write_text("x")
    with pytest.raises(BlockcapError, match="not a Zarr v3 store"):
        blockcap.open_store(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(BlockcapError, match="not a blockcap store"):
        blockcap.open_store(tmp_path / "other.zarr")
    blockcap.run(**run_args)
    g = zarr.open_group(run_args["out"], mode="r+")
    g.attrs["blockcap"] = {**g.attrs["blockcap"], "format_version": 99}
    with pytest.raises(BlockcapError, match="newer than this blockcap"):
        blockcap.open_store(run_args["out"])
    (tmp_path / "f").write_text("x")
    with pytest.raises(BlockcapError, match="is a file"):
        blockcap.open_store(tmp_path / "f")


def test_output_path_problems(run_args, tmp_path):
    (tmp_path / "file").write_text("precious")
    with pytest.raises(BlockcapError, match="is a file"):
        blockcap.run(**{**run_args, "out": str(tmp_path / "file")})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(BlockcapError, match="not a blockcap store; refusing"):
            blockcap.run(**{**run_args, "out": str(other), "overwrite": overwrite})
    assert (other / "notes.txt").read_text() == "precious"
    with pytest.raises(BlockcapError, match="does not exist"):
        blockcap.run(**{**run_args, "out": str(tmp_path / "no" / "such" / "s.zarr")})
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BlockcapError, match="not writable"):
            blockcap.run(**{**run_args, "out": str(locked / "s.zarr")})


def test_dataset_problems(run_args, tmp_path, ckpt):
    short = tmp_path / "short.txt"
    short.write_text(Path(run_args["dataset"]).read_text()[:40])
    with pytest.raises(BlockcapError, match="fewer than one window"):
        blockcap.run(**{**run_args, "dataset": str(short)})
    alien = tmp_path / "alien.txt"
    alien.write_text("Ωμέγα " * 100)
    with pytest.raises(BlockcapError, match="not in the model's vocabulary"):
        blockcap.run(**{**run_args, "dataset": str(alien)})
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(BlockcapError, match="is empty"):
        blockcap.run(**{**run_args, "dataset": str(empty)})
    assert not Path(run_args["out"]).exists()


def test_raw_state_dict_vocab_must_fit_dataset(tiny_model, run_args, tmp_path):
    import torch

    model, _ = tiny_model
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    other = tmp_path / "fewer.txt"
    other.write_text("abcabcabc" * 50)
    with pytest.raises(BlockcapError, match="3 distinct characters but weights .* expect"):
        blockcap.run(**{**run_args, "weights": str(tmp_path / "raw.pt"), "dataset": str(other)})
    # the original way: vocabulary from the dataset itself
    assert blockcap.run(**{**run_args, "weights": str(tmp_path / "raw.pt")}).status == "complete"


def test_replaced_store_survives_a_failed_overwrite(run_args, monkeypatch):
    blockcap.run(**run_args)
    from blockcap.storage.location import Location

    put = Location.put

    def boom(self, key, data, finishing=False):
        if key.startswith("committed/c/"):
            raise OSError(28, "No space left on device")
        put(self, key, data, finishing)

    monkeypatch.setattr(Location, "put", boom)
    with pytest.raises(BlockcapError, match="No space left"):
        blockcap.run(**{**run_args, "stride": 7, "overwrite": True})
    aside = Path(run_args["out"] + ".replaced")
    assert aside.is_dir() and blockcap.open_store(aside).params["stride"] == 5  # the old capture is kept
    monkeypatch.undo()
    blockcap.run(**{**run_args, "stride": 7})
    assert not aside.exists()
    shutil.rmtree(run_args["out"])


@pytest.mark.slow
def test_reader_during_a_run_sees_only_committed_data(crash_args, reference, tmp_path):
    store = tmp_path / "crash.zarr"
    proc = start_cli(crash_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    want = blockcap.open_store(reference).site("ffwd_output", 2)
    reads = 0
    while proc.poll() is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IncompleteStoreWarning)
                s = blockcap.open_store(store)
        except BlockcapError as e:  # before the store is whole: one line, never a traceback
            assert "being created" in str(e) or "does not exist" in str(e), e  # never "not a store"
            continue
        done = np.flatnonzero(s.committed_windows())
        if done.size:
            got = s.site("ffwd_output", 2)
            assert np.array_equal(got.np[done], want.np[done])
            reads += 1
    assert proc.returncode == 0
    assert reads > 0


@pytest.mark.slow
def test_write_error_while_creating_is_one_line_and_resumable(crash_args, reference, tmp_path):
    def tiny_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))  # smaller than some metadata documents

    proc = subprocess.run(
        [sys.executable, "-m", "blockcap", *crash_args], cwd=ROOT, capture_output=True, text=True,
        preexec_fn=tiny_files,
    )  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "File too large" in err and "re-run the same command" in err, err
    store = tmp_path / "crash.zarr"
    with pytest.raises(BlockcapError, match="being created|does not exist"):
        blockcap.open_store(store)
    finish(crash_args)
    assert_identical(store, reference)


def test_substring_and_results_follow_python_rules(run_args):
    blockcap.run(**{**run_args, "sites": "ffwd_output,attention"})
    s = blockcap.open_store(run_args["out"])
    assert s.substring(3, -1) == s.text(3) and s.substring(3, -8) == s.text(3)[:1]
    assert s.substring(-1, 2) == s.text(s.n_windows - 1)[:3]
    for bad in ((3, 8), (3, -9), (s.n_windows, 0), (3, 1.5), ("x", 0)):
        with pytest.raises(IndexError):
            s.substring(*bad)
    with pytest.raises(BlockcapError, match="attention is a .head, query, key. pattern per window"):
        next(s.results(sites=("attention",)))


def writes_of(crash_args: list[str], tmp_path: Path) -> int:
    """How many writes the crash capture makes (counted on a spare store)."""
    return crashkit.count_writes([*crash_args[:-1], f"--out={tmp_path / 'count.zarr'}"], tmp_path)


@pytest.fixture
def machine(request):
    """The machine as it is, or with a CPU hog per core beside the test (signals raced under load)."""
    hogs = []
    if request.param == "loaded":
        cores = len(os.sched_getaffinity(0))
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        yield request.param
    finally:
        for h in hogs:
            h.kill()
            h.wait()


@pytest.mark.slow
@pytest.mark.parametrize(  # each signal once, each machine state once: CI time
    "sig, machine", [("TERM", "idle"), ("INT", "loaded")], indirect=["machine"]
)
def test_a_signal_while_creating_or_finishing_is_one_line_and_resumable(
    crash_args, reference, tmp_path, sig, machine
):
    store = tmp_path / "crash.zarr"
    total = writes_of(crash_args, tmp_path)
    for at in (2, 15, total - 2):  # creating, creating, finishing
        shutil.rmtree(store, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "tests/killer.py", str(at), *crash_args], cwd=ROOT, capture_output=True,
            text=True, env={**os.environ, "KILL_SIGNAL": sig},
        )  # fmt: skip
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 130, (at, proc.stderr)
        assert (
            len([line for line in err if not line.startswith("writes:")]) == 1
            and "Traceback" not in proc.stderr
        )
        assert not list(tmp_path.glob(".crash.zarr*.lock"))
        finish(crash_args)
        assert_identical(store, reference)


@pytest.mark.slow
@pytest.mark.parametrize("at", ["creating", "capturing", "finishing"])
def test_a_stop_whose_raise_is_swallowed_still_stops(crash_args, reference, tmp_path, at):
    """A SIGINT handled inside a finalizer (its KeyboardInterrupt swallowed, as under load it can
    be) still ends the run with 130, at its next write, in one line; the store resumes exactly."""
    store = tmp_path / "crash.zarr"
    total = writes_of(crash_args, tmp_path)
    n = {"creating": 15, "capturing": total // 2, "finishing": total - 3}[at]
    proc = subprocess.run(
        [sys.executable, "tests/killer.py", str(n), *crash_args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "KILL_SWALLOWED": "1"},
    )  # fmt: skip
    assert proc.returncode == 130, (n, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("writes:")]
    assert len(lines) == 1 and "interrupted" in lines[0], proc.stderr
    finish(crash_args)
    assert_identical(store, reference)


def test_overwrite_through_a_symbolic_link_replaces_the_store_behind_it(run_args, tmp_path):
    real = tmp_path / "disk" / "s.zarr"
    real.parent.mkdir()
    blockcap.run(**{**run_args, "out": str(real)})
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    assert blockcap.run(**{**run_args, "out": str(link)}).status == "already complete"
    blockcap.run(**{**run_args, "out": str(link), "stride": 7, "overwrite": True})
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert blockcap.open_store(link).params["stride"] == 7 and blockcap.verify(link) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link.zarr"]  # nothing beside the link
    assert sorted(p.name for p in real.parent.iterdir()) == ["s.zarr"]  # the old store is gone


def test_every_object_is_on_disk_before_its_commit_record(run_args, monkeypatch):
    """Power loss on a file system that reorders writes: each object, and the directory entry that
    names it, is fsynced before the unit's commit record appears; --fsync=False skips it."""
    from blockcap.storage import location

    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(location, "WRITE_HOOKS", [lambda op, key: events.append((op, key))])
    blockcap.run(**{**run_args, "chunk_windows": 16})
    store = Path(run_args["out"]).resolve()
    synced = [path for op, path in events if op == "fsync"]
    s = blockcap.open_store(store)
    for u in range(s.layout.n_units):
        record = events.index(("put", f"committed/c/{u}/0"))  # renamed into place
        before = {path for op, path in events[:record] if op == "fsync"}
        for a in s.layout.unit_arrays():
            key = f"{store}/{object_key(a, u)}"
            assert key in before and str(Path(key).parent) in before, (u, key)
    assert f"{store}/zarr.json" in synced and str(store.parent) in synced  # the root, and the directory
    events.clear()
    blockcap.run(**{**run_args, "out": run_args["out"] + "2", "fsync": False})
    assert not [e for e in events if e[0] == "fsync"]
