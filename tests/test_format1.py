"""Stores of format version 1 (blockcap 0.1, committed fixture ``tests/data/store-v1``) keep opening,
read the values a capture of today computes, verify, report damage, and are never resumed into."""

import shutil
from pathlib import Path

import pytest
import torch

import blockcap
from blockcap.cli import main

DATA = Path(__file__).parent / "data"


@pytest.fixture
def old(tmp_path) -> Path:
    path = tmp_path / "v1.zarr"
    shutil.copytree(DATA / "store-v1", path)
    return path


def capture_args(store: Path) -> dict:
    """Today's ``run`` arguments for the capture the fixture holds."""
    p = blockcap.open_store(store).params
    return dict(weights=str(DATA / "store-v1.weights.pt"), dataset=str(DATA / "store-v1.txt"),
                split=p["split"], sample_len=p["sample_len"], stride=p["stride"], batch_size=p["batch_size"],
                block_idx=",".join(map(str, p["blocks"])), sites=",".join(p["sites"]), dtype=p["dtype"],
                chunk_windows=p["chunk_windows"], progress=False)  # fmt: skip


def test_reads_what_a_capture_of_today_computes(old, tmp_path):
    s = blockcap.open_store(old)
    assert s.complete and s.n_windows == 20 and blockcap.verify(old) == []
    new = blockcap.open_store(blockcap.run(**capture_args(old), out=str(tmp_path / "v2.zarr")).path)
    assert torch.equal(s.tokens[:], new.tokens[:])
    for b in s.blocks:
        for site in s.sites:
            assert torch.equal(s.site(site, b)[:], new.site(site, b)[:]), (b, site)
    assert s.text(3) == new.text(3)


def test_damage_is_reported(old):
    chunk = old / "block1" / "ffwd_output" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    problems = blockcap.verify(old)
    assert any("block1/ffwd_output" in p and "unreadable" in p for p in problems), problems


def test_is_not_resumed_into(old, capsys):
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    args = capture_args(old)
    argv = ["run", *(f"--{k}={v}" for k, v in args.items()), f"--out={old}"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "format 1" in err, err
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
