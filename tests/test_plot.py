"""The one-page site report: its numbers match the store and numpy, and it is a sane PNG."""

import struct
import sys

import numpy as np
import pytest

import blockcap
import blockcap.cli
from blockcap.analysis.plot import plot, report_data
from blockcap.core.errors import BlockcapError
from tests.conftest import small_store

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(ckpt, text_file, tmp_path_factory):
    return small_store(ckpt, text_file, tmp_path_factory.mktemp("p") / "s.zarr", block_idx="0,1", sites="all")


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return len(data), struct.unpack(">II", data[16:24])


def test_writes_a_sane_png(store, tmp_path, capsys):
    out = tmp_path / "r.png"
    assert plot(store, "mlp_hidden", 1, out=str(out), sample=500) == out
    nbytes, (width, height) = png_size(out)
    assert 20_000 < nbytes < 2_000_000 and (width, height) == (1200, 900)
    assert capsys.readouterr().out == ""  # the library prints nothing; the CLI says what it wrote


def test_numbers_match_the_store(store):
    r = report_data(store, "resid_mid", 0, sample=300, seed=3)
    st = store.stats("resid_mid", 0)
    np.testing.assert_array_equal(r.norm_mean, st.norm_mean)
    np.testing.assert_array_equal(r.channel_mean, st.mean)
    np.testing.assert_array_equal(r.channel_std, st.std)
    assert len(r.values) == 300 and len(set(zip(r.window, r.position, strict=True))) == 300
    x = store.site("resid_mid", 0).np[:]
    np.testing.assert_array_equal(r.values, x[r.window, r.position])
    tokens = store.tokens.np[:]
    assert r.tokens == [store.tokenizer.decode([t]) for t in tokens[r.window, r.position]]
    centred = r.values.astype(np.float64) - r.values.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    for i in range(2):  # components are defined up to their sign
        ref = centred @ vt[i]
        np.testing.assert_allclose(r.pca[:, i] * np.sign(r.pca[:, i] @ ref), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.explained, s[:2] ** 2 / (s**2).sum())


def test_sample_is_reproducible_and_capped(store):
    a, b = report_data(store, "ffwd_output", 1, 64, seed=1), report_data(store, "ffwd_output", 1, 64, seed=1)
    assert np.array_equal(a.window, b.window) and np.array_equal(a.position, b.position)
    c = report_data(store, "ffwd_output", 1, 64, seed=2)
    assert not (np.array_equal(a.window, c.window) and np.array_equal(a.position, c.position))
    assert len(report_data(store, "ffwd_output", 1, 10**6).values) == store.n_windows * 8


BAD = [
    (dict(site="attention"), "site 'attention' was not captured"),
    (dict(site="nope"), "site 'nope' was not captured"),
    (dict(block=None), r"holds blocks \[0, 1\]; pass block="),
    (dict(block=4), "block 4 was not captured"),
    (dict(sample=1), "sample=1 is out of range; use an integer 2 or more"),
    (dict(sample=True), "sample=True is out of range"),
    (dict(out="r.jpg"), "out='r.jpg' is not a .png file in an existing directory"),
    (dict(out="/no/such/dir/r.png"), "out='/no/such/dir/r.png' is not a .png file"),
    (dict(seed=-1), "seed=-1 is not an integer 0 or more"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_one_line(store, tmp_path, capsys, change, message):
    kw = {"site": "ffwd_output", "block": 0, "out": str(tmp_path / "r.png"), **change}
    with pytest.raises(BlockcapError, match=message) as e:
        plot(store, **kw)
    assert "\n" not in str(e.value) and capsys.readouterr().out == ""
    assert not (tmp_path / "r.png").exists()


def test_needs_statistics_and_matplotlib(ckpt, text_file, tmp_path, monkeypatch):
    out = str(tmp_path / "r.png")
    with pytest.raises(BlockcapError, match="has no statistics for block0/ffwd_output"):
        plot(small_store(ckpt, text_file, tmp_path / "n.zarr", stats=False), out=out)
    with pytest.raises(BlockcapError, match="is incomplete: its statistics are written when it completes"):
        plot(small_store(ckpt, text_file, tmp_path / "i.zarr", part="0/2"), out=out)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        BlockcapError, match=r"^plot needs matplotlib; install it with pip install 'blockcap\[plot\]'$"
    ):
        plot(str(tmp_path / "n.zarr"), out=out)


# --- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def cli():
    return blockcap.cli.main


def test_cli(store, cli, tmp_path, capsys):
    out = tmp_path / "cli.png"
    cli(["plot", str(store.path), "--site=block_output", "--block=0", f"--out={out}", "--sample=200"])
    assert capsys.readouterr().out.startswith(f"wrote {out}")
    assert png_size(out)[1] == (1200, 900)


def test_cli_bad_input(store, cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["plot", str(store.path), "--block=0", "--sample=1", f"--out={tmp_path / 'x.png'}"])
    assert e.value.code == blockcap.cli.EXIT_ERROR
    out, err = capsys.readouterr()
    assert out == "" and "sample=1 is out of range" in err and err.count("\n") == 1


def test_cli_old_option_name_still_works(store, cli, tmp_path, capsys):
    out = tmp_path / "old.png"
    cli(["plot", str(store.path), "--block_idx=0", f"--out={out}", "--sample=200"])
    captured = capsys.readouterr()
    assert captured.err == "blockcap: note: --block_idx is renamed --block for plot\n"
    assert captured.out.startswith(f"wrote {out}")
