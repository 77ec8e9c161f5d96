"""Hostile review, round 5: attention split along queries (query_chunk) and group commit."""

from __future__ import annotations

import errno
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import blockcap
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import object_keys
from blockcap.run import job, plan
from blockcap.storage import durable
from blockcap.storage import location as loc
from tests import crashkit
from tests.hf_models import NEEDS_TRANSFORMERS

SITES = "ffwd_output,attention"


def test_a_store_of_the_previous_version_resumes_with_the_same_command(run_args, monkeypatch):
    """Before query_chunk, an attention chunk over the object target was stored whole and the store's
    params had no query_chunk. The same command must still resume (or find complete) such a store
    (the plan picked a split, the identity differed and the run was refused with
    'holds a capture with other parameters (query_chunk None -> 4)')."""
    args = {**run_args, "sites": SITES, "chunk_windows": 1}
    monkeypatch.setattr(plan, "TARGET_CHUNK_BYTES", 600)  # the tiny model's window pattern is 1 KB
    monkeypatch.setattr(plan, "choose_query_chunk", lambda *a: None)  # as the previous version chose
    blockcap.run(**args)
    monkeypatch.undo()
    monkeypatch.setattr(plan, "TARGET_CHUNK_BYTES", 600)
    assert blockcap.run(**args).status == "already complete"


def test_a_dropped_query_chunk_resumes_and_a_dropped_precision_is_named(run_args):
    """A store made with query_chunk=3, re-run without it, keeps its layout (the same store); one
    made with precision=keep_bits:8, re-run without it, is refused naming precision (it said
    'holds a capture with other parameters ()': a field at its default is left out of the new
    identity, and differences() walked only the new one)."""
    blockcap.run(**{**run_args, "sites": SITES, "chunk_windows": 4, "query_chunk": 3})
    assert blockcap.run(**{**run_args, "sites": SITES, "chunk_windows": 4}).status == "already complete"
    other = {**run_args, "out": run_args["out"] + ".lossy"}
    blockcap.run(**{**other, "precision": "keep_bits:8"})
    with pytest.raises(BlockcapError, match=r"other parameters \(precision 'keep_bits:8' -> 'exact'\)"):
        blockcap.run(**other)


@pytest.mark.parametrize("value", [0, -3, 10**9, "3", 3.0, True, [3], None, 2, 4, 7])
def test_a_hostile_root_query_chunk_never_reads_wrong_data(run_args, value):
    """The root's params say another query_chunk than the store was written with: every read is an
    error (bad value, or records of another layout), never data."""
    args = {**run_args, "sites": SITES, "chunk_windows": 4, "query_chunk": 5, "sample_len": 7}
    blockcap.run(**args)
    root = Path(args["out"]) / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["blockcap"]["params"]["query_chunk"] = value
    root.write_text(json.dumps(doc))
    with pytest.raises(BlockcapError):
        blockcap.open_store(args["out"]).site("attention", 0)[:]
    assert blockcap.verify(args["out"]) != []


@pytest.mark.parametrize("kth", [40, 120])
def test_a_failed_sync_commits_nothing_after_it_and_resumes_identically(run_args, monkeypatch, kth, tmp_path):
    """An fsync fails (EIO) in the committer: one BlockcapError, no record for a unit whose objects
    were not synced, and the resume equals an uninterrupted store byte for byte."""
    args = {**run_args, "sites": SITES, "chunk_windows": 4, "query_chunk": 3, "writers": 2}
    ref = tmp_path / "ref.zarr"
    blockcap.run(**{**args, "out": str(ref)})
    lock, dirty, calls, bad = threading.Lock(), set(), [0], []
    layout = {}
    fsync, put, init = durable.fsync_path, loc.Location.put, job.SlabWriter.__init__

    def failing_fsync(p):
        with lock:
            calls[0] += 1
            fail = calls[0] == kth
        if fail:
            raise OSError(errno.EIO, "injected")
        fsync(p)
        with lock:
            dirty.discard(str(p))

    def tracking_put(self, key, data, finishing=False):
        if key.startswith("committed/c/") and "l" in layout:
            unit = int(key.split("/")[2])
            with lock:
                bad.extend(
                    k
                    for a in layout["l"].unit_arrays()
                    for k in object_keys(a, unit)
                    if str(self.root / k) in dirty
                )
        put(self, key, data, finishing)
        with lock:
            dirty.add(str(self.root / key))

    def writer_init(self, location, lay, *a, **kw):
        layout["l"] = lay
        init(self, location, lay, *a, **kw)

    monkeypatch.setattr(durable, "fsync_path", failing_fsync)
    monkeypatch.setattr(loc.Location, "put", tracking_put)
    monkeypatch.setattr(job.SlabWriter, "__init__", writer_init)
    with pytest.raises(BlockcapError, match="injected"):
        blockcap.run(**args)
    assert bad == []
    monkeypatch.undo()
    assert blockcap.run(**args).status == "resumed and completed"
    assert crashkit.files(Path(args["out"])) == crashkit.files(ref)
    assert crashkit.leftovers(Path(args["out"])) == []


@pytest.mark.slow
@NEEDS_TRANSFORMERS
@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_hf_attention_split_equals_whole(hf_zoo, hf_text, tmp_path, variant):
    """A Hugging Face model's attention split along queries (7 rows of 12, edge piece padded) reads
    equal to the same capture kept whole, through the lazy reader, plain zarr and xarray."""
    import zarr

    common = dict(model=str(hf_zoo(variant)), dataset=str(hf_text), block_idx="all", sites=SITES,
                  sample_len=12, stride=9, batch_size=8, chunk_windows=4, progress=False)  # fmt: skip
    whole, split = tmp_path / "whole.zarr", tmp_path / "split.zarr"
    blockcap.run(**common, out=str(whole))
    blockcap.run(**common, out=str(split), query_chunk=7, shard_chunks=2)
    a, b = blockcap.open_store(whole), blockcap.open_store(split)
    for block in a.blocks:
        want = a.site("attention", block).np[:]
        assert np.array_equal(b.site("attention", block).np[:], want)
        assert np.array_equal(b.site("attention", block).np[[3, 1], 2, 5:], want[[3, 1], 2, 5:])
        g = zarr.open_group(str(split), mode="r")
        assert np.array_equal(np.asarray(g[f"block{block}/attention"][:]), want)
        assert torch.equal(b.site("ffwd_output", block)[:], a.site("ffwd_output", block)[:])
    assert np.array_equal(
        b.to_xarray()[f"block{a.blocks[0]}.attention"].values, a.site("attention", a.blocks[0]).np[:]
    )
    assert blockcap.verify(split) == []
    shutil.rmtree(tmp_path / "whole.zarr")


@pytest.mark.parametrize(
    "field, value, fact",
    [("query_chunk", 0, "query_chunk 0 is out of range"),  # one field
     ("dedup", True, "dedup True and sites with attention: attention cannot be deduplicated"),  # two
     ("model", "gpt2", "model 'gpt2' and weights '"),  # the other field named as data too
     ("revision", "main", "revision 'main' is for a Hugging Face model")],
)  # fmt: skip
def test_a_damaged_root_param_is_named_as_the_store_s_not_as_an_option(run_args, capsys, field, value, fact):
    """A root whose params fail validation is damage in the store, not a flag the user passed: it
    said '--query_chunk=0 is out of range; use an integer 1..8'. The validator raises the field,
    value and problem as data (``BadValue``); the store's wording takes them, without advice."""
    from blockcap.cli import main

    args = {**run_args, "sites": SITES, "chunk_windows": 4, "query_chunk": 3}
    blockcap.run(**args)
    root = Path(args["out"]) / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["blockcap"]["params"][field] = value
    root.write_text(json.dumps(doc))
    with pytest.raises(SystemExit) as e:
        main(["info", args["out"]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "drop" not in err, err
    assert f"metadata is damaged: its recorded params are not a capture ({fact}" in err
    assert "=" not in err.split("not a capture (", 1)[1], err  # no field worded as an option
    with pytest.raises(BlockcapError, match="metadata is damaged"):  # a run that cannot rebuild the root
        blockcap.run(**args, part="0/2")
    assert blockcap.run(**args).status == "resumed and completed"  # its own command rebuilds the root
    assert blockcap.verify(args["out"]) == []
