"""The data path at scale: a sharded corpus in object storage, and torchrun ranks that share one
token cache (one builder, the others waiting) and hold only their own windows."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import blockcap
from blockcap.analysis.tokens import TOKENS_NOT_CHECKED
from tests import crashkit
from tests.conftest import make_text
from tests.launch import ROOT, torchrun
from tests.s3server import bucket, s3_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def shards(fs, prefix: str, n: int = 3) -> list[str]:
    docs = [make_text(400 + 37 * i, seed=i) for i in range(30)]
    for k in range(n):
        body = "".join(json.dumps({"text": d}) + "\n" for d in docs[k::n]).encode()
        fs.pipe(f"{prefix}/shard-{k}.jsonl.gz", gzip.compress(body))
    return [d for k in range(n) for d in docs[k::n]]


def test_a_sharded_corpus_in_object_storage(ckpt, s3_server, bucket, tmp_path):  # noqa: F811
    fs = s3_server["fs"]
    docs = shards(fs, f"{bucket}/corpus")
    local = tmp_path / "corpus.jsonl"
    local.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = dict(weights=str(ckpt), split="all", sample_len=8, stride=5, progress=False)
    remote = blockcap.run(**common, dataset=f"s3://{bucket}/corpus/", out=str(tmp_path / "r.zarr"),
                          dataset_storage_options=s3_server["json"])  # fmt: skip
    reference = blockcap.run(**common, dataset=str(local), out=str(tmp_path / "l.zarr"))
    r, ref = blockcap.open_store(remote.path), blockcap.open_store(reference.path)
    assert np.array_equal(r.tokens.np[:], ref.tokens.np[:])
    assert np.array_equal(r.site("ffwd_output").np[:], ref.site("ffwd_output").np[:])
    files = r.meta["dataset"]["files"]
    assert [f["path"].rsplit("/", 1)[-1] for f in files] == [f"shard-{k}.jsonl.gz" for k in range(3)]
    assert all(f["sha256"].startswith("etag:") for f in files)
    assert r.source(r.n_windows - 1)["file"].endswith("shard-2.jsonl.gz")
    # verify reads the tokens again from the bucket, with the options the run took
    opts = s3_server["json"]
    assert blockcap.verify(remote.path, dataset_storage_options=opts) == []
    missing = blockcap.verify(remote.path, dataset=f"s3://{bucket}/nothing/", dataset_storage_options=opts)
    assert len(missing) == 1 and missing[0].startswith(TOKENS_NOT_CHECKED), missing
    fs.pipe(f"{bucket}/corpus/shard-0.jsonl.gz", gzip.compress(b'{"text": "changed"}\n'))
    changed = blockcap.verify(remote.path, dataset_storage_options=opts)
    assert len(changed) == 1 and "is not the one the store was captured from" in changed[0], changed


RSS = """
import atexit, os, pathlib, resource, runpy, sys
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = pathlib.Path(os.environ["RSS_DIR"]) / f"rank{os.environ['RANK']}"
atexit.register(lambda: report.write_text(str(peak())))
sys.argv = ["blockcap", *sys.argv[1:]]
runpy.run_module("blockcap", run_name="__main__")
"""


def rss_torchrun(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Two ranks of ``blockcap`` and each one's peak RSS in KiB, reported in a file of its own (``RSS``):
    the ranks share torchrun's stderr, where their lines can interleave."""
    script, reports = tmp_path / "rss_main.py", tmp_path / "rss"
    script.write_text(RSS)
    reports.mkdir(exist_ok=True)
    for old in reports.iterdir():
        old.unlink()
    env = {"PYTHONPATH": str(ROOT), "RSS_DIR": str(reports)}
    done = torchrun(2, args, [str(script)], env=env, timeout=600)
    return done, [int(p.read_text()) for p in sorted(reports.iterdir())]


def test_two_ranks_share_one_cache_build_and_hold_only_their_windows(ckpt, tmp_path):
    text = make_text(1 << 20)
    sizes = {}
    for mb in (4, 16):
        corpus = tmp_path / f"c{mb}.txt"
        corpus.write_text(text * mb)
        cache = tmp_path / f"tokens{mb}"
        args = ["run", f"--weights={ckpt}", f"--dataset={corpus}", "--split=all", "--sample_len=8",
                "--stride=100000", "--batch_size=4", f"--token_cache={cache}", "--progress=False",
                f"--out={tmp_path / f'two{mb}.zarr'}"]  # fmt: skip
        done, rss = rss_torchrun(args, tmp_path)
        assert done.returncode == 0, done.stderr
        built = [p for p in cache.iterdir() if p.is_dir()]
        assert len(built) == 1  # one build for both ranks
        assert len(rss) == 2
        sizes[mb] = max(rss)
        one = tmp_path / f"one{mb}.zarr"
        assert crashkit.run([*args[:-1], f"--out={one}"]) == 0
        assert crashkit.files(one) == crashkit.files(tmp_path / f"two{mb}.zarr")
    assert sizes[16] < 1.15 * sizes[4], sizes  # 4x the corpus, about the same peak per rank
