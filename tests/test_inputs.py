"""Dataset inputs: every layout, format and compression gives the documents (and tokens) of one
reference file; bad inputs are one line naming the file and record, with nothing created."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

import blockcap
from blockcap.cli import main
from blockcap.data.corpus import open_corpus
from blockcap.data.inputs import content_digest, list_inputs
from blockcap.data.records import documents
from blockcap.data.tokenizers import CharTokenizer
from tests.conftest import make_text

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DOCS = [make_text(n, seed=n) for n in (300, 1, 50, 2000, 700)] + ["", "ünï 中文\n", make_text(90, seed=4)]


def write_jsonl(path: Path, docs: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    return path


def write_table(path: Path, docs: list[str]) -> Path:
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, row_group_size=3)
    return path


def write_zst(path: Path, data: bytes) -> Path:
    zstandard = pytest.importorskip("zstandard")
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def write_hf_dataset(directory: Path, docs: list[str]) -> Path:
    """What ``datasets.Dataset.save_to_disk`` writes: arrow stream files plus two index documents."""
    directory.mkdir()
    table = pa.table({"text": docs})
    for i, part in enumerate((table.slice(0, 4), table.slice(4))):
        with pa.ipc.new_stream(directory / f"data-{i:05d}-of-00002.arrow", part.schema) as w:
            w.write_table(part)
    (directory / "dataset_info.json").write_text("{}")
    (directory / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": f"data-{i:05d}-of-00002.arrow"} for i in range(2)]}
    ))  # fmt: skip
    return directory


def gzipped_parquet(d: Path) -> Path:
    (d / "x.parquet.gz").write_bytes(gzip.compress(write_table(d / "t.parquet", DOCS).read_bytes()))
    return d / "x.parquet.gz"


def shards_directory(d: Path) -> Path:
    """Shards in subdirectories, some compressed: read recursively in path order."""
    shards = (("a", "0.jsonl", DOCS[:3], open), ("a", "1.jsonl.gz", DOCS[3:6], gzip.open),
              ("b", "2.jsonl", DOCS[6:], open))  # fmt: skip
    for sub, name, docs, opener in shards:
        (d / "s" / sub).mkdir(parents=True, exist_ok=True)
        write_jsonl(d / "s" / sub / name, docs, opener)
    return d / "s"


def parquet_glob(d: Path) -> str:
    for i in range(2):
        write_table(d / f"part-{i}.parquet", DOCS[i * 4 : i * 4 + 4])
    return str(d / "part-*.parquet")


LAYOUTS = {
    "jsonl": lambda d: write_jsonl(d / "x.jsonl", DOCS),
    "jsonl.gz": lambda d: write_jsonl(d / "x.jsonl.gz", DOCS, gzip.open),
    "jsonl.bz2": lambda d: write_jsonl(d / "x.jsonl.bz2", DOCS, bz2.open),
    "jsonl.zst": lambda d: write_zst(d / "x.jsonl.zst", write_jsonl(d / "plain.jsonl", DOCS).read_bytes()),
    "parquet": lambda d: write_table(d / "x.parquet", DOCS),
    "parquet.gz": gzipped_parquet,
    "shards directory": shards_directory,
    "glob": parquet_glob,
    "datasets save_to_disk": lambda d: write_hf_dataset(d / "hf", DOCS),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_reference_documents(layout, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    target = LAYOUTS[layout](data)
    files = list_inputs(str(target))
    texts = [d.text for d in documents(files, None)]
    assert texts == DOCS
    tok = CharTokenizer.from_text("".join(DOCS))
    ref = write_jsonl(tmp_path / "ref.jsonl", DOCS)
    cache = str(tmp_path / "tokens")
    got, want = (open_corpus(str(p), tok, token_cache=cache).stream("none") for p in (target, ref))
    assert np.array_equal(got.read(0, len(got)), want.read(0, len(want)))


def test_text_files_are_one_document_each(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for i, text in enumerate(DOCS[:4]):
        (d / ("sub" if i % 2 else "") / f"{i}.txt").write_text(text)
    (d / "2.txt.gz").write_bytes(gzip.compress(b"compressed document"))
    names = [Path(f.path).name for f in list_inputs(str(d))]
    assert names == ["0.txt", "2.txt", "2.txt.gz", "1.txt", "3.txt"]  # path order: d/ before d/sub/
    texts = ["".join(doc.pieces) for doc in documents(list_inputs(str(d)), None)]
    assert texts == [DOCS[0], DOCS[2], "compressed document", DOCS[1], DOCS[3]]


def test_identity_is_content_not_place(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        write_jsonl((d / "x").mkdir(parents=True) or d / "x" / "0.jsonl", DOCS)
    assert content_digest(list_inputs(str(a))) == content_digest(list_inputs(str(b)))
    write_jsonl(b / "x" / "0.jsonl", [*DOCS[:-1], DOCS[-1] + "!"])
    assert content_digest(list_inputs(str(a))) != content_digest(list_inputs(str(b)))


def test_an_object_store_dataset(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for i in range(2):
        fs.pipe(
            f"/corpus/shard-{i}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in DOCS[i::2]).encode()
        )
    files = list_inputs("memory://corpus")
    assert [f.path for f in files] == ["memory:///corpus/shard-0.jsonl", "memory:///corpus/shard-1.jsonl"]
    assert [d.text for d in documents(files, None)] == DOCS[0::2] + DOCS[1::2]


def file(name: str, content: str | bytes):
    """A maker of a dataset of one file ``name`` holding ``content``."""

    def make(d: Path) -> Path:
        path = d / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return make


def mixed(d: Path) -> Path:
    write_jsonl(d / "a.jsonl", DOCS)
    (d / "b.txt").write_text("x")
    return d


BAD = {
    "truncated gzip": (
        file("x.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 500)[:-30]),
        "x.jsonl.gz (after line",
    ),
    "bad parquet": (
        file("x.parquet", b"PAR1 not really"),
        "x.parquet (at row 0) is not a readable parquet file",
    ),
    "no text column": (
        file("x.jsonl", '{"text": "a"}\n{"body": "b"}\n'),
        "x.jsonl line 2 has no text_column 'text'",
    ),
    "not a string": (
        file("x.jsonl", '{"text": "a"}\n{"text": 7}\n'),
        "x.jsonl line 2: text_column 'text' holds int",
    ),
    "null in a table": (
        lambda d: write_table(d / "x.parquet", ["a", None]),
        "x.parquet row 1: text_column 'text' holds",
    ),
    "empty directory": (lambda d: d / "empty" if (d / "empty").mkdir() is None else None, "has no files"),
    "mixed formats": (mixed, "mixes formats"),
    "unknown file": (file("notes.md", "x"), "notes.md is not .txt, .jsonl"),
    "no match": (lambda d: str(d / "nothing-*.jsonl"), "matches no file"),
    "not UTF-8": (file("x.txt", b"ok\xff\xfe"), "is not UTF-8 text"),
    "all empty": (lambda d: write_jsonl(d / "x.jsonl", ["", ""]), "is empty (no tokens)"),
    "out of vocabulary": (
        lambda d: write_jsonl(d / "x.jsonl", ["the", "thé"]),
        "x.jsonl row 1: character 'é'",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_nothing_created_no_cache_left(
    case, tmp_path, ckpt, capsys, monkeypatch
):
    make, expected = BAD[case]
    data = tmp_path / "data"
    data.mkdir()
    target = make(data)
    cache = tmp_path / "tokens"
    monkeypatch.setenv("BLOCKCAP_TOKEN_CACHE", str(cache))
    out = tmp_path / "s.zarr"
    with pytest.raises(SystemExit) as exc:
        main(["run", f"--weights={ckpt}", f"--dataset={target}", f"--out={out}", "--sample_len=2",
              "--progress=False"])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and expected in err, err
    assert not out.exists() and not list(tmp_path.glob(".s.zarr*"))
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_the_store_records_inputs_and_where_each_window_comes_from(tmp_path, ckpt):
    docs = [make_text(n, seed=n) for n in (300, 1, 50, 2000, 700)] + ["", make_text(90, seed=4)]  # ASCII
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", docs[:4])
    write_jsonl(d / "b.jsonl", docs[4:])
    args = dict(weights=str(ckpt), dataset=str(d), sample_len=4, stride=3, split="all", progress=False)
    out = blockcap.run(**args, out=str(tmp_path / "s.zarr")).path
    s = blockcap.open_store(out)
    record = s.meta["dataset"]
    assert [Path(f["path"]).name for f in record["files"]] == ["a.jsonl", "b.jsonl"]
    assert record["documents"] == len([t for t in docs if t]) and len(record["token_cache"]) == 32
    nonempty = [(f, r, t) for f, part in enumerate((docs[:4], docs[4:])) for r, t in enumerate(part) if t]
    for w in (0, s.n_windows // 2, s.n_windows - 1):
        src = s.source(w)
        file, row, text = nonempty[src["document"]]
        assert Path(src["file"]).name == ("a.jsonl", "b.jsonl")[file] and src["row"] == row
        window_text = s.text(w)
        assert text[src["position"] :].startswith(window_text[: len(text) - src["position"]])
