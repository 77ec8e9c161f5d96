"""Crash recovery at every write, the way SQLite tests it.

A small capture (a tiny model, three write units, statistics on) is killed right after its Nth
write, for every N from 1 to the total, creation, every unit, finishing and the lock included,
and with N also counting files written but not yet renamed into place. After each kill:
readers and ``verify`` answer in one line (never a traceback), and re-running the same command
gives a store whose every file equals an uninterrupted run's, with nothing left beside it.
The same is done for ``overwrite`` over a complete store, checking after each kill that the last
complete store survives.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import blockcap
from blockcap.core.errors import BlockcapError
from tests import crashkit

# Stores opened after a kill are incomplete; the filter is the test's (kill points run on threads,
# and warnings.catch_warnings is not thread-safe).
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::blockcap.IncompleteStoreWarning")]


@pytest.fixture(scope="module")
def base(ckpt, text_file) -> list[str]:
    return [
        "run", f"--weights={ckpt}", f"--dataset={text_file}", "--split=val", "--sample_len=8",
        "--stride=7", "--batch_size=8", "--chunk_windows=32", "--block_idx=1", "--sites=ffwd_output",
        "--progress=False", "--writers=1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "s.zarr"
    assert crashkit.run([*base, f"--out={out}"]) == 0
    assert blockcap.open_store(out).layout.n_units == 3
    return crashkit.files(out)


def readable_or_one_line(out: Path) -> None:
    """What a user sees after a crash: a store, or a one-line error, never a traceback."""
    try:
        blockcap.open_store(out)
    except BlockcapError as e:
        assert "\n" not in str(e)
    try:
        for problem in blockcap.verify(out):
            assert "\n" not in problem
    except BlockcapError as e:
        assert "\n" not in str(e)


def complete_params(path: Path) -> dict | None:
    """The params of a complete, verified store at ``path``, else None."""
    try:
        s = blockcap.open_store(path)
    except BlockcapError:
        return None
    return dict(s.params) if s.complete and not blockcap.verify(path, check_dataset=False) else None


@pytest.mark.parametrize("partial", [False, True], ids=["after-write", "mid-write"])
def test_kill_at_every_write_then_resume(base, reference, tmp_path, partial):
    total = crashkit.count_writes([*base, f"--out={tmp_path / 'count.zarr'}"], tmp_path, partial)
    assert total > 20  # creation, three units, finishing and the lock are all counted
    crashkit.kill_and_resume_each(
        base, range(1, total + 1), tmp_path, reference, partial, after_kill=readable_or_one_line
    )


def test_kill_at_every_write_of_an_overwrite(base, reference, tmp_path):
    """Overwriting a complete store: after any kill the old or the new complete store exists."""
    old_argv = [a.replace("--stride=7", "--stride=9") for a in base]
    counted = tmp_path / "count.zarr"
    assert crashkit.run([*old_argv, f"--out={counted}"]) == 0
    total = crashkit.count_writes([*base, f"--out={counted}", "--overwrite"], tmp_path)

    def kill_then_resume(n: int) -> None:
        out = tmp_path / f"s{n}.zarr"
        assert crashkit.run([*old_argv, f"--out={out}"]) == 0
        old = complete_params(out)
        argv = [*base, f"--out={out}", "--overwrite"]
        assert crashkit.run(argv, kill_at=n) == -9, n
        readable_or_one_line(out)
        survivors = [complete_params(p) for p in (out, out.with_name(out.name + ".replaced"))]
        assert old in survivors or any(s and s["stride"] == 7 for s in survivors), n
        assert crashkit.run(argv) == 0, n
        assert crashkit.files(out) == reference, n
        assert not out.with_name(out.name + ".replaced").exists(), n
        assert crashkit.leftovers(out) == [], n

    crashkit.each(range(1, total + 1), kill_then_resume)


@pytest.mark.parametrize("kills", [2, 3])
def test_interrupted_overwrites_in_a_row_keep_the_last_complete_store(base, tmp_path, kills):
    """A complete; then ``kills`` overwrites with other strides, each killed at a random write."""
    rng = random.Random(kills)
    out = tmp_path / "s.zarr"
    first = [a.replace("--stride=7", "--stride=5") for a in base]
    assert crashkit.run([*first, f"--out={out}"]) == 0
    last_complete = complete_params(out)
    strides = [9, 11, 13][:kills]
    for stride in strides:
        argv = [*[a.replace("--stride=7", f"--stride={stride}") for a in base], f"--out={out}", "--overwrite"]
        total = crashkit.count_writes([*argv[:-2], f"--out={tmp_path / f'c{stride}.zarr'}"], tmp_path)
        assert crashkit.run(argv, kill_at=rng.randint(1, total)) in (-9, 0)
        survivors = [complete_params(p) for p in (out, out.with_name(out.name + ".replaced"))]
        if any(s and s["stride"] == stride for s in survivors):
            last_complete = next(s for s in survivors if s and s["stride"] == stride)
        assert last_complete in survivors, (stride, survivors)
    final = [
        *[a.replace("--stride=7", f"--stride={strides[-1]}") for a in base],
        f"--out={out}",
        "--overwrite",
    ]
    assert crashkit.run(final) == 0
    assert complete_params(out)["stride"] == strides[-1]
    assert not out.with_name(out.name + ".replaced").exists()
    assert crashkit.leftovers(out) == []
