"""Prefix dedup: each distinct prefix computed and stored once, read back as if every window were stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import blockcap
from blockcap.data.windows import Windows
from blockcap.run.schedule import DedupSchedule
from tests import crashkit

# Dedup runs distinct windows in other batches than a plain run; on this CPU the char GPT's values
# come out bitwise equal, but batch composition may change the last bits elsewhere: this is the
# stated tolerance, relative to each site's largest magnitude.
DEDUP_TOLERANCE = 1e-6


@pytest.fixture
def pair(run_args, tmp_path) -> tuple:
    """The same short-window capture, plain and dedup (3-token windows at stride 2 repeat a lot)."""
    args = {**run_args, "sample_len": 3, "stride": 2, "sites": "all", "batch_size": 32}
    plain = blockcap.run(**{**args, "out": str(tmp_path / "plain.zarr")})
    dedup = blockcap.run(**{**args, "out": str(tmp_path / "dedup.zarr"), "dedup": True})
    return args, blockcap.open_store(plain.path), blockcap.open_store(dedup.path), dedup


def test_fewer_rows_are_stored_and_computed(pair):
    _, plain, dedup, summary = pair
    assert dedup.dedup and not plain.dedup
    n_rows = dedup.layout.n_rows
    assert n_rows < plain.n_windows * plain.sample_len / 3
    assert summary.windows_computed == n_rows and "distinct prefixes computed" in "\n".join(summary.lines())
    g = zarr.open_group(str(dedup.path), mode="r")
    assert g["block0/ffwd_output"].shape == (n_rows, 32)
    assert g["prefix_rows"].shape == (plain.n_windows, 3)


def test_reads_equal_a_plain_store(pair):
    _, plain, dedup, _ = pair
    for site in plain.sites:
        want = plain.site(site)[:]
        got = dedup.site(site)[:]
        scale = want.abs().max().clamp_min(1e-12)
        assert ((got - want).abs().max() / scale) <= DEDUP_TOLERANCE, site
        for key in (7, -1, slice(3, 40, 4), [5, 1, 5], np.arange(plain.n_windows) % 3 == 0, (slice(None), 2)):
            assert torch.allclose(
                dedup.site(site)[key], plain.site(site)[key], atol=DEDUP_TOLERANCE * scale.item()
            )
    assert torch.equal(dedup.tokens[:], plain.tokens[:]) and torch.equal(dedup.offsets[:], plain.offsets[:])
    assert [dedup.text(i) for i in range(20)] == [plain.text(i) for i in range(20)]
    assert dedup.substring(9, 1) == plain.substring(9, 1)
    a, b = list(dedup.results()), list(plain.results())
    assert [(r.window, r.position, r.substring) for r in a] == [
        (r.window, r.position, r.substring) for r in b
    ]
    assert all(
        torch.allclose(x.vectors["ffwd_output"], y.vectors["ffwd_output"], atol=1e-6)
        for x, y in zip(a, b, strict=True)
    )


def test_statistics_equal_a_plain_store(pair):
    _, plain, dedup, _ = pair
    for site in ("ffwd_output", "mlp_hidden"):
        p, d = plain.stats(site), dedup.stats(site)
        assert p.count == d.count
        np.testing.assert_allclose(d.mean, p.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(d.var, p.var, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(d.min, p.min)
        np.testing.assert_allclose(d.norm_mean, p.norm_mean, rtol=1e-6)
    assert blockcap.verify(dedup.path, check_stats=True) == []


def test_schedule_maps_every_token_to_its_prefix_row():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 3, 400).astype(np.uint8)
    w = Windows(tokens, 4, 1)
    s = DedupSchedule(w, batch_size=16)
    ids = w.get(0, len(w)).numpy()
    prefixes = {}
    for i in range(len(w)):
        for p in range(4):
            key = tuple(ids[i, : p + 1])
            row = int(s.prefix_rows[i, p])
            assert prefixes.setdefault(key, row) == row  # one row per distinct prefix ...
    assert len(prefixes) == s.n_items  # ... and one prefix per row
    for key, row in prefixes.items():  # the row's computing window starts with that prefix
        u, p = s.row_window[row], s.row_position[row]
        assert p == len(key) - 1 and tuple(s.unique[u, : p + 1].tolist()) == key
    assert s.row_weight.sum() == ids.size


@pytest.mark.slow
def test_kill_at_every_write_then_resume(ckpt, text_file, tmp_path):
    argv = ["run", f"--weights={ckpt}", f"--dataset={text_file}", "--split=val", "--sample_len=3",
            "--stride=1", "--batch_size=16", "--chunk_windows=128", "--sites=ffwd_output", "--dedup",
            "--progress=False", "--writers=1"]  # fmt: skip
    ref = tmp_path / "ref.zarr"
    assert crashkit.run([*argv, f"--out={ref}"]) == 0
    assert blockcap.open_store(ref).layout.n_units >= 3
    want = crashkit.files(ref)
    total = crashkit.count_writes([*argv, f"--out={tmp_path / 'count.zarr'}"], tmp_path)
    crashkit.kill_and_resume_each(argv, range(1, total + 1), tmp_path, want)
