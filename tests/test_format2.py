"""Stores of format version 2 (blockcap 0.2, committed fixtures ``tests/data/store-v2`` — sharded,
with statistics and attention — and ``store-v2-dedup`` — bfloat16 prefix rows) keep opening, read
the values a capture of today computes, verify (statistics included), and report damage."""

import shutil
from pathlib import Path

import pytest
import torch

import blockcap

DATA = Path(__file__).parent / "data"
FIXTURES = ("store-v2", "store-v2-dedup")


@pytest.fixture(params=FIXTURES)
def old(request, tmp_path) -> Path:
    path = tmp_path / f"{request.param}.zarr"
    shutil.copytree(DATA / request.param, path)
    return path


def capture_args(store: Path) -> dict:
    """Today's ``run`` arguments for the capture a fixture holds (its recorded spec, locators replaced)."""
    p = dict(blockcap.open_store(store).spec.identity())
    for hashed in ("model_sha256", "dataset_sha256", "device"):
        p.pop(hashed)
    p["block_idx"] = ",".join(map(str, p["block_idx"]))
    p["sites"] = ",".join(p["sites"])
    return dict(
        p, weights=str(DATA / "store-v1.weights.pt"), dataset=str(DATA / "store-v1.txt"), progress=False
    )


def test_reads_what_a_capture_of_today_computes(old, tmp_path):
    s = blockcap.open_store(old)
    assert s.complete and s.meta["format_version"] == 2
    assert blockcap.verify(old, check_stats=True) == []
    new = blockcap.open_store(blockcap.run(**capture_args(old), out=str(tmp_path / "new.zarr")).path)
    assert s.n_windows == new.n_windows and torch.equal(s.tokens[:], new.tokens[:])
    for b in s.blocks:
        for site in s.sites:
            assert torch.equal(s.site(site, b)[:], new.site(site, b)[:]), (b, site)
        for site in (x for x in s.sites if x != "attention"):
            assert torch.equal(
                torch.from_numpy(s.stats(site, b).mean), torch.from_numpy(new.stats(site, b).mean)
            )
    assert s.text(3) == new.text(3)


def test_damage_is_reported(old):
    victim = next(
        p for p in sorted(old.rglob("*")) if p.is_file() and "/block1/" in str(p) and "/c/" in str(p)
    )
    victim.write_bytes(victim.read_bytes()[:-7])
    problems = blockcap.verify(old)
    assert problems and any("block1/" in p for p in problems), problems


def test_is_not_resumed_into(old, capsys):
    from blockcap.cli import main

    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    argv = ["run", *(f"--{k}={v}" for k, v in capture_args(old).items()), f"--out={old}"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "format 2" in err, err
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
