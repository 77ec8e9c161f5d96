"""One writer per store: a second run is refused in one line and harms nothing; part processes share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import blockcap
from tests import crashkit

ROOT = Path(__file__).resolve().parent.parent


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockcap", *args], cwd=ROOT, capture_output=True, text=True)


def flags(run_args: dict, **extra) -> list[str]:
    return ["run", *(f"--{k}={v}" for k, v in {**run_args, **extra}.items())]


def test_a_second_run_on_a_store_in_use_is_refused_and_harms_nothing(run_args, tmp_path):
    argv = flags(run_args, chunk_windows=8, batch_size=8)
    first = crashkit.start_paused([*argv, "--writers=1"], tmp_path / "paused")
    try:
        before = crashkit.settled(Path(run_args["out"]))
        second = cli(argv)
        assert second.returncode == 2
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1, err
        assert f"is in use by process {first.pid} on host" in err and "choose another --out" in err
        assert crashkit.files(Path(run_args["out"])) == before
        overwrite = cli([*argv, "--overwrite", "--stride=3"])  # not even overwrite takes a store in use
        assert overwrite.returncode == 2 and "is in use" in overwrite.stderr
    finally:
        (tmp_path / "paused").unlink()
        first.join(60)
    assert first.exitcode == 0
    assert blockcap.verify(run_args["out"]) == []
    assert crashkit.leftovers(Path(run_args["out"])) == []


def test_parts_share_a_store_and_a_plain_run_waits_for_them(run_args, tmp_path):
    argv = flags(run_args, chunk_windows=8, batch_size=8)
    part0 = crashkit.start_paused([*argv, "--part=0/2", "--writers=1"], tmp_path / "paused")
    try:
        part1 = cli([*argv, "--part=1/2"])  # runs beside part 0
        assert part1.returncode == 0, part1.stderr
        assert "part 1/2 done" in part1.stdout
        plain = cli(argv)
        assert plain.returncode == 2 and "is in use" in plain.stderr
    finally:
        (tmp_path / "paused").unlink()
        part0.join(60)
    assert part0.exitcode == 0
    s = blockcap.open_store(run_args["out"])
    assert s.complete and blockcap.verify(run_args["out"]) == []
    assert crashkit.leftovers(Path(run_args["out"])) == []


def test_finalize_marks_complete_only_when_every_unit_is_in(run_args):
    argv = flags(run_args, chunk_windows=8, batch_size=8)
    assert cli([*argv, "--part=0/3"]).returncode == 0
    early = cli(["finalize", run_args["out"]])
    assert early.returncode == 2 and "units still to capture" in early.stderr
    assert cli([*argv, "--part=1/3"]).returncode == 0
    assert cli([*argv, "--part=2/3"]).returncode == 0  # the last part finishes the store itself
    assert blockcap.open_store(run_args["out"]).complete
    again = cli(["finalize", run_args["out"]])  # idempotent
    assert again.returncode == 0 and "complete" in again.stdout


def test_a_symlink_to_a_store_in_use_is_refused_too(run_args, tmp_path):
    argv = flags(run_args, chunk_windows=8, batch_size=8)
    link = tmp_path / "link.zarr"
    link.symlink_to(Path(run_args["out"]))
    first = crashkit.start_paused([*argv, "--writers=1"], tmp_path / "paused")
    try:
        second = cli([a for a in argv if not a.startswith("--out=")] + [f"--out={link}"])
        assert second.returncode == 2 and "is in use by process" in second.stderr
    finally:
        (tmp_path / "paused").unlink()
        first.join(60)
    assert first.exitcode == 0 and blockcap.verify(run_args["out"]) == []


def test_directories_that_only_look_like_blockcap_leftovers_are_kept(run_args, tmp_path):
    keep = [
        tmp_path / ".s.zarr.mine.trash",
        tmp_path / ".s.zarr.notes.creating",
        tmp_path / ".s.zarr.abc.trash",
    ]
    for d in keep:
        d.mkdir()
        (d / "file.txt").write_text("mine")
    blockcap.run(**run_args)
    blockcap.run(**{**run_args, "out": str(tmp_path / "[s].zarr")})  # a glob pattern in a name
    assert all((d / "file.txt").read_text() == "mine" for d in keep)


def test_a_dangling_symlink_in_the_way_of_overwrite_is_refused_and_nothing_changes(run_args, tmp_path):
    blockcap.run(**run_args)
    before = crashkit.files(Path(run_args["out"]))
    Path(run_args["out"] + ".replaced").symlink_to(tmp_path / "nowhere")
    done = cli([*flags(run_args, stride=7), "--overwrite"])
    assert done.returncode == 2 and "was not set aside by blockcap" in done.stderr
    assert crashkit.files(Path(run_args["out"])) == before
