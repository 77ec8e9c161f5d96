"""torchrun: ranks share the units of one store; any world size resumes any other, bitwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import blockcap
from tests import crashkit
from tests.hf_models import NEEDS_TRANSFORMERS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, args: list[str], script: list[str] | None = None, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += script or ["-m", "blockcap"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture(scope="module")
def base(ckpt, text_file) -> list[str]:
    return [
        "run", f"--weights={ckpt}", f"--dataset={text_file}", "--split=all", "--sample_len=8", "--stride=3",
        "--batch_size=16", "--chunk_windows=16", "--block_idx=0,2", "--progress=False",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single(base, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("single") / "s.zarr"
    assert crashkit.run([*base, f"--out={out}"]) == 0
    return crashkit.files(out)


def test_two_ranks_write_the_store_one_process_writes(base, single, tmp_path):
    out = tmp_path / "s.zarr"
    done = torchrun(2, [*base, f"--out={out}", "--verbose"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("complete:") == 1  # rank 0 reports for the job
    assert "rank 0:" in done.stderr and "rank 1:" in done.stderr
    assert crashkit.files(out) == single
    assert crashkit.leftovers(out) == []


def test_a_dead_rank_is_resumed_by_another_world_size(base, single, tmp_path):
    out = tmp_path / "s.zarr"
    killed = torchrun(2, [*base, f"--out={out}"], ["tests/killer.py", "12"], env={"KILL_RANK": "1"})
    assert killed.returncode != 0
    s = blockcap.open_store(out) if (out / "zarr.json").exists() else None
    assert s is None or not s.complete
    for nproc in (1, 3):  # finish with another world size; then a no-op with a third
        done = torchrun(nproc, [*base, f"--out={out}"])
        assert done.returncode == 0, done.stderr
    assert crashkit.files(out) == single
    assert blockcap.verify(out) == []


def test_part_and_torchrun_do_not_mix(base, tmp_path):
    done = torchrun(2, [*base, f"--out={tmp_path / 's.zarr'}", "--part=0/2"])
    assert done.returncode != 0 and "both split the work" in done.stderr
    assert not (tmp_path / "s.zarr").exists()


@NEEDS_TRANSFORMERS
def test_two_ranks_on_a_hugging_face_model(hf_zoo, hf_text, tmp_path):
    args = ["run", f"--model={hf_zoo('llama')}", f"--dataset={hf_text}", "--split=all", "--sample_len=16",
            "--stride=8", "--batch_size=8", "--chunk_windows=8", "--block_idx=1", "--sites=all",
            "--progress=False"]  # fmt: skip
    assert crashkit.run([*args, f"--out={tmp_path / 'one.zarr'}"]) == 0
    done = torchrun(2, [*args, f"--out={tmp_path / 'two.zarr'}"])
    assert done.returncode == 0, done.stderr
    assert crashkit.files(tmp_path / "two.zarr") == crashkit.files(tmp_path / "one.zarr")
