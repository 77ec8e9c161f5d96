"""torchrun: ranks share the units of one store; any world size resumes any other, bitwise."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import blockcap
from tests import crashkit
from tests.hf_models import NEEDS_TRANSFORMERS
from tests.launch import ROOT, torchrun

pytestmark = pytest.mark.slow


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


@pytest.mark.filterwarnings("ignore::blockcap.IncompleteStoreWarning")  # it opens the killed store on purpose
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


def blockcap_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("blockcap:")]


@pytest.mark.parametrize("case", ["sample_len", "relative-out", "dataset-missing"])
def test_ranks_that_disagree_stop_before_a_write(base, tmp_path, case):
    """A rank with other parameters, a relative --out resolved in another working directory (here
    onto another complete store), or an error of its own: every rank stops, one line, nothing written."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in nodes:
        d.mkdir()
    assert crashkit.run([*base, f"--out={nodes[1] / 's.zarr'}"]) == 0  # rank 1's cwd holds a store
    other = crashkit.files(nodes[1] / "s.zarr")
    env, out, expect = {
        "sample_len": ({"RANK_ARGS_1": "--sample_len=9"}, str(tmp_path / "s.zarr"),
                       "rank 1 disagrees with rank 0 on what to capture (sample_len 8 -> 9)"),
        "relative-out": ({"RANK_CWD_0": str(nodes[0]), "RANK_CWD_1": str(nodes[1])}, "s.zarr",
                         f"rank 1 disagrees with rank 0 on the target store ({nodes[0] / 's.zarr'} vs "),
        "dataset-missing": ({"RANK_ARGS_1": f"--dataset={tmp_path / 'nope.txt'}"}, str(tmp_path / "s.zarr"),
                            "blockcap: error: rank 1: dataset "),
    }[case]  # fmt: skip
    done = torchrun(2, [*base, f"--out={out}"], ["tests/ranked.py"], env=env)
    assert done.returncode != 0
    lines = blockcap_lines(done)
    assert len(lines) == 1 and expect in lines[0], done.stderr
    assert not (tmp_path / "s.zarr").exists() and list(nodes[0].iterdir()) == []
    assert crashkit.files(nodes[1] / "s.zarr") == other


def test_a_stalled_rank_ends_the_job_in_one_line_and_the_store_resumes(base, single, tmp_path):
    out = tmp_path / "s.zarr"
    t0 = time.monotonic()
    done = torchrun(2, [*base, f"--out={out}", "--stall_timeout=5"], ["tests/killer.py", "12"],
                    env={"KILL_RANK": "1", "KILL_SIGNAL": "STOP", "KILL_CONT_AFTER": "12"})  # fmt: skip
    assert time.monotonic() - t0 < 120
    lines = blockcap_lines(done)
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "rank 1 made no progress for 5 s" in lines[0] and "re-run the same command" in lines[0]
    done = torchrun(2, [*base, f"--out={out}"])
    assert done.returncode == 0, done.stderr
    assert crashkit.files(out) == single


LOST_PEER = """
import os, sys
sys.path.insert(0, os.getcwd())
from blockcap.core.errors import BlockcapError
from blockcap.run.dist import from_env
group = from_env()
if group.rank == 1:
    os._exit(0)
try:
    group.sum([1])
except BlockcapError as e:
    print(type(e).__name__, e)
"""


def test_a_rank_lost_in_a_collective_is_one_line_not_a_backend_traceback(tmp_path):
    from tests.s3server import free_port

    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen([sys.executable, "-c", LOST_PEER], cwd=ROOT, env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    out, err = procs[0].communicate(timeout=120)
    procs[1].wait(60)
    assert out.startswith("Interrupted interrupted: another rank of the job ended"), (out, err)
    assert "Traceback" not in err


def test_a_rank_checks_that_its_store_is_the_one_rank_0_locked(run_args, tmp_path):
    from blockcap.run.job import _same_store
    from blockcap.storage.lifecycle import Prepared
    from blockcap.storage.location import Location
    from blockcap.storage.lock import exclusive
    from blockcap.storage.metadata import read_meta

    blockcap.run(**run_args)
    loc = Location(run_args["out"])
    prepared = Prepared(read_meta(loc), [], "complete")
    assert "no lock of rank 0 beside" in str(_same_store(loc, "process 1 on host x", prepared))
    with exclusive(loc) as token:
        assert _same_store(loc, token, prepared) is None
        other = Prepared({**prepared.meta, "run_id": "another"}, [], "complete")
        assert "another store than rank 0 opened" in str(_same_store(loc, token, other))
