"""Before a big run: a dry run that creates nothing, and a refusal when the disk is too small."""

from __future__ import annotations

from pathlib import Path

import pytest

import blockcap
from blockcap.core.errors import BlockcapError
from blockcap.storage.location import Location


def test_dry_run_creates_nothing_and_predicts_the_store(run_args, capsys):
    from blockcap.cli import main

    args = {**run_args, "chunk_windows": 8, "batch_size": 8, "sites": "heads_output,ffwd_output"}
    report = blockcap.run(**args, dry_run=True)
    assert not Path(args["out"]).exists()
    main(["run", *(f"--{k}={v}" for k, v in args.items()), "--dry_run"])
    out = capsys.readouterr().out
    assert (
        "dry run:" in out
        and "expected stored" in out
        and "time on cpu" in out
        and "block0/ffwd_output" in out
    )
    assert not Path(args["out"]).exists()
    blockcap.run(**args)
    files = [p for p in Path(args["out"]).rglob("*") if p.is_file()]
    assert report.estimate.objects == len(files)
    stored = sum(
        p.stat().st_size for p in files if "/c/" in str(p) and "block0/" in str(p) and "stats" not in str(p)
    )
    assert 0.7 < report.estimate.stored_bytes / stored < 1.3  # measured on one batch, extrapolated


def test_a_disk_too_small_is_refused_unless_forced(run_args, monkeypatch):
    monkeypatch.setattr(Location, "free_bytes", lambda self: 1000)
    with pytest.raises(
        BlockcapError, match=r"needs about [\d.]+ kB, but its file system has 1.0 kB free.*force=True"
    ):
        blockcap.run(**run_args)
    assert not Path(run_args["out"]).exists()
    assert blockcap.run(**run_args, force=True).status == "complete"
