"""Statistics partials and their merge against numpy in float64 over the whole data."""

import numpy as np
import pytest

from blockcap.storage.stats import merge, partial

T = 5


def merged(x: np.ndarray, splits: list[int], weights: np.ndarray | None = None):
    """Partials over ``x`` cut at ``splits`` (as units would be), merged; position = row % T."""
    pos = np.arange(len(x)) % T
    cuts = [0, *splits, len(x)]
    rows = [
        partial(x[a:b], pos[a:b], T, None if weights is None else weights[a:b])
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    return merge(rows, x.shape[1], T)


@pytest.mark.parametrize(
    "mean, std, rows, splits",
    [(0.0, 1.0, 1001, [17, 500]), (3.0, 0.5, 1, []), (1e4, 0.01, 10_000, [4096]), (-7.0, 2.0, 160, [16, 32])],
)
def test_equal_numpy_in_float64(mean, std, rows, splits):
    rng = np.random.default_rng(0)
    x = (mean + std * rng.standard_normal((rows, 6))).astype(np.float32)
    st, ref = merged(x, splits), x.astype(np.float64)
    assert st.count == rows
    np.testing.assert_allclose(st.mean, ref.mean(0), rtol=1e-12, atol=1e-12 * std)
    np.testing.assert_allclose(st.var, ref.var(0), rtol=1e-9, atol=1e-300)
    assert np.array_equal(st.min, ref.min(0)) and np.array_equal(st.max, ref.max(0))
    counts = np.bincount(np.arange(rows) % T, minlength=T)
    sums = np.bincount(np.arange(rows) % T, np.linalg.norm(ref, axis=1), T)
    seen = counts > 0
    np.testing.assert_allclose(st.norm_mean[seen], sums[seen] / counts[seen], rtol=1e-6)


@pytest.mark.parametrize("rows", [1001, 4097, 16])
def test_a_constant_channel_has_variance_exactly_zero(rows):
    x = np.full((rows, 3), -51.549, np.float32)
    x[:, 1] = 123.456
    st = merged(x, [rows // 3])
    assert np.array_equal(st.var, np.zeros(3)) and np.allclose(st.mean, x[0].astype(np.float64))


def test_weighted_rows_equal_repeated_rows():
    """Dedup stores weight each prefix row by how many tokens share it."""
    rng = np.random.default_rng(1)
    x = (50 + rng.standard_normal((50, 4))).astype(np.float32)
    w = rng.integers(1, 9, 50).astype(np.float64)
    pos = np.arange(50) % T
    weighted = merge([partial(x, pos, T, w)], 4, T)
    repeated = merge([partial(np.repeat(x, w.astype(int), 0), np.repeat(pos, w.astype(int)), T)], 4, T)
    assert weighted.count == repeated.count
    np.testing.assert_allclose(weighted.mean, repeated.mean, rtol=1e-13)
    np.testing.assert_allclose(weighted.var, repeated.var, rtol=1e-9)
    np.testing.assert_allclose(weighted.norm_mean, repeated.norm_mean, rtol=1e-12)
