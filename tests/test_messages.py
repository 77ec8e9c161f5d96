"""Messages that say what is wrong and what to do: one line, the right cause, a fix that applies."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import blockcap
from blockcap.cli import main
from blockcap.storage.location import Location


def cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err.strip()


def flags(run_args: dict, **extra) -> list[str]:
    return ["run", *(f"--{k}={v}" for k, v in {**run_args, **extra}.items())]


def test_an_over_long_out_is_one_line(run_args, tmp_path, capsys):
    code, err = cli(flags(run_args, out=tmp_path / ("x" * 300)), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "File name too long" in err, err
    code, err = cli(flags(run_args, out=tmp_path / "/".join(["d" * 200] * 30)), capsys)
    assert code == 2 and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flag", ["stride", "batch_size", "sample_len", "chunk_windows"])
def test_a_word_where_a_number_belongs_is_not_an_integer(run_args, capsys, flag):
    code, err = cli(flags(run_args, **{flag: "abc"}), capsys)
    assert code == 2 and f"--{flag}='abc' is not an integer" in err, err


def test_search_says_a_window_that_is_not_a_number_is_not_one(run_args, capsys):
    blockcap.run(**run_args)
    code, err = cli(["search", run_args["out"], "--window=abc"], capsys)
    assert code == 2 and "--window='abc' is not an integer" in err, err


def test_the_disk_space_refusal_counts_in_units_that_show(run_args, capsys, monkeypatch):
    monkeypatch.setattr(Location, "free_bytes", lambda self: 12_345)
    code, err = cli(flags(run_args), capsys)
    assert code == 2 and "needs about" in err and "has 12.3 kB free" in err and "0.00 GB" not in err, err


def test_repair_on_a_read_only_store_says_so_without_naming_options_verify_lacks(
    run_args, capsys, monkeypatch
):
    blockcap.run(**run_args)
    real_open = os.open

    def read_only(path, flags, *a, **kw):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    code, err = cli(["verify", run_args["out"], "--repair"], capsys)
    assert code == 2 and "Read-only file system" in err and "--out" not in err, err
    assert Path(run_args["out"], "zarr.json").exists()
