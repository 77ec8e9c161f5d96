"""Attention patterns split along their query axis: one object per piece, read and verified as one."""

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import blockcap
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import OBJECT_TARGET, TARGET_CHUNK_BYTES, choose_query_chunk
from blockcap.run import plan
from tests import crashkit
from tests.test_run import expected

SITES = "ffwd_output,attention"


def pieces_of(store: Path, unit: int) -> list[Path]:
    return sorted((store / "block0/attention/c" / str(unit) / "0").glob("*/0"))


@pytest.fixture
def split(run_args):
    """A store whose attention is split into pieces of 3 query rows (8-token windows: 3, 3, 2)."""
    args = {**run_args, "sites": SITES, "query_chunk": 3, "chunk_windows": 4}
    blockcap.run(**args)
    return args


def test_every_read_equals_the_direct_capture(split):
    store = Path(split["out"])
    direct, outs, _ = expected(split, (0,), ("ffwd_output", "attention"))
    s = blockcap.open_store(store)
    attn = s.site("attention", 0)
    want = outs[(0, "attention")]
    assert attn.shape == want.shape and torch.equal(attn[:], want)
    for key in (5, -1, slice(3, 11), slice(None, None, -3), [0, 9, 2], (slice(1, 6), 2, slice(4, 8))):
        assert np.array_equal(attn.np[key], want.numpy()[key]), key
    assert torch.equal(s.site("ffwd_output", 0)[:], outs[(0, "ffwd_output")])
    g = zarr.open_group(str(store), mode="r")  # plain zarr: the pieces are chunks of its own grid
    assert g["block0/attention"].chunks == (4, 4, 3, 8)
    assert np.array_equal(np.asarray(g["block0/attention"][:]), want.numpy())
    assert g["committed"].attrs["objects"].count("block0/attention") == 3
    assert [p.parent.name for p in pieces_of(store, 0)] == ["0", "1", "2"]
    assert blockcap.verify(store) == []
    assert np.array_equal(s.to_xarray()["block0.attention"].values, want.numpy())


def test_a_damaged_or_missing_piece_is_named_and_a_resume_rewrites_it(split):
    store = Path(split["out"])
    middle = pieces_of(store, 1)[1]
    raw = bytearray(middle.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    middle.write_bytes(bytes(raw))
    s = blockcap.open_store(store)
    with pytest.raises(blockcap.DamagedError, match="attention"):
        s.site("attention", 0)[5]
    assert torch.equal(s.site("attention", 0)[0], s.site("attention", 0)[:4][0])  # other units read
    problems = blockcap.verify(store)
    assert any("block0/attention/c/1/0/1/0" in p and "differs" in p for p in problems), problems
    pieces_of(store, 2)[2].unlink()
    problems = blockcap.verify(store)
    assert any("block0/attention/c/2/0/2/0" in p and "missing" in p for p in problems), problems
    blockcap.verify(store, repair=True)
    assert blockcap.run(**split).status == "resumed and completed"
    assert blockcap.verify(store) == []
    _, outs, _ = expected(split, (0,), ("ffwd_output", "attention"))
    assert torch.equal(blockcap.open_store(store).site("attention", 0)[:], outs[(0, "attention")])


def test_sharded_pieces_read_the_same(split, tmp_path):
    args = {**split, "out": str(tmp_path / "sharded.zarr"), "shard_chunks": 2}
    blockcap.run(**args)
    a, b = blockcap.open_store(split["out"]), blockcap.open_store(args["out"])
    assert torch.equal(a.site("attention", 0)[:], b.site("attention", 0)[:])
    g = zarr.open_group(args["out"], mode="r")
    assert g["block0/attention"].shards == (8, 4, 3, 8)
    assert np.array_equal(np.asarray(g["block0/attention"][:]), a.site("attention", 0).np[:])
    assert blockcap.verify(args["out"]) == []


def test_chosen_when_one_window_exceeds_the_object_target(run_args, monkeypatch):
    assert choose_query_chunk(32, 2048, 4, 1, TARGET_CHUNK_BYTES) == 16  # 512 MB a window -> 4 MB pieces
    assert choose_query_chunk(32, 2048, 4, 1, OBJECT_TARGET) == 64  # object storage: 16 MB pieces
    assert choose_query_chunk(6, 512, 4, 1, TARGET_CHUNK_BYTES) == 256  # two equal pieces, not 341 + 171
    assert choose_query_chunk(6, 256, 4, 1, TARGET_CHUNK_BYTES) is None  # 1.5 MB: whole windows
    monkeypatch.setattr(plan, "TARGET_CHUNK_BYTES", 600)  # the tiny model's window: 4 x 8 x 8 x 4 = 1 KB
    args = {**run_args, "sites": SITES, "chunk_windows": 1}
    s = blockcap.open_store(blockcap.run(**args).path)
    assert s.params["query_chunk"] == 4
    _, outs, _ = expected(run_args, (0,), ("ffwd_output", "attention"))
    assert torch.equal(s.site("attention", 0)[:], outs[(0, "attention")])
    assert blockcap.run(**args).status == "already complete"  # a re-run resolves the same


def test_whole_windows_keep_the_layout_and_params_of_before(run_args):
    blockcap.run(**{**run_args, "sites": SITES})
    s = blockcap.open_store(run_args["out"])
    assert s.params["query_chunk"] is None
    assert "query_chunk" not in blockcap.CaptureSpec.from_params(s.params).identity()
    assert zarr.open_group(run_args["out"], mode="r")["block0/attention"].chunks[2:] == (8, 8)


@pytest.mark.parametrize(
    "value, match",
    [(0, "query_chunk=0 is out of range"), (9, "query_chunk=9 is out of range"), ("x", "not an integer"),
     (True, "query_chunk=True")],
)  # fmt: skip
def test_bad_values_are_one_line(run_args, value, match):
    with pytest.raises(BlockcapError, match=match):
        blockcap.run(**{**run_args, "sites": SITES, "query_chunk": value})
    assert not Path(run_args["out"]).exists()


def test_without_attention_it_is_refused(run_args):
    with pytest.raises(BlockcapError, match="add attention to sites or drop query_chunk"):
        blockcap.run(**{**run_args, "query_chunk": 2})


@pytest.mark.slow
def test_kills_while_writing_pieces_then_resume(ckpt, text_file, tmp_path):
    base = ["run", f"--weights={ckpt}", f"--dataset={text_file}", "--sample_len=8", "--stride=5",
            "--batch_size=16", "--chunk_windows=4", f"--sites={SITES}", "--query_chunk=3",
            "--progress=False"]  # fmt: skip
    ref = tmp_path / "ref.zarr"
    assert crashkit.run([*base, f"--out={ref}"]) == 0
    reference = crashkit.files(ref)
    total = crashkit.count_writes([*base, f"--out={tmp_path / 'count.zarr'}"], tmp_path, partial=True)
    kills = sorted(set(np.linspace(2, total - 1, 12).astype(int).tolist()))
    crashkit.kill_and_resume_each(base, kills, tmp_path, reference, partial=True)


def test_dry_run_counts_every_piece(run_args):
    args = {**run_args, "sites": SITES, "query_chunk": 3, "chunk_windows": 4}
    report = blockcap.run(**args, dry_run=True)
    blockcap.run(**args)
    files = [p for p in Path(args["out"]).rglob("*") if p.is_file()]
    assert report.estimate.objects == len(files)
    units = -(-blockcap.open_store(args["out"]).n_windows // 4)
    assert report.estimate.site_objects == units * (1 + 3)  # ffwd_output, and attention in three pieces
