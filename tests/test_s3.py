"""Stores in object storage (a local S3 server): run, resume, verify, read, overwrite, torchrun."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

import blockcap
from blockcap.cli import main
from blockcap.core.errors import BlockcapError
from blockcap.storage import lease, stops
from blockcap.storage.location import Location
from tests import crashkit
from tests.launch import ROOT, torchrun
from tests.s3server import bucket, objects, s3_server  # noqa: F401  (fixtures)


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
    done = torchrun(2, args)
    assert done.returncode == 0, done.stderr
    assert objects(s3_server["fs"], f"{bucket}/s.zarr") == local


def test_a_missing_bucket_is_named_not_taken_for_a_full_disk(args, s3_server):  # noqa: F811
    other = [a.replace("--out=s3://", "--out=s3://nosuchbucket-") for a in args]
    done = cli(other)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "bucket 'nosuchbucket-" in done.stderr and "does not exist" in done.stderr
    assert "disk space" not in done.stderr


def test_a_second_run_on_a_prefix_in_use_is_refused_in_one_line(args, s3_server, bucket, tmp_path):  # noqa: F811
    """A lease object beside the store, taken with a conditional put: the second of two identical
    commands, and an overwrite racing a run, are refused with the holder named; nothing is harmed."""
    creds = {**s3_server["options"], "key": "testing", "secret": "testing"}  # a forked child's own
    argv = [a if not a.startswith("--storage_options=") else f"--storage_options={json.dumps(creds)}"
            for a in args]  # fmt: skip
    first = crashkit.start_paused([*argv, "--writers=1"], tmp_path / "paused")
    try:
        second = cli(args)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and f"is in use by process {first.pid} on host" in err, err
        overwrite = cli([*[a.replace("--stride=20", "--stride=21") for a in args], "--overwrite"])
        assert overwrite.returncode == 2 and "is in use" in overwrite.stderr
    finally:
        (tmp_path / "paused").unlink()
        first.join(120)
    assert first.exitcode == 0
    url, opts = f"s3://{bucket}/s.zarr", s3_server["options"]
    assert blockcap.verify(url, storage_options=opts) == []
    s3_server["fs"].invalidate_cache()
    assert not s3_server["fs"].exists(f"{bucket}/.s.zarr.lock")  # released
    assert cli(args).returncode == 0


@pytest.fixture
def lease_of(s3_server, bucket, monkeypatch):  # noqa: F811
    monkeypatch.setattr(lease, "LEASE_SECONDS", 1.0)
    monkeypatch.setattr(lease, "SKEW_SECONDS", 0.2)
    monkeypatch.setattr(stops, "_GUARDS", [])  # a lease a test leaves held guards no later test
    loc = Location(f"s3://{bucket}/s.zarr", s3_server["options"])
    return lambda shared=False: lease.Lease(loc, lease.backend(loc), shared, "wait")


def test_a_lease_is_taken_over_only_after_its_holder_stops_renewing(lease_of):
    a = lease_of()
    a.acquire()
    assert a.guard() is None
    time.sleep(1.5)  # a renews it meanwhile
    with pytest.raises(lease.StoreInUse, match=r"in use by process \d+ on host .*renewed \d+ s ago"):
        lease_of().acquire()
    a.stop.set()  # a is killed: no renewal, no release
    a.thread.join()
    with pytest.raises(lease.StoreInUse, match="expires in"):
        lease_of().acquire()
    time.sleep(1.5)
    b = lease_of()
    b.acquire()  # expired: taken over
    with pytest.raises(BlockcapError, match="lost its lease"):
        a.guard()  # a, were it only paused, stops before its next write
    a.release()  # its guard goes; the lease, b's now, is left alone
    assert b.objects.read() is not None
    b.release()
    assert b.objects.read() is None


def test_two_runs_racing_for_a_free_lease_one_wins(lease_of):
    leases = [lease_of() for _ in range(6)]
    won, lost = [], []

    def take(x):
        try:
            x.acquire()
            won.append(x)
        except lease.StoreInUse:
            lost.append(x)

    threads = [threading.Thread(target=take, args=(x,)) for x in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5
    won[0].release()


def test_parts_share_a_lease_that_keeps_a_plain_run_out(lease_of):
    p0, p1 = lease_of(shared=True), lease_of(shared=True)
    p0.acquire()
    p1.acquire()
    with pytest.raises(lease.StoreInUse):
        lease_of().acquire()
    p0.release()
    with pytest.raises(lease.StoreInUse):
        lease_of().acquire()
    p1.release()
    plain = lease_of()
    plain.acquire()
    with pytest.raises(lease.StoreInUse):
        lease_of(shared=True).acquire()
    plain.release()


def test_an_object_in_the_way_of_the_lease_is_named_not_waited_for(lease_of, s3_server, bucket):  # noqa: F811
    s3_server["fs"].pipe_file(f"{bucket}/.s.zarr.lock", b"notes of mine")
    with pytest.raises(lease.StoreInUse, match=r"\.s\.zarr\.lock, is not a blockcap lease; delete it"):
        lease_of().acquire()
    assert s3_server["fs"].cat_file(f"{bucket}/.s.zarr.lock") == b"notes of mine"
