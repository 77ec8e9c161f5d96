"""Objects of a good size: object storage gets shards chosen by bytes, local disks stay unsharded,
and the dry run says how many objects there will be and how large."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import blockcap
from blockcap.core.dims import ModelDims
from blockcap.core.layout import OBJECT_MAX, OBJECT_TARGET, Layout, choose_shard_chunks
from blockcap.core.spec import CaptureSpec, resolve_sites


def layout(sites: str, T: int, n: int, chunk: int) -> Layout:
    spec = CaptureSpec(sites=sites, sample_len=T, chunk_windows=chunk, batch_size=chunk)
    spec = replace(spec, sites=resolve_sites(spec.sites, ()))  # a dense model: "all" is every vector site
    dims = ModelDims(n_layer=1, d_model=384, n_head=6, head_dim=64, d_mlp=1536, vocab_size=65, context=256)
    return Layout.build(spec, dims, n)


@pytest.mark.parametrize("sites, T, n, chunk", [("all", 256, 4000, 2), ("heads_output", 3, 10**6, 896),
                                                ("all,attention", 256, 3000, 1)])  # fmt: skip
def test_shards_average_the_target_and_stay_below_the_maximum(sites, T, n, chunk):
    base = layout(sites, T, n, chunk)
    k = choose_shard_chunks(base)
    sharded = Layout(**{**base.__dict__, "shard_chunks": k})
    data = [a for a in sharded.unit_arrays() if "/stats/" not in a.path]
    sizes = [int(np.prod(a.shards or a.chunks)) * np.dtype(a.dtype).itemsize for a in data]
    objects = len(sharded.unit_arrays()) + 1  # and the commit record
    assert max(sizes) <= OBJECT_MAX
    assert sum(sizes) / objects >= OBJECT_TARGET or max(sizes) * (k + 1) / k > OBJECT_MAX


def test_object_storage_is_sharded_automatically_and_reads_the_same(ckpt, text_file, tmp_path):
    kw = dict(weights=str(ckpt), dataset=str(text_file), sample_len=8, stride=5, batch_size=16,
              chunk_windows=4, progress=False, sites="heads_output,ffwd_output")  # fmt: skip
    local = blockcap.run(**kw, out=str(tmp_path / "local.zarr"))
    remote = blockcap.run(**kw, out="memory://auto.zarr")
    assert local.status == remote.status == "complete"
    a, b = blockcap.open_store(tmp_path / "local.zarr"), blockcap.open_store("memory://auto.zarr")
    assert a.spec.shard_chunks == 1 and b.spec.shard_chunks == b.layout.n_chunks > 1  # tiny: one shard
    assert np.array_equal(a.site("ffwd_output").np[:], b.site("ffwd_output").np[:])
    assert blockcap.verify("memory://auto.zarr") == []
    lines = blockcap.run(**kw, out="memory://dry.zarr", dry_run=True).lines()
    assert any("1 write unit of" in line and "2 site objects" in line for line in lines), lines
