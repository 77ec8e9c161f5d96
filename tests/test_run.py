"""The main job end to end: store contents, layout contract, options, existing stores."""

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import blockcap
from blockcap.capture.chargpt.capture import CharGPTCapture
from blockcap.capture.chargpt.checkpoint import load_checkpoint
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import DEFAULT_SITES
from blockcap.data.tokenizers import CharTokenizer
from blockcap.data.windows import split_tokens


def expected(run_args, blocks, sites, split="val"):
    """Windows, offsets and captures computed directly, batch by batch, without the pipeline."""
    loaded = load_checkpoint(run_args["weights"])
    tok = CharTokenizer(loaded.vocab)
    text = Path(run_args["dataset"]).read_text()
    stream = split_tokens(torch.tensor(tok.encode(text)), split)
    direct = stream.unfold(0, run_args["sample_len"], run_args["stride"])
    module = CharGPTCapture(loaded.model, blocks, sites)
    bs = run_args["batch_size"]
    with torch.inference_mode():
        parts = [module(direct[i : i + bs]) for i in range(0, len(direct), bs)]
    outs = {key: torch.cat([p[k] for p in parts]) for k, key in enumerate(module.outputs)}
    return direct, outs, tok


def test_store_matches_direct_capture(run_args):
    summary = blockcap.run(**run_args)
    direct, outs, tok = expected(run_args, (0,), DEFAULT_SITES)
    assert summary.n_windows == len(direct) and summary.status == "complete"
    s = blockcap.open_store(run_args["out"])
    assert s.complete and s.blocks == (0,) and s.sites == DEFAULT_SITES
    assert torch.equal(s.tokens[:].long(), direct)
    assert torch.equal(s.offsets[:], torch.arange(len(direct)) * run_args["stride"])
    for (b, site), value in outs.items():
        assert torch.equal(s.site(site, b)[:], value), site  # float32 storage is bit-exact
    assert s.text(3) == tok.decode(direct[3].tolist())
    assert s.substring(3, 2) == s.text(3)[:3]


def test_layout_readable_with_plain_zarr(run_args):
    blockcap.run(**{**run_args, "sites": "all,attention"})
    g = zarr.open_group(run_args["out"], mode="r")
    n, T = g["tokens"].shape
    assert g["tokens"].dtype == np.uint8
    assert g["offsets"].dtype == np.int64
    assert g["block0/ffwd_output"].shape == (n, T, 32)
    assert g["block0/mlp_hidden"].shape == (n, T, 128)
    assert g["block0/attention"].shape == (n, 4, T, T)
    assert g["block0/ffwd_output"].metadata.dimension_names == ("window", "position", "embed")
    assert g["block0/attention"].metadata.dimension_names == ("window", "head", "query", "key")
    assert g["tokens"].metadata.dimension_names == ("window", "position")
    assert [c.to_dict()["name"] for c in g["block0/ffwd_output"].compressors][-1] == "crc32c"
    committed = np.asarray(g["committed"][:])
    assert (committed[:, 0] == 0x424C4B43).all() and (committed[:, 1] == np.arange(len(committed))).all()
    assert g["committed"].attrs["objects"][:2] == ["tokens", "offsets"]
    m = g.attrs["blockcap"]
    for key in ("params", "dims", "n_windows", "tokenizer", "model", "dataset", "versions", "device",
                "started", "finished", "run_id"):  # fmt: skip
        assert key in m, key
    for key in ("model_sha256", "dataset_sha256", "split", "sample_len", "stride", "batch_size",
                "block_idx", "sites", "dtype", "codec", "compile", "chunk_windows", "stats"):  # fmt: skip
        assert key in m["params"], key
    assert m["state"] == "complete" and m["format_version"] == 3
    assert blockcap.CaptureSpec.from_params(m["params"]).sample_len == 8  # params are a CaptureSpec
    attn = np.asarray(g["block0/attention"][:5])
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)  # softmax rows
    assert np.all(np.triu(attn[0, 0], 1) == 0)  # causal
    assert g["block0/stats/ffwd_output/mean"].shape == (32,)


def test_multi_block_single_pass_equals_separate_runs(run_args, tmp_path):
    blockcap.run(**{**run_args, "block_idx": "0,2"})
    both = blockcap.open_store(run_args["out"])
    for b in (0, 2):
        alone = blockcap.run(**{**run_args, "block_idx": b, "out": str(tmp_path / f"b{b}.zarr")})
        s = blockcap.open_store(alone.path)
        for site in DEFAULT_SITES:
            assert torch.equal(s.site(site)[:], both.site(site, b)[:])


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_reduced_precision_storage(run_args, dtype, tol):
    blockcap.run(**{**run_args, "dtype": dtype})
    _, outs, _ = expected(run_args, (0,), DEFAULT_SITES)
    s = blockcap.open_store(run_args["out"])
    got = s.site("ffwd_output")[:]
    assert got.dtype == getattr(torch, dtype)
    want = outs[(0, "ffwd_output")]
    assert torch.equal(got, want.to(getattr(torch, dtype)))  # round-to-nearest, nothing else
    assert ((got.float() - want).abs() <= tol * want.abs().clamp_min(1e-3)).all()
    # numpy has float16 but no bfloat16: bfloat16 widens to float32
    assert s.site("ffwd_output").np[:2].dtype == (np.float32 if dtype == "bfloat16" else np.float16)


@pytest.mark.parametrize("codec", ["none", "zstd", "zstd:1", "blosc-zstd", "blosc-lz4:9"])
def test_codecs_round_trip(run_args, codec):
    blockcap.run(**{**run_args, "codec": codec, "sites": "proj_output"})
    _, outs, _ = expected(run_args, (0,), ("proj_output",))
    s = blockcap.open_store(run_args["out"])
    assert torch.equal(s.site("proj_output")[:], outs[(0, "proj_output")])
    assert s.params["codec"] == codec


def test_chunk_aligned_small_chunks(run_args):
    blockcap.run(**{**run_args, "chunk_windows": 8})
    _, outs, _ = expected(run_args, (0,), DEFAULT_SITES)
    g = zarr.open_group(run_args["out"], mode="r")
    assert g["block0/heads_output"].chunks[0] == 8
    assert g["committed"].shape[0] == -(-g["tokens"].shape[0] // 8)
    assert torch.equal(
        blockcap.open_store(run_args["out"]).site("heads_output")[:], outs[(0, "heads_output")]
    )


def test_reader_views_and_results(run_args):
    blockcap.run(**{**run_args, "block_idx": (0, 1)})
    s = blockcap.open_store(run_args["out"])
    heads = s.heads(1)
    assert heads.shape == (s.n_windows, 8, 4, 8)
    assert torch.equal(heads[2:4].flatten(-2), s.site("heads_output", 1)[2:4])
    records = list(s.results(block=1))
    assert len(records) == s.n_windows * 8
    r = records[8 * 5 + 3]
    assert (r.window, r.position, r.substring) == (5, 3, s.substring(5, 3))
    assert torch.equal(r.vectors["ffwd_output"], s.site("ffwd_output", 1)[5, 3])
    with pytest.raises(BlockcapError, match="pass block="):
        s.site("ffwd_output")
    with pytest.raises(BlockcapError, match="was not captured"):
        s.site("resid_mid", 0)


def test_complete_store_is_left_untouched(run_args):
    blockcap.run(**run_args)
    before = {p: p.stat().st_mtime_ns for p in Path(run_args["out"]).rglob("*")}
    again = blockcap.run(**run_args)
    assert again.status == "already complete" and again.windows_computed == 0
    after = {p: p.stat().st_mtime_ns for p in Path(run_args["out"]).rglob("*")}
    assert before == after


def test_other_parameters_refused_then_overwritten(run_args):
    blockcap.run(**run_args)
    with pytest.raises(BlockcapError, match=r"other parameters \(stride 5 -> 7"):
        blockcap.run(**{**run_args, "stride": 7})
    assert blockcap.open_store(run_args["out"]).params["stride"] == 5  # nothing lost
    blockcap.run(**{**run_args, "stride": 7, "overwrite": True})
    assert blockcap.open_store(run_args["out"]).params["stride"] == 7
    assert not Path(run_args["out"] + ".replaced").exists()


def test_fused_run_within_tolerance(run_args):
    from blockcap.capture.chargpt.capture import FUSED_TOLERANCE

    blockcap.run(**{**run_args, "fused": True})
    _, outs, _ = expected(run_args, (0,), DEFAULT_SITES)
    s = blockcap.open_store(run_args["out"])
    for site in DEFAULT_SITES:
        want = outs[(0, site)]
        assert (s.site(site)[:] - want).abs().max() <= FUSED_TOLERANCE * want.abs().max()


def test_train_split_and_all(run_args):
    for split in ("train", "all"):
        blockcap.run(**{**run_args, "split": split, "sites": "block_output", "overwrite": True})
        direct, outs, _ = expected(run_args, (0,), ("block_output",), split=split)
        s = blockcap.open_store(run_args["out"])
        assert torch.equal(s.site("block_output")[:], outs[(0, "block_output")])


def test_default_run_gives_1162_windows_on_the_real_text(real_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = blockcap.run(dataset=str(real_dataset), progress=False)
    assert summary.n_windows == 1162
    assert Path(summary.path).name == "block0_internals.zarr"
    s = blockcap.open_store(tmp_path / "block0_internals.zarr")
    assert s.site("heads_output").shape == (1162, 3, 96)
    assert s.text(0) == real_dataset.read_text()[int(0.9 * 1115394) :][:3]


def test_parts_fill_one_store_like_a_single_run(run_args, tmp_path):
    blockcap.run(**{**run_args, "chunk_windows": 16, "out": str(tmp_path / "one.zarr")})
    first = blockcap.run(**{**run_args, "chunk_windows": 16, "part": "0/2"})
    assert first.status.startswith("part 0/2 done")
    with pytest.warns(blockcap.IncompleteStoreWarning):
        half = blockcap.open_store(run_args["out"]).committed_windows()
    assert 0 < half.sum() < len(half)
    assert blockcap.run(**{**run_args, "chunk_windows": 16, "part": "1/2"}).status == "resumed and completed"
    a, b = zarr.open_group(run_args["out"], mode="r"), zarr.open_group(str(tmp_path / "one.zarr"), mode="r")
    for name in ("tokens", "offsets", "committed", "block0/heads_output", "block0/ffwd_output"):
        assert np.array_equal(a[name][:], b[name][:]), name
    with pytest.raises(BlockcapError, match="part='2/2' is not k/n"):
        blockcap.run(**{**run_args, "part": "2/2"})


@pytest.mark.slow
def test_compiled_run_within_tolerance(run_args):
    blockcap.run(**{**run_args, "compile": True, "sites": "ffwd_output"})
    _, outs, _ = expected(run_args, (0,), ("ffwd_output",))
    got = blockcap.open_store(run_args["out"]).site("ffwd_output")[:]
    torch.testing.assert_close(got, outs[(0, "ffwd_output")], rtol=1e-5, atol=1e-6)


def test_sharded_store_equals_unsharded_and_resumes(run_args, tmp_path, monkeypatch):
    plain = blockcap.run(**{**run_args, "chunk_windows": 16, "out": str(tmp_path / "plain.zarr")})
    sharded = {**run_args, "chunk_windows": 16, "shard_chunks": 3}
    from blockcap.storage.location import Location

    calls, put = [], Location.put

    def fail_on_second_commit(self, key, data, finishing=False):
        if key.startswith("committed/c/"):
            calls.append(key)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        put(self, key, data, finishing)

    monkeypatch.setattr(Location, "put", fail_on_second_commit)
    with pytest.raises(BlockcapError, match="No space left"):
        blockcap.run(**sharded, writers=1)
    assert calls[0] == "committed/c/0/0"  # one record commits a whole shard of three chunks
    monkeypatch.undo()
    assert blockcap.run(**sharded).status == "resumed and completed"
    a, b = zarr.open_group(run_args["out"], mode="r"), zarr.open_group(str(plain.path), mode="r")
    assert a["block0/ffwd_output"].shards == (48, 8, 32)
    for name in ("tokens", "offsets", "block0/heads_output", "block0/ffwd_output"):
        assert np.array_equal(a[name][:], b[name][:]), name
    files = [p for p in Path(run_args["out"], "block0", "ffwd_output").rglob("*") if p.is_file()]
    assert len(files) == 1 + -(-b["block0/ffwd_output"].shape[0] // 48)  # zarr.json + one file a shard
    assert blockcap.verify(run_args["out"]) == []
    s = blockcap.open_store(run_args["out"])
    assert torch.equal(
        s.site("ffwd_output")[5:40:3], blockcap.open_store(plain.path).site("ffwd_output")[5:40:3]
    )
