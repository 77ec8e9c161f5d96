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
from blockcap.core.errors import BlockcapError
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


TEXT = make_text() * 40  # in the test model's vocabulary, and several zstd blocks long
ASCII = [make_text(n) for n in (300, 1, 50, 2000, 700, 90)]


def cut(path: Path, n: int = 0) -> Path:
    """``path`` less its last ``n`` bytes (``n`` 0: its last quarter)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - (n or len(data) // 4)])
    return path


def corrupt_zst(path: Path) -> Path:
    """A zstd file whose content checksum does not match (one byte of it changed)."""
    zstandard = pytest.importorskip("zstandard")
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(TEXT.encode()))
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def mixed(d: Path) -> Path:
    write_jsonl(d / "a.jsonl", DOCS)
    (d / "b.txt").write_text("x")
    return d


BAD = {
    "truncated gzip": (
        file("x.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 500)[:-30]),
        "x.jsonl.gz is truncated",
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
    "truncated zstd text": (
        lambda d: cut(write_zst(d / "x.txt.zst", TEXT.encode())),
        "x.txt.zst is truncated",
    ),
    "corrupt zstd": (lambda d: corrupt_zst(d / "x.jsonl.zst"), "x.jsonl.zst is not a readable zstd file"),
    "not gzip": (file("x.txt.gz", b"Lorem ipsum"), "x.txt.gz is not a readable gzip file (Not a gzipped"),
    "arrow shard cut after a batch": (
        lambda d: cut(write_hf_dataset(d / "hf", ASCII) / "data-00001-of-00002.arrow", 8).parent,
        "data-00001-of-00002.arrow is truncated after row 2",
    ),
    "lone surrogate": (
        file("x.jsonl", '{"text": "a"}\n{"text": "bad \\ud800 x"}\n'),
        "x.jsonl line 2: text_column 'text' holds a lone surrogate",
    ),
    "not an object": (file("x.jsonl", '{"text": "a"}\n[1, 2]\n'), "x.jsonl line 2 is not a JSON object"),
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
    assert err.count("dataset file") <= 1, err  # the file is named once
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


def read_all(dataset: Path | str) -> list[str]:
    return [
        d.text if d.pieces is None else "".join(d.pieces) for d in documents(list_inputs(str(dataset)), None)
    ]


def compressed(path: Path, data: bytes) -> Path:
    """``data`` compressed by the codec ``path``'s suffix names."""
    if path.suffix == ".zst":
        return write_zst(path, data)
    path.write_bytes((gzip.compress if path.suffix == ".gz" else bz2.compress)(data))
    return path


SAMPLES = {
    "txt": lambda d: TEXT.encode(),
    "jsonl": lambda d: write_jsonl(
        d / "p.jsonl", [TEXT[i : i + 300] for i in range(0, 60000, 300)]
    ).read_bytes(),
    "parquet": lambda d: write_table(
        d / "p.parquet", [TEXT[i : i + 5000] for i in range(0, 50000, 5000)]
    ).read_bytes(),
}


@pytest.mark.parametrize("codec", [".gz", ".bz2", ".zst"])
@pytest.mark.parametrize("fmt", SAMPLES)
def test_a_truncated_compressed_file_is_refused(fmt, codec, tmp_path):
    path = compressed(tmp_path / f"x.{fmt}{codec}", SAMPLES[fmt](tmp_path))
    assert read_all(path) == read_all(tmp_path / f"p.{fmt}") if fmt != "txt" else read_all(path) == [TEXT]
    cut(path)
    with pytest.raises(BlockcapError, match=rf"x\.{fmt}\{codec}( \([^)]*\))? is truncated"):
        read_all(path)


def test_zstd_reads_every_frame_and_refuses_damage(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    z = zstandard.ZstdCompressor()
    frames = tmp_path / "frames.txt.zst"
    frames.write_bytes(z.compress(TEXT[:1000].encode()) + z.compress(b"") + z.compress(TEXT[1000:].encode()))
    assert read_all(frames) == [TEXT]
    (tmp_path / "empty.txt.zst").write_bytes(b"")
    assert read_all(tmp_path / "empty.txt.zst") == [""]
    damaged = {
        "junk.txt.zst": b"\x28\xb5\x2f\xfd" + b"\x00junk" * 20,  # a frame magic, then no frame
        "tail.txt.zst": z.compress(b"text") + b"trailing bytes",
        "sum.txt.zst": corrupt_zst(tmp_path / "c").read_bytes(),
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BlockcapError, match=f"{name} is not a readable zstd file"):
            read_all(tmp_path / name)


def test_an_arrow_stream_must_reach_its_end_marker(tmp_path):
    hf = write_hf_dataset(tmp_path / "hf", DOCS)
    shard = hf / "data-00001-of-00002.arrow"
    whole = shard.read_bytes()
    assert whole.endswith(b"\xff\xff\xff\xff\x00\x00\x00\x00") and read_all(hf) == DOCS
    for n, why in ((8, "is truncated after row 4"), (len(whole) // 3, "is not a readable arrow file")):
        shard.write_bytes(whole[:-n])
        with pytest.raises(BlockcapError, match=f"data-00001-of-00002.arrow.*{why}"):
            read_all(hf)


def test_a_lone_surrogate_is_refused_at_its_record(tmp_path):
    from tests.tokenizer_kinds import tokenizer

    good = write_jsonl(tmp_path / "pair.jsonl", ["a 😀 b"])  # json.dumps escapes it as a surrogate pair
    assert b"\\ud83d\\ude00" in good.read_bytes() and read_all(good) == ["a 😀 b"]
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "fine"}\n{"id": "\\udfff", "text": "ok"}\n{"text": "bad \\ud800 x"}\n')
    with pytest.raises(BlockcapError, match=r"x\.jsonl line 3: text_column 'text' holds a lone surrogate"):
        read_all(bad)
    for text in ("\\uDC00", "\\ud800", "a\\ud83d", "\\ude00\\ud83d"):  # anywhere, either half
        (tmp_path / "y.jsonl").write_text(f'{{"text": "{text}"}}\n')
        with pytest.raises(BlockcapError, match="lone surrogate"):
            read_all(tmp_path / "y.jsonl")
    with pytest.raises(BlockcapError, match="line 3"):  # not the tokenizer's TypeError
        open_corpus(str(bad), tokenizer("bytelevel"), token_cache=str(tmp_path / "tokens"))


def test_the_record_names_the_expanded_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "s.txt").write_text(TEXT[:500])
    tok = CharTokenizer.from_text(TEXT)
    for dataset, path in (("~/d/s.txt", tmp_path / "d" / "s.txt"), ("~/d/*.txt", tmp_path / "d" / "*.txt")):
        corpus = open_corpus(dataset, tok, token_cache=str(tmp_path / "tokens"))
        assert corpus.record()["path"] == str(path)
        assert [f["path"] for f in corpus.record()["files"]] == [str(tmp_path / "d" / "s.txt")]


@pytest.mark.parametrize("name", ["br[1].jsonl", "a*b.jsonl", "q?.jsonl", "dir[x]", "d*r"])
def test_an_existing_path_is_never_a_glob(name, tmp_path):
    path = tmp_path / name
    if "." in name:
        write_jsonl(path, DOCS)
    else:
        path.mkdir()
        write_jsonl(path / "x.jsonl", DOCS)
    (tmp_path / "br1.jsonl").write_text('{"text": "a glob would match me"}\n')  # "br[1]" matches br1
    (tmp_path / "a-b.jsonl").write_text('{"text": "a glob would match me"}\n')
    assert read_all(path) == DOCS


@pytest.mark.parametrize("form", ["directory", "glob", "glob **"])
def test_each_file_is_read_once_however_many_links_lead_to_it(form, tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first")
    (d / "b.txt").symlink_to(d / "a.txt")  # the same file again
    (d / "sub" / "c.txt").write_text("second")
    (d / "sub" / "back").symlink_to(d)  # a loop: a glob following it lists each file 41 times
    files = list_inputs({"directory": str(d), "glob": f"{d}/**/*.txt", "glob **": f"{d}/**"}[form])
    assert [Path(f.path).relative_to(d).as_posix() for f in files] == ["a.txt", "sub/c.txt"]


@pytest.mark.parametrize("form", ["directory", "glob"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_hidden_names_are_skipped_everywhere(where, form, tmp_path):
    names = ["a.jsonl", ".x.jsonl", ".hid/b.jsonl", "sub/c.jsonl", "sub/.y.jsonl", "sub/.git/d.jsonl"]
    if where == "local":
        root = str(tmp_path / "c")
        for n in names:
            write_jsonl((tmp_path / "c" / n).parent.mkdir(parents=True, exist_ok=True) or tmp_path / "c" / n,
                        [n])  # fmt: skip
    else:
        fs = pytest.importorskip("fsspec").filesystem("memory")
        root = f"memory://{tmp_path.name}"
        for n in names:
            fs.pipe(f"/{tmp_path.name}/{n}", (json.dumps({"text": n}) + "\n").encode())
    try:
        files = list_inputs(root if form == "directory" else f"{root}/**/*.jsonl")
        assert [f.path.rsplit("/c/" if where == "local" else f"{tmp_path.name}/", 1)[-1] for f in files] == [
            "a.jsonl", "sub/c.jsonl"
        ]  # fmt: skip
    finally:
        if where == "memory":
            fs.rm(f"/{tmp_path.name}", recursive=True)


def test_a_bad_byte_is_named_by_its_true_line_and_offset(tmp_path):
    lines = [json.dumps({"text": f"line {n}"}).encode() + b"\n" for n in range(1, 301)]
    (tmp_path / "x.jsonl").write_bytes(b"".join(lines) + b'{"text": "caf\xe9"}\n' + b"".join(lines))
    with pytest.raises(
        BlockcapError, match=r"x\.jsonl line 301 is not UTF-8 text \(invalid continuation byte"
    ):
        read_all(tmp_path / "x.jsonl")
    text = TEXT.encode() * 11
    (tmp_path / "x.txt").write_bytes(text[:2_500_000] + b"\xe9t\xe9" + text)
    with pytest.raises(
        BlockcapError, match=r"x\.txt is not UTF-8 text \(invalid continuation byte at byte 2500000\)"
    ):
        read_all(tmp_path / "x.txt")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[1, 2]", "is not a JSON object (it is an array)"),
        ('"hello"', "is not a JSON object (it is a string)"),
        ("3.5", "is not a JSON object (it is a number)"),
        ("null", "is not a JSON object (it is null)"),
        ('{"text": "a\tb"}', "is not JSON (Invalid control character at column 12)"),
        ('{"text": }', "is not JSON (Expecting value at column 10)"),
        ("[" * 100000 + "]" * 100000, "is JSON nested too deeply"),
    ],
    ids=["array", "string", "number", "null", "control character", "no value", "too deep"],
)
def test_a_bad_jsonl_line_says_what_is_wrong(line, expected, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(BlockcapError) as e:
        read_all(tmp_path / "x.jsonl")
    assert f"x.jsonl line 2 {expected}" in str(e.value), e.value


@pytest.mark.parametrize("name", ["x.jsonl", "x.jsonl.gz", "x.txt", "x.txt.zst"])
def test_a_byte_order_mark_is_dropped(name, tmp_path):
    body = (json.dumps({"text": "héllo"}) + "\n" if ".jsonl" in name else "héllo").encode()
    path = tmp_path / name
    if name.endswith((".gz", ".zst")):
        compressed(path, b"\xef\xbb\xbf" + body)
    else:
        path.write_bytes(b"\xef\xbb\xbf" + body)
    assert read_all(path) == ["héllo"]
