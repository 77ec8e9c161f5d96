"""Batched top-k search equals a float64 brute force, ties included, on plain, dedup and partial stores."""

import json

import numpy as np
import pytest
import torch

import blockcap
import blockcap.cli
from blockcap.analysis import scan, search
from blockcap.analysis.search import topk
from blockcap.capture.chargpt.checkpoint import save_checkpoint
from blockcap.capture.chargpt.model import GPT
from blockcap.core.errors import BlockcapError
from tests.conftest import small_store
from tests.hf_models import NEEDS_TRANSFORMERS

PHRASE = "the king and my lord.\n"  # repeated with a stride of its length: every window is the same


@pytest.fixture(scope="module")
def store(ckpt, text_file, tmp_path_factory):
    """Several chunks and two blocks, every vector site."""
    return small_store(ckpt, text_file, tmp_path_factory.mktemp("t") / "s.zarr", block_idx="0,1", sites="all")


@pytest.fixture(scope="module")
def repeated(ckpt, tmp_path_factory):
    """A plain and a dedup store of identical windows: every position ties across all windows."""
    path = tmp_path_factory.mktemp("rep") / "rep.txt"
    path.write_text(PHRASE * 40)
    kw = dict(stride=len(PHRASE), split="all")
    plain = small_store(ckpt, path, path.parent / "plain.zarr", **kw)
    dedup = small_store(ckpt, path, path.parent / "dedup.zarr", dedup=True, **kw)
    return plain, dedup


def brute(store, q, site="ffwd_output", block=None, k=10, metric="cosine", position=None,
          largest=True, unique=False):  # fmt: skip
    """(window, position) and score of each query's k best, from the whole site in float64."""
    x = store.site(site, block).np[:].astype(np.float64)
    n, T, C = x.shape
    rows, w, p = x.reshape(-1, C), np.repeat(np.arange(n), T), np.tile(np.arange(T), n)
    keep = store.committed_windows()[w] & ((p == position % T) if position is not None else True)
    tokens = store.tokens.np[:]
    out = []
    for qv in np.asarray(q, np.float64).reshape(-1, C):
        s = np.einsum("nc,c->n", rows, qv)
        if metric == "cosine":
            s = s / (np.maximum(np.linalg.norm(rows, axis=1), 1e-12) * max(np.linalg.norm(qv), 1e-12))
        if metric == "l2":
            s = -np.sqrt(np.einsum("nc,nc->n", rows - qv, rows - qv))
        order = [i for i in np.lexsort((p, w, -s if largest else s)) if keep[i]]
        if unique:
            seen, firsts = set(), []
            for i in order:
                key = tokens[w[i], : p[i] + 1].tobytes()
                if key not in seen:
                    seen.add(key)
                    firsts.append(i)
            order = firsts
        out.append([(int(w[i]), int(p[i]), float(s[i])) for i in order[:k]])
    return out


def check(got, want):
    assert [[(m.window, m.position) for m in ms] for ms in got] == [[h[:2] for h in hs] for hs in want]
    for ms, hs in zip(got, want, strict=True):
        np.testing.assert_allclose([m.score for m in ms], [h[2] for h in hs], rtol=1e-9, atol=1e-12)


def queries(store, site="ffwd_output", block=None, n=5):
    """Stored vectors (exact hits), perturbed ones and random ones."""
    x = store.site(site, block)[:]
    g = torch.Generator().manual_seed(0)
    flat = x.reshape(-1, x.shape[-1])
    picks = flat[torch.randint(len(flat), (n,), generator=g)]
    return torch.cat(
        [
            picks[:2],
            picks[2:] + 0.05 * torch.randn(picks[2:].shape, generator=g),
            torch.randn(2, x.shape[-1], generator=g),
        ]
    )


@pytest.mark.parametrize("metric", ["cosine", "l2", "dot"])
@pytest.mark.parametrize("largest", [True, False])
def test_equals_brute_force(store, metric, largest):
    q = queries(store, block=1)
    got = topk(store, q, block=1, k=7, metric=metric, largest=largest)
    check(got, brute(store, q, block=1, k=7, metric=metric, largest=largest))


@pytest.mark.parametrize("position", [0, 3, -1])
def test_one_position(store, position):
    q = queries(store, "mlp_hidden", 1)
    got = topk(store, q, "mlp_hidden", 1, k=6, metric="l2", position=position)
    check(got, brute(store, q, "mlp_hidden", 1, k=6, metric="l2", position=position))
    assert all(m.position == position % 8 for ms in got for m in ms)


@pytest.mark.parametrize("position", [None, 4])
def test_unique(store, position):
    q = queries(store, "block_input", 0)  # early sites repeat across windows that share a prefix
    got = topk(store, q, "block_input", 0, k=8, unique=True, position=position)
    check(got, brute(store, q, "block_input", 0, k=8, unique=True, position=position))
    for ms in got:
        assert len({m.substring for m in ms}) == len(ms)


def test_spans_of_one_chunk_and_one_multiply_per_span(store, monkeypatch):
    """Many spans merge to the same answer, with one multiply per span whatever the query count."""
    q = queries(store, block=0)
    whole = topk(store, q, block=0, k=9)
    calls = []
    real = scan.Scorer.estimate
    monkeypatch.setattr(
        scan.Scorer, "estimate", lambda self, x: calls.append(len(self.qmat)) or real(self, x)
    )
    monkeypatch.setattr(scan, "SPAN_BYTES", 1)
    assert topk(store, q, block=0, k=9) == whole
    spans = len(calls)
    assert spans == -(-store.n_windows // 4) and set(calls) == {len(q)}
    topk(store, q[:1], block=0, k=9)
    assert len(calls) == 2 * spans


@pytest.mark.parametrize("metric", ["cosine", "l2", "dot"])
def test_ties_break_by_window_then_position(repeated, metric):
    plain, dedup = repeated
    x = plain.site("ffwd_output")[:]
    assert all(torch.equal(x[0], x[i]) for i in range(len(x)))  # the ties are exact
    q = torch.stack([x[3, 2], x[1, 5], x[0, 0] + 0.1])
    for s in (plain, dedup):
        got = topk(s, q, k=12, metric=metric)
        check(got, brute(s, q, k=12, metric=metric))
        assert [(m.window, m.position) for m in got[0][:10]] == [(w, 2) for w in range(10)]


@pytest.mark.parametrize("position", [None, 2, -1])
@pytest.mark.parametrize("largest", [True, False])
def test_dedup_equals_plain(repeated, position, largest):
    plain, dedup = repeated
    assert dedup.dedup and not plain.dedup
    q = queries(plain)
    for unique in (False, True):
        want = brute(dedup, q, k=15, position=position, largest=largest, unique=unique)
        got = topk(dedup, q, k=15, position=position, largest=largest, unique=unique)
        check(got, want)
        check(got, brute(plain, q, k=15, position=position, largest=largest, unique=unique))


def test_dedup_of_varied_text(ckpt, text_file, tmp_path):
    s = small_store(
        ckpt, text_file, tmp_path / "d.zarr", dedup=True, sample_len=4, stride=2, chunk_windows=32
    )
    assert s.dedup
    q = queries(s)
    for unique in (False, True):
        check(topk(s, q, k=11, unique=unique), brute(s, q, k=11, unique=unique))


def test_incomplete_store_searches_committed_windows(ckpt, text_file, tmp_path):
    s = small_store(ckpt, text_file, tmp_path / "p.zarr", part="0/2")
    committed = s.committed_windows()
    assert 0 < committed.sum() < committed.size
    q = queries(s)
    got = topk(s, q, k=20)
    check(got, brute(s, q, k=20))
    assert all(committed[m.window] for ms in got for m in ms)


def test_text_query_is_the_stored_vector(store):
    text = store.substring(9, 6)
    v = search.text_vectors(store, [text], "resid_mid", 1)
    torch.testing.assert_close(v[0], store.site("resid_mid", 1)[9, 6], rtol=1e-5, atol=1e-5)
    best = topk(store, [text, text[:3]], "resid_mid", 1, k=2)
    assert best[0][0].substring == text and best[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert best[1][0].substring == text[:3]


def test_raw_state_dict_takes_the_stores_vocabulary(tiny_model, text_file, tmp_path):
    raw = tmp_path / "raw.pt"
    torch.save(tiny_model[0].state_dict(), raw)
    s = small_store(raw, text_file, tmp_path / "r.zarr")
    hit = topk(s, s.substring(2, 7), k=1)[0][0]
    assert hit.substring == s.substring(2, 7) and hit.score == pytest.approx(1.0, abs=1e-5)


def test_other_weights_are_refused(store, tiny_model, tmp_path):
    other = GPT(tiny_model[0].config).eval()
    path = tmp_path / "other.pt"
    save_checkpoint(path, other, tiny_model[1].vocab, {})
    with pytest.raises(BlockcapError, match=r"^weights='.*other.pt' has sha256 \w+, but the store was"):
        topk(store, "the", block=0, weights=str(path))
    assert topk(store, "the", block=0, weights=store.spec.weights)  # an explicit, matching override


def test_nearest_is_topk(store):
    q = store.site("ffwd_output", 0)[4, 2]
    assert (
        blockcap.nearest(store, q, block=0, k=4, metric="l2") == topk(store, q, block=0, k=4, metric="l2")[0]
    )


BAD = [
    (dict(k=0), "k=0 is out of range"),
    (dict(k=True), "k=True is out of range"),
    (dict(k=2.0), "k=2.0 is out of range"),
    (dict(metric="cos"), "metric='cos' is unknown; use one of cosine, l2, dot"),
    (dict(position=8), "position=8 is out of range; windows have 8 positions, use -8..7"),
    (dict(position=-9), "position=-9 is out of range"),
    (dict(position=True), "position=True is out of range"),
    (dict(largest="yes"), "largest='yes' is not True or False"),
    (dict(unique=1), "unique=1 is not True or False"),
    (dict(site="nope"), "site 'nope' was not captured"),
    (dict(block=None), r"holds blocks \[0, 1\]; pass block="),
    (dict(block=5), "block 5 was not captured"),
    (dict(queries=torch.zeros(3)), "query has 3 values but block0/ffwd_output vectors have 32"),
    (dict(queries=torch.zeros(2, 3)), r"queries have width 3 but block0/ffwd_output vectors have 32"),
    (dict(queries=torch.zeros(0, 32)), r"queries of shape \(0, 32\)"),
    (dict(queries=torch.zeros(2, 2, 32)), r"queries of shape \(2, 2, 32\)"),
    (dict(queries=torch.full((32,), float("nan"))), "NaN or infinite"),
    (dict(queries=[]), r"queries of shape \(0,\)"),
    (dict(queries=["the", 3]), "queries of type list are neither text"),
    (dict(queries=""), "query '' has no tokens; pass some text"),
    (
        dict(queries=["the", "Zebra€"]),
        r"query 'Zebra€' has characters not in the model's vocabulary \('Z€'\)",
    ),
    (dict(queries="the " * 10), "is 40 tokens, longer than the model's context of 32; shorten it"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_one_line(store, change, message):
    kw = {"queries": torch.zeros(32), "block": 0, **change}
    with pytest.raises(BlockcapError, match=message) as e:
        topk(store, **kw)
    assert "\n" not in str(e.value)


def test_attention_is_not_searchable(ckpt, text_file, tmp_path):
    s = small_store(ckpt, text_file, tmp_path / "a.zarr", sites="ffwd_output,attention")
    with pytest.raises(
        BlockcapError, match="site='attention' holds a pattern per window.*use one of: ffwd_output"
    ):
        topk(s, torch.zeros(32), "attention")


def test_visible():
    assert search.visible("a b\n\tc\x00") == "a␣b⏎⇥c\\x00"


# --- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def cli():
    return blockcap.cli.main


def test_cli_table(store, cli, capsys):
    cli(["similar", str(store.path), "--query=the ", "--block=1", "--k=3", "--site=resid_mid"])
    out = capsys.readouterr().out.splitlines()
    want = topk(store, "the ", "resid_mid", 1, k=3)[0]
    assert out[0] == "query the␣ (block1/resid_mid, cosine, 3 best)"
    assert len(out) == 5 and out[2].split()[:4] == [
        "1",
        f"{want[0].score:.4f}",
        str(want[0].window),
        str(want[0].position),
    ]
    assert out[2].endswith(search.visible(want[0].substring))


def test_cli_json_several_queries(store, cli, capsys):
    cli(
        [
            "similar",
            str(store.path),
            """--query=["the ", "king\\n"]""",
            "--block=0",
            "--k=4",
            "--metric=l2",
            "--json",
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert [q["query"] for q in doc["queries"]] == ["the ", "king\n"]
    want = topk(store, ["the ", "king\n"], block=0, k=4, metric="l2")
    assert [
        [(m["rank"], m["window"], m["position"], m["substring"]) for m in q["matches"]]
        for q in doc["queries"]
    ] == [[(r, m.window, m.position, m.substring) for r, m in enumerate(ms, 1)] for ms in want]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k=0"], "--k=0 is out of range"),
        (["--metric=x"], "--metric='x' is unknown"),
        (["--query=Zed"], "has characters not in the model's vocabulary"),
        (["--block=7"], "block 7 was not captured"),
        (["--position=99"], "--position=99 is out of range"),
    ],
)
def test_cli_bad_input(store, cli, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli(["similar", str(store.path), "--query=the", "--block=0", *args])
    assert e.value.code == blockcap.cli.EXIT_ERROR
    out, err = capsys.readouterr()
    assert out == "" and message in err and err.count("\n") == 1


@pytest.mark.parametrize("metric", ["cosine", "l2", "dot"])
def test_float32_rounding_never_reorders(metric):
    """Rows sharing a huge common part differ below float32 resolution of their scores: the float32
    multiply cannot rank them, the float64 rescoring must (spans of 50 rows, as the scan merges)."""
    rng = np.random.default_rng(0)
    common = rng.normal(size=64) * 2e4
    x = torch.from_numpy((common + rng.normal(size=(400, 64))).astype(np.float32))
    q = torch.from_numpy((common * 1.001 + rng.normal(size=(3, 64))).astype(np.float32))
    scorer, best = scan.Scorer(q, metric, True), scan.Best(3, 12, False, scan.no_hits(1, True))
    for lo in range(0, len(x), 50):
        rows, valid = np.arange(lo, lo + 50), torch.ones(50, dtype=torch.bool)
        span = scan.Span(x[lo : lo + 50], rows, np.zeros(50, np.int64), valid, None, None, lo, rows)
        best.merge(scan.candidates(span, scorer, 12, best.threshold))
    x64, q64 = x.double().numpy(), q.double().numpy()
    for j in range(3):
        s = x64 @ q64[j]
        if metric == "cosine":
            s = s / np.linalg.norm(x64, axis=1) / np.linalg.norm(q64[j])
        if metric == "l2":
            s = -np.linalg.norm(x64 - q64[j], axis=1)
        want = np.lexsort((np.arange(len(x)), -s))[:12]
        assert best.hits.window[best.hits.query == j].tolist() == want.tolist()


@NEEDS_TRANSFORMERS
def test_text_query_on_a_hugging_face_store(hf_zoo, hf_text, tmp_path):
    s = small_store(None, hf_text, tmp_path / "hf.zarr", model=str(hf_zoo("gpt2")), sample_len=16, stride=8,
                    batch_size=8, chunk_windows=8, block_idx=1)  # fmt: skip
    tokens = s.tokens.np[:]
    w, p = next((w, p) for w in range(3, s.n_windows) for p in (9, 12)  # a prefix that re-encodes the same
                if s.tokenizer.encode(s.substring(w, p)).tolist() == tokens[w, : p + 1].tolist())  # fmt: skip
    text = s.substring(w, p)
    v = search.text_vectors(s, [text], "ffwd_output", 1)[0]
    torch.testing.assert_close(v, s.site("ffwd_output")[w, p], rtol=1e-4, atol=1e-5)
    hit = topk(s, text, k=1)[0][0]
    assert hit.substring == text and hit.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BlockcapError, match=r"^model='.*' has sha256 \w+, but the store was captured with"):
        topk(s, text, model=str(hf_zoo("gpt2", n_layer=3)))
