"""Streaming top-k search equals a brute-force search over the whole site."""

import pytest
import torch

import blockcap
from blockcap.cli import main
from blockcap.core.errors import BlockcapError


@pytest.fixture
def store(run_args):
    blockcap.run(**{**run_args, "chunk_windows": 16})  # several chunks to merge across
    return blockcap.open_store(run_args["out"])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_matches_brute_force(store, metric):
    x = store.site("ffwd_output")[:]
    n, T, C = x.shape
    q = x[7, 3] + 0.01 * torch.randn(C, generator=torch.Generator().manual_seed(0))
    flat = x.reshape(-1, C)
    if metric == "cosine":
        want = torch.nn.functional.cosine_similarity(flat, q[None], dim=1)
    else:
        want = -(flat - q).norm(dim=1)
    top = want.topk(5)
    got = blockcap.nearest(store, q, "ffwd_output", k=5, metric=metric)
    # equal prefixes give equal vectors, so compare scores, and each match's own score (ties)
    torch.testing.assert_close(torch.tensor([m.score for m in got]), top.values, rtol=1e-5, atol=1e-5)
    for m in got:
        assert want[m.window * T + m.position].item() == pytest.approx(m.score, rel=1e-5, abs=1e-5)
    assert got[0].substring == store.substring(got[0].window, got[0].position)


def test_self_is_nearest(store):
    q = store.site("heads_output")[4, 2]
    best = blockcap.nearest(store, q, "heads_output", k=1)[0]
    assert (best.window, best.position) == (4, 2) and best.score == pytest.approx(1.0)


def test_bad_queries(store):
    with pytest.raises(BlockcapError, match="query has 3 values"):
        blockcap.nearest(store, torch.zeros(3))
    with pytest.raises(BlockcapError, match="metric='dot'"):
        blockcap.nearest(store, torch.zeros(32), metric="dot")
    with pytest.raises(BlockcapError, match="k=0"):
        blockcap.nearest(store, torch.zeros(32), k=0)


def test_cli(store, capsys):
    main(["search", str(store.path), "--window=4", "--position=2", "--k=3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("nearest to window 4, position 2")
    assert len(out) == 4 and "window       4 position   2" in out[1]
    with pytest.raises(SystemExit):
        main(["search", str(store.path), "--window=100000"])
