"""Bounded-error lossy storage (precision=keep_bits:N): the rounding, its measured error, the
statistics of the values as computed, and verify's re-check of all three."""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

import blockcap
from blockcap.core.errors import BlockcapError
from blockcap.core.layout import object_key
from blockcap.storage.codecs import ChunkEncoder, crc32c
from blockcap.storage.integrity import encode_record
from blockcap.storage.metadata import tag_of
from blockcap.storage.precision import bound, round_bits
from tests.conftest import small_store


def values(n: int = 300_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-40, 40, n))).astype(np.float32)
    x[:9] = [np.inf, -np.inf, np.nan, np.finfo(np.float32).max, 0.0, -0.0, 1e-45, -3e-42, 1e-39]
    return x


@pytest.mark.parametrize("keep", [1, 7, 10, 16, 22])
def test_rounding_is_bitround_and_its_error_is_measured_within_the_bound(keep):
    x = values()
    r, worst = round_bits(x, keep)
    ref = numcodecs.BitRound(keep).encode(x.copy()).view(np.float32)
    same = np.isfinite(ref) & np.isfinite(x)  # numcodecs rounds float32's largest value to inf
    assert np.array_equal(r[same].view(np.uint32), ref[same].view(np.uint32))
    assert np.array_equal(r[:3], x[:3], equal_nan=True)  # non-finite values unchanged
    assert np.isfinite(r[3]) and r[3] <= x[3]  # the largest value truncated, not rounded to inf
    fin = np.isfinite(x)
    err = np.abs(r[fin].astype(np.float64) - x[fin]) / np.maximum(np.abs(x[fin]), np.finfo(np.float32).tiny)
    assert worst == pytest.approx(err.max(), rel=1e-6) and worst <= 2 * bound(keep)
    assert err[4:].max() <= bound(keep)  # every value but the truncated one within 2^-(N+1)
    assert not (r[fin].view(np.uint32) & np.uint32((1 << (23 - keep)) - 1)).any()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"precision": "keep_bits:0"}, "precision='keep_bits:0' is unknown"),
        ({"precision": "keep_bits:23"}, "keep_bits:N with N in 1..22"),
        ({"precision": "bits:4"}, "is unknown"),
        ({"precision": "keep_bits:x"}, "is unknown"),
        ({"precision": "keep_bits:8", "dtype": "bfloat16"}, "use it with dtype=float32"),
        ({"precision": "keep_bits:8", "stats": False}, "drop stats=False"),
    ],
)
def test_bad_precision_is_one_line(kw, message):
    with pytest.raises(BlockcapError, match=message.replace("(", r"\(").replace("[", r"\[")):
        blockcap.CaptureSpec(**kw)


@pytest.fixture(scope="module")
def pair(ckpt, text_file, tmp_path_factory):
    """The same capture exact and with keep_bits:8."""
    root = tmp_path_factory.mktemp("precision")
    kw = {"sites": "heads_output,ffwd_output,attention"}
    exact = small_store(ckpt, text_file, root / "exact.zarr", **kw)
    lossy = small_store(ckpt, text_file, root / "lossy.zarr", precision="keep_bits:8", **kw)
    return exact, lossy


def test_a_lossy_store_reads_rounded_values_and_keeps_exact_statistics(pair):
    exact, lossy = pair
    assert lossy.spec.precision == "keep_bits:8" and "precision" in lossy.spec.identity()
    assert "precision" not in exact.spec.identity()  # exact at the default: the tag of stores from before it
    for site in ("heads_output", "ffwd_output"):
        x, r = exact.site(site).np[:], lossy.site(site).np[:]
        assert np.array_equal(r, round_bits(x, 8)[0])
        want, got = exact.stats(site), lossy.stats(site)  # of the values as computed
        for name in ("mean", "var", "min", "max", "norm_mean"):
            assert np.array_equal(getattr(want, name), getattr(got, name))
        err = np.abs(r.astype(np.float64) - x) / np.maximum(np.abs(x), np.finfo(np.float32).tiny)
        assert got.max_rel_error == pytest.approx(err.max(), rel=1e-6) and got.max_rel_error <= bound(8)
        assert want.max_rel_error is None
        assert lossy.site(site).zarr.attrs["precision"] == "keep_bits:8"
    assert np.array_equal(exact.site("attention").np[:], lossy.site("attention").np[:])  # kept exact
    plain = zarr.open_group(str(lossy.path), mode="r")  # plain zarr reads the rounded values
    assert np.array_equal(np.asarray(plain["block0/ffwd_output"][:]), lossy.site("ffwd_output").np[:])
    assert blockcap.verify(lossy.path, check_stats=True) == []


def test_verify_stats_finds_values_that_were_not_rounded(pair, tmp_path):
    """A unit rewritten with the exact values and a consistent commit record: only the statistics
    check can tell, from the bits and the error bound."""
    exact, lossy = pair
    import shutil

    out = tmp_path / "forged.zarr"
    shutil.copytree(lossy.path, out)
    layout, unit = lossy.layout, 1
    arrays = layout.unit_arrays()
    a = next(a for a in arrays if a.path == "block0/ffwd_output")
    lo, hi = layout.unit_range(unit)
    blob = ChunkEncoder(a.codec).chunk(exact.site("ffwd_output").np[lo:hi])
    Path(out, object_key(a, unit)).write_bytes(blob)
    digests = [
        int(v) for v in np.frombuffer(Path(out, "committed", "c", str(unit), "0").read_bytes()[:-4], "<u4")
    ]
    digests[3 + arrays.index(a)] = crc32c(blob[:-4])
    record = ChunkEncoder("none").chunk(
        encode_record(unit, tag_of(lossy.meta, lossy.layout), digests[3:])[None]
    )
    Path(out, "committed", "c", str(unit), "0").write_bytes(record)
    assert blockcap.verify(out) == []  # every object matches its record
    problems = blockcap.verify(out, check_stats=True)
    assert any("more mantissa bits than keep_bits:8" in p for p in problems), problems
