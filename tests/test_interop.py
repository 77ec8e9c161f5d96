"""xarray view and TransformerLens names: the same data as the reader, lazily; plain xarray opens stores."""

import sys
import warnings

import numpy as np
import pytest
import torch

from blockcap.analysis.arrays import LazyArray
from blockcap.analysis.interop import tl_lookup, to_xarray
from blockcap.core.errors import BlockcapError
from tests.conftest import small_store

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")


@pytest.fixture(scope="module")
def store(ckpt, text_file, tmp_path_factory):
    """bfloat16, every site and attention, two blocks."""
    return small_store(ckpt, text_file, tmp_path_factory.mktemp("x") / "s.zarr", dtype="bfloat16",
                       sites="all,attention", block_idx="0,2")  # fmt: skip


def expected(store, block, site):
    if site == "heads_output":
        return store.heads(block)[:].float().numpy()
    return store.site(site, block)[:].float().numpy()


def test_dataset_names_dims_and_values(store):
    ds = to_xarray(store)
    assert sorted(ds.data_vars) == sorted(f"block{b}.{s}" for b in (0, 2) for s in store.sites)
    n, T = store.n_windows, 8
    assert ds["block2.ffwd_output"].dims == ("window", "position", "embed")
    assert ds["block0.heads_output"].dims == ("window", "position", "head", "head_dim")
    assert ds["block0.heads_output"].shape == (n, T, 4, 8)
    assert ds["block0.mlp_hidden"].dims == ("window", "position", "mlp")
    assert ds["block2.attention"].dims == ("window", "head", "query", "key")
    assert ds["block2.resid_mid"].attrs["transformer_lens"] == "blocks.2.hook_resid_mid"
    for b in (0, 2):
        for s in store.sites:
            var = ds[f"block{b}.{s}"]
            assert isinstance(var.data, da.Array) and var.dtype == np.float32
            np.testing.assert_array_equal(var.values, expected(store, b, s))
    np.testing.assert_array_equal(ds["tokens"].values, store.tokens.np[:])
    np.testing.assert_array_equal(ds["offsets"].values, store.offsets.np[:])
    assert ds["committed"].values.all()


def test_reads_only_what_is_selected(store, monkeypatch):
    ds = to_xarray(store)
    reads = []
    real = LazyArray._read
    monkeypatch.setattr(
        LazyArray, "_read", lambda self, lo, hi, rows: reads.append((lo, hi)) or real(self, lo, hi, rows)
    )
    got = ds["block0.ffwd_output"].isel(window=9, position=3).values
    assert reads == [(8, 12)]  # the one chunk (4 windows) holding it, nothing else
    np.testing.assert_array_equal(got, store.site("ffwd_output", 0)[9, 3].float().numpy())
    sel = ds["block0.heads_output"].isel(window=slice(4, 12), head=2).values
    np.testing.assert_array_equal(sel, store.heads(0)[4:12, :, 2].float().numpy())


def test_dedup_store_gathers_through_prefix_rows(ckpt, text_file, tmp_path):
    d = dict(dedup=True, sample_len=4, stride=2, chunk_windows=32, sites="heads_output,mlp_hidden")
    s = small_store(ckpt, text_file, tmp_path / "d.zarr", **d)
    ds = to_xarray(s)
    assert ds.attrs["dedup"] == 1
    np.testing.assert_array_equal(ds["block0.mlp_hidden"].values, s.site("mlp_hidden")[:].numpy())
    heads = s.site("heads_output")[:].numpy().reshape(s.n_windows, 4, 4, 8)
    np.testing.assert_array_equal(ds["block0.heads_output"].values, heads)


def test_incomplete_store_marks_committed(ckpt, text_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = small_store(ckpt, text_file, tmp_path / "p.zarr", part="0/2")
    ds = to_xarray(s)
    np.testing.assert_array_equal(ds["committed"].values, s.committed_windows())
    assert not ds["block0.ffwd_output"].where(~ds["committed"], 0).values.any()  # unwritten: zeros


def test_without_xarray_is_one_line(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(
        BlockcapError, match=r"^to_xarray needs xarray and dask; install them with pip install"
    ) as e:
        to_xarray(store)
    assert "\n" not in str(e.value)


def test_plain_xarray_opens_a_store(ckpt, text_file, tmp_path, store):
    """No blockcap involved: float32 as is, bfloat16 as its uint16 bits plus an attribute."""
    plain = small_store(ckpt, text_file, tmp_path / "f.zarr", block_idx="1")
    ds = xr.open_zarr(plain.path, group="block1", consolidated=False)
    assert sorted(ds.data_vars) == ["ffwd_output", "heads_output", "proj_output"]
    assert ds["ffwd_output"].dims == ("window", "position", "embed")
    np.testing.assert_array_equal(ds["ffwd_output"].values, plain.site("ffwd_output")[:].numpy())
    root = xr.open_zarr(plain.path, consolidated=False)
    np.testing.assert_array_equal(root["tokens"].values, plain.tokens.np[:])

    bf = xr.open_zarr(store.path, group="block2", consolidated=False)  # every site: widths have own dims
    assert bf["mlp_hidden"].dims == ("window", "position", "mlp")
    assert bf["heads_output"].dims == ("window", "position", "head_features")
    bits = bf["block_output"]
    assert bits.dtype == np.uint16 and bits.attrs["blockcap_dtype"] == "bfloat16"
    widened = (bits.values.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(widened, store.site("block_output", 2)[:].float().numpy())


TL = [
    (("mlp_out", 0), "ffwd_output", 0),
    ("blocks.0.hook_attn_out", "proj_output", 0),
    (("resid_pre", 2), "block_input", 2),
    ("blocks.2.hook_resid_post", "block_output", 2),
    ("blocks.2.hook_resid_mid", "resid_mid", 2),
    ("blocks.0.mlp.hook_post", "mlp_hidden", 0),
    (("hook_post", 2), "mlp_hidden", 2),
    ("blocks.2.attn.hook_pattern", "attention", 2),
]


@pytest.mark.parametrize(("key", "site", "block"), TL, ids=[str(k) for k, _, _ in TL])
def test_transformer_lens_names(store, key, site, block):
    got = tl_lookup(store, key)
    assert isinstance(got, LazyArray) and got.name == f"block{block}/{site}"
    assert torch.equal(got[3:5], store.site(site, block)[3:5])


def test_hook_z_is_the_heads_view(store):
    z = tl_lookup(store, "blocks.2.attn.hook_z")
    assert z.shape == (store.n_windows, 8, 4, 8)
    assert torch.equal(z[:], store.heads(2)[:]) and torch.equal(tl_lookup(store, ("z", 2))[1], z[1])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("blocks.1.hook_mlp_out", "'blocks.1.hook_mlp_out' is not captured in this store; it has"),
        (("mlp_out", 5), r"\('mlp_out', 5\) is not captured in this store"),
        ("mlp_out", "'mlp_out' is not a TransformerLens name; it has"),
        ("blocks.0.hook_nope", "is not a TransformerLens name"),
        (("mlp_out", -1), "is not a TransformerLens name"),
        (("mlp_out", True), "is not a TransformerLens name"),
        (3, "3 is not a TransformerLens name"),
    ],
)
def test_unknown_names_list_the_valid_ones(store, key, message):
    with pytest.raises(BlockcapError, match=message) as e:
        tl_lookup(store, key)
    text = str(e.value)
    assert "\n" not in text and "blocks.N.hook_mlp_out" in text and "for N in 0, 2" in text


def test_tl_site_not_captured(ckpt, text_file, tmp_path):
    s = small_store(ckpt, text_file, tmp_path / "o.zarr", sites="ffwd_output")
    with pytest.raises(
        BlockcapError,
        match=r"'blocks.0.hook_resid_pre' is not captured.*has blocks.N.hook_mlp_out for N in 0,",
    ):
        tl_lookup(s, "blocks.0.hook_resid_pre")
