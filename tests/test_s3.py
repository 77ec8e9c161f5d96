"""Stores in object storage (a local S3 server): run, resume, verify, read, overwrite, torchrun."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import blockcap
from blockcap.cli import main
from blockcap.core.errors import BlockcapError
from tests import crashkit
from tests.s3server import bucket, objects, s3_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def args(ckpt, text_file, s3_server, bucket) -> list[str]:  # noqa: F811
    return [
        "run", f"--weights={ckpt}", f"--dataset={text_file}", "--split=all", "--sample_len=8", "--stride=20",
        "--batch_size=16", "--chunk_windows=16", "--shard_chunks=1", "--sites=heads_output,ffwd_output",
        "--progress=False",
        f"--out=s3://{bucket}/s.zarr", f"--storage_options={s3_server['json']}",
    ]  # fmt: skip


@pytest.fixture
def local(args, tmp_path) -> dict[str, bytes]:
    """The same capture into a local directory: the objects must be byte for byte these files."""
    out = tmp_path / "local.zarr"
    flags = [a for a in args if not a.startswith(("--out=", "--storage_options="))]
    assert crashkit.run([*flags, f"--out={out}"]) == 0
    return crashkit.files(out)


def cli(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI in this process (fast: torch is imported once), as a finished process would report it."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_run_read_verify(args, local, s3_server, bucket):  # noqa: F811
    assert cli(args).returncode == 0
    url, opts = f"s3://{bucket}/s.zarr", s3_server["options"]
    assert objects(s3_server["fs"], f"{bucket}/s.zarr") == local
    s = blockcap.open_store(url, storage_options=opts)
    assert s.complete and s.site("ffwd_output")[3:9:2].shape == (3, 8, 32)
    g = zarr.open_group(url, mode="r", storage_options=opts)  # plain zarr + fsspec
    assert np.array_equal(np.asarray(g["block0/ffwd_output"][:]), s.site("ffwd_output").np[:])
    assert blockcap.verify(url, storage_options=opts) == []
    info = cli(["info", url, f"--storage_options={s3_server['json']}"])
    assert info.returncode == 0 and "state: complete" in info.stdout
    again = cli(args)
    assert again.returncode == 0 and "already complete" in again.stdout


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal(args, local, s3_server, bucket):  # noqa: F811
    killed = subprocess.run([sys.executable, "tests/killer.py", "40", *args], cwd=ROOT, capture_output=True)
    assert killed.returncode == -9
    with pytest.warns(blockcap.IncompleteStoreWarning):
        assert not blockcap.open_store(f"s3://{bucket}/s.zarr", storage_options=s3_server["options"]).complete
    assert cli(args).returncode == 0
    assert objects(s3_server["fs"], f"{bucket}/s.zarr") == local


def test_verify_catches_a_corrupted_and_a_missing_object(args, s3_server, bucket):  # noqa: F811
    assert cli(args).returncode == 0
    fs, url, opts = s3_server["fs"], f"s3://{bucket}/s.zarr", s3_server["options"]
    key = f"{bucket}/s.zarr/block0/ffwd_output/c/1/0/0"
    data = bytearray(fs.cat_file(key))
    data[100] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    fs.rm_file(f"{bucket}/s.zarr/tokens/c/2/0")
    problems = blockcap.verify(url, storage_options=opts)
    assert any("block0/ffwd_output: chunk 1" in p and "differs" in p for p in problems), problems
    assert any("tokens: chunk 2" in p and "missing" in p for p in problems), problems
    s = blockcap.open_store(url, storage_options=opts)
    with pytest.raises(BlockcapError, match="block0/ffwd_output: chunk 1"):
        s.site("ffwd_output")[20]
    assert cli(args).returncode == 0  # a run puts back what went missing (corruption needs verify)
    assert not any("tokens: chunk 2" in p for p in blockcap.verify(url, storage_options=opts))


def test_overwrite_copies_the_old_store_aside_until_the_new_one_completes(args, s3_server, bucket):  # noqa: F811
    assert cli(args).returncode == 0
    fs = s3_server["fs"]
    other = [a.replace("--stride=20", "--stride=21") for a in args]
    refused = cli(other)
    assert refused.returncode == 2 and "other parameters (stride 20 -> 21" in refused.stderr
    assert cli([*other, "--overwrite"]).returncode == 0
    s = blockcap.open_store(f"s3://{bucket}/s.zarr", storage_options=s3_server["options"])
    assert s.complete and s.params["stride"] == 21
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/s.zarr.replaced")


@pytest.mark.slow
def test_torchrun_two_ranks_into_one_bucket(args, local, s3_server, bucket):  # noqa: F811
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "blockcap",
    ]
    done = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert objects(s3_server["fs"], f"{bucket}/s.zarr") == local
