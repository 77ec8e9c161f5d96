"""The fire CLI: commands, one-line errors, exit codes, and no store left behind by bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockcap.cli import EXIT_ERROR, main


def cli(*args: str) -> None:
    main(list(args))


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "blockcap", "--help"],
        capture_output=True,
        text=True,
        env={"PAGER": "cat", "PATH": ""},
        check=False,
    )
    text = out.stdout + out.stderr
    for command in ("run", "info", "verify", "train", "generate"):
        assert command in text


def test_run_info_verify(run_args, capsys):
    a = run_args
    cli(
        "run",
        f"--weights={a['weights']}",
        f"--dataset={a['dataset']}",
        f"--out={a['out']}",
        "--sample_len=8",
        "--stride=5",
        "--batch_size=16",
        "--block_idx=0,1",
        "--progress=False",
    )
    out = capsys.readouterr().out
    assert "complete:" in out and "ratio" in out and "tokens/s" in out
    cli("info", a["out"])
    out = capsys.readouterr().out
    for word in ("state: complete", "block1/ffwd_output", "blosc+crc32c", "raw", "stored", "provenance"):
        assert word in out
    assert (
        f"dataset: {Path(a['dataset']).absolute()}" in out and " documents, " in out
    )  # what it was made from
    assert "hard cuts" in out and '"digests": "' in out  # digests summed up, not one line per object
    cli("verify", a["out"])
    assert "ok:" in capsys.readouterr().out


BAD = [
    (["--block_idx=6"], "block_idx=6 is not a block of this model; use an integer in 0..2"),
    (["--block_idx=-1"], "block_idx=-1"),
    (["--block_idx=1.5"], "block_idx=1.5"),
    (["--block_idx=x"], "block_idx='x'"),
    (["--sites=nope"], "sites='nope' has unknown 'nope'"),
    (["--sites="], "is empty"),
    (["--sample_len=0"], "--sample_len=0 is out of range; use an integer 1..2^40"),
    (["--sample_len=33"], "--sample_len=33 is longer than the model's context of 32 tokens; use 1..32"),
    (["--stride=0"], "stride=0 is out of range"),
    (["--batch_size=-4"], "batch_size=-4 is out of range"),
    (["--dtype=float64"], "dtype='float64' is unknown"),
    (["--codec=gzip"], "codec='gzip' is unknown"),
    (["--codec=zstd:99"], "codec='zstd:99' has a bad level"),
    (["--split=test"], "split='test' is unknown"),
    (["--device=cuda:7"], "device='cuda:7'"),
    (["--device=tpu"], "device='tpu'"),
    *(
        [(["--device=cuda"], "no CUDA GPU is available; use --device=cpu")]
        if not torch.cuda.is_available()
        else []
    ),
    (["--dataset_sha256=" + "ab" * 32], "expected abab"),
    (["--dataset_sha256=" + "0" * 64], "expected 0000"),
    (["--chunk_windows=5"], "--chunk_windows=5 must be a multiple or a divisor of --batch_size=16"),
    (["--weights=/nonexistent.pt"], "weights file /nonexistent.pt does not exist"),
    (["--dataset=/nonexistent.txt"], "dataset /nonexistent.txt does not exist"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_arguments_fail_before_any_store(run_args, capsys, extra, message):
    a = run_args
    args = {
        "weights": a["weights"],
        "dataset": a["dataset"],
        "out": a["out"],
        "sample_len": "8",
        "stride": "5",
        "batch_size": "16",
        "progress": "False",
    }
    for e in extra:
        key, _, value = e[2:].partition("=")
        args[key] = value
    with pytest.raises(SystemExit) as exc:
        cli("run", *[f"--{k}={v}" for k, v in args.items()])
    assert exc.value.code == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("blockcap: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not os.path.exists(a["out"])


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli("run", "--no_such_flag=1")
    assert exc.value.code != 0


def test_verify_exits_1_on_damage_and_2_on_a_path_that_is_no_store(run_args, tmp_path, capsys):
    import blockcap

    with pytest.raises(SystemExit) as exc:
        cli("verify", str(tmp_path / "missing.zarr"))
    assert exc.value.code == EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err
    blockcap.run(**run_args)
    os.unlink(os.path.join(run_args["out"], "tokens", "c", "0", "0"))
    with pytest.raises(SystemExit) as exc:
        cli("verify", run_args["out"])
    assert exc.value.code == 1
    assert "problem: tokens: chunk 0" in capsys.readouterr().err


def test_verify_names_a_dataset_that_is_not_the_stores(run_args, tmp_path, capsys):
    """Tokens are checked against the store's dataset; another one named, or the store's own changed
    since, is a problem said in one line (never a silent "ok"); one that is gone is not checked."""
    mine = tmp_path / "d.txt"  # changed and deleted below: not the session's shared text
    mine.write_text(Path(run_args["dataset"]).read_text())
    a = {**run_args, "dataset": str(mine)}
    cli("run", *(f"--{k}={v}" for k, v in a.items()))
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text(Path(a["dataset"]).read_text()[::-1])
    with pytest.raises(SystemExit) as exc:
        cli("verify", a["out"], f"--dataset={other}")
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "is not the one the store was captured from" in err, err
    assert "--dataset=PATH" in err and "--dataset_check=False" in err
    original = Path(a["dataset"]).read_text()
    Path(a["dataset"]).write_text(original[:-1] + "#")  # the store's own dataset, changed
    with pytest.raises(SystemExit):
        cli("verify", a["out"])
    assert "is not the one the store was captured from" in capsys.readouterr().err
    Path(a["dataset"]).unlink()  # gone: nothing to compare against
    cli("verify", a["out"])
    assert "ok:" in capsys.readouterr().out
