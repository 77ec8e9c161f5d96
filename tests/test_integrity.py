"""Missing data is damage, and damage is always detected: by readers (every index form), verify,
search and resume; commit records and metadata documents are protected too."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import blockcap
from blockcap.analysis.reader import IncompleteStoreWarning
from blockcap.core.errors import BlockcapError
from blockcap.storage.integrity import DamagedError, encode_record
from tests import crashkit

CHUNK = 8


@pytest.fixture(params=[1, 2], ids=["chunks", "shards"])
def made(request, run_args, tmp_path_factory) -> tuple[dict, Path]:
    """A complete store of several units (unsharded, or two chunks a shard) and a pristine copy."""
    args = {**run_args, "chunk_windows": CHUNK, "batch_size": 8, "shard_chunks": request.param,
            "sites": "heads_output,ffwd_output"}  # fmt: skip
    blockcap.run(**args)
    pristine = tmp_path_factory.mktemp("pristine") / "s.zarr"
    shutil.copytree(args["out"], pristine)
    return args, pristine


def unit_file(store: str | Path, array: str, unit: int) -> Path:
    ndim = zarr.open_group(str(store), mode="r")[array].ndim
    return Path(store, array, "c", str(unit), *["0"] * (ndim - 1))


def windows_of(args: dict, unit: int) -> tuple[int, int]:
    uw = CHUNK * args["shard_chunks"]
    return unit * uw, (unit + 1) * uw


INDEX_FORMS = {
    "int": lambda lo, hi, n: lo + 1,
    "negative": lambda lo, hi, n: lo + 1 - n,
    "slice": lambda lo, hi, n: slice(lo, hi),
    "slice-step": lambda lo, hi, n: slice(lo, hi + 5, 3),
    "slice-negative-step": lambda lo, hi, n: slice(hi - 1, lo - 1 if lo else None, -2),
    "list": lambda lo, hi, n: [0, lo + 2, lo],
    "bool-mask": lambda lo, hi, n: np.arange(n) == lo + 3,
    "numpy-array": lambda lo, hi, n: np.array([[lo, 0], [1, lo + 1]]),
    "torch-tensor": lambda lo, hi, n: torch.tensor([lo + 1, 2]),
    "torch-0d": lambda lo, hi, n: torch.tensor(lo),
    "tuple-with-ellipsis": lambda lo, hi, n: (lo, ..., 3),
    "window-and-position": lambda lo, hi, n: (slice(lo, hi), -1),
    "2d-bool-mask": lambda lo, hi, n: np.add.outer(np.arange(n), np.arange(8)) % 7 == lo % 7,
}


@pytest.mark.parametrize("form", list(INDEX_FORMS))
def test_every_index_form_works_like_numpy_on_a_good_store(made, form):
    args, _ = made
    s = blockcap.open_store(args["out"])
    arr = s.site("ffwd_output")
    full = arr[:].numpy()
    key = INDEX_FORMS[form](CHUNK, 2 * CHUNK, s.n_windows)
    want = full[
        tuple(k.numpy() if isinstance(k, torch.Tensor) else k for k in key)
        if isinstance(key, tuple)
        else (key.numpy() if isinstance(key, torch.Tensor) else key)
    ]
    assert np.array_equal(arr[key].numpy(), want)
    assert np.array_equal(arr.np[key], want)


@pytest.mark.parametrize("form", list(INDEX_FORMS))
def test_every_index_form_reports_a_missing_chunk(made, form):
    args, _ = made
    unit_file(args["out"], "block0/ffwd_output", 1).unlink()
    s = blockcap.open_store(args["out"])
    lo, hi = windows_of(args, 1)
    key = INDEX_FORMS[form](lo, hi, s.n_windows)
    with pytest.raises(
        DamagedError, match=r"block0/ffwd_output: (chunk|shard) 1 .*windows .* data object .* is missing"
    ):
        s.site("ffwd_output")[key]
    assert s.site("ffwd_output")[: CHUNK - 1].shape[0] == CHUNK - 1  # unit 0 still reads
    assert s.site("heads_output")[key] is not None  # other arrays still read


@pytest.mark.parametrize("form", ["int", "slice", "list", "bool-mask", "torch-tensor"])
def test_every_index_form_reports_a_corrupted_chunk(made, form):
    args, _ = made
    f = unit_file(args["out"], "block0/ffwd_output", 1)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x55
    f.write_bytes(bytes(data))
    s = blockcap.open_store(args["out"])
    lo, hi = windows_of(args, 1)
    first_chunk = lo // CHUNK  # a shard's chunks are read (and named) one by one
    with pytest.raises(DamagedError, match=f"block0/ffwd_output: (chunk|shard) (1|{first_chunk}) "):
        s.site("ffwd_output")[INDEX_FORMS[form](lo, hi, s.n_windows)]


def test_verify_names_array_chunk_and_windows_of_a_deleted_chunk(made):
    args, _ = made
    unit_file(args["out"], "block0/ffwd_output", 1).unlink()
    problems = blockcap.verify(args["out"])
    lo, hi = windows_of(args, 1)
    assert len(problems) == 1, problems
    assert "block0/ffwd_output: " in problems[0] and f"windows {lo}..{hi - 1})" in problems[0]
    assert "is committed but its data object" in problems[0]


@pytest.mark.parametrize(
    "array", ["tokens", "offsets", "block0/heads_output", "block0/stats/ffwd_output/partial"]
)
def test_every_array_is_checked(made, array):
    args, _ = made
    unit_file(args["out"], array, 0).unlink()
    problems = blockcap.verify(args["out"])
    assert any(p.startswith(f"{array}: ") and "missing" in p for p in problems), problems


def test_search_refuses_a_store_with_a_missing_chunk(made):
    args, _ = made
    unit_file(args["out"], "block0/ffwd_output", 1).unlink()
    s = blockcap.open_store(args["out"])
    with pytest.raises(DamagedError, match="missing"):
        blockcap.nearest(s, torch.ones(32), "ffwd_output", k=3)


def test_run_repairs_a_complete_store_whose_chunk_vanished(made):
    args, pristine = made
    unit_file(args["out"], "block0/ffwd_output", 1).unlink()
    assert blockcap.run(**args).status == "resumed and completed"
    assert crashkit.files(Path(args["out"])) == crashkit.files(pristine)


def test_resume_recomputes_a_committed_unit_whose_data_vanished(made):
    args, pristine = made
    root = Path(args["out"], "zarr.json")
    doc = json.loads(root.read_text())
    doc["attributes"]["blockcap"]["state"] = "incomplete"  # as if killed before finishing
    root.write_text(json.dumps(doc))
    unit_file(args["out"], "block0/heads_output", 2).unlink()
    assert blockcap.run(**args).status == "resumed and completed"
    assert crashkit.files(Path(args["out"])) == crashkit.files(pristine)


@pytest.mark.parametrize(
    "how", ["flip", "truncate", "misplaced", "forged-digests", "other-store", "format-1-flag"]
)
def test_a_damaged_or_forged_commit_record_is_reported_and_redone(made, how):
    args, pristine = made
    record = Path(args["out"], "committed", "c", "1", "0")
    other = Path(args["out"], "committed", "c", "0", "0").read_bytes()
    from blockcap.storage.codecs import ChunkEncoder

    n_fields = zarr.open_group(args["out"], mode="r")["committed"].shape[1]
    data = record.read_bytes()
    if how == "flip":
        data = data[:5] + bytes([data[5] ^ 1]) + data[6:]
    elif how == "truncate":
        data = data[:7]
    elif how == "misplaced":
        data = other  # unit 0's valid record at unit 1
    elif how == "forged-digests":
        tag = blockcap.open_store(args["out"]).opened.index.tag
        data = ChunkEncoder("none").chunk(encode_record(1, tag, [7] * (n_fields - 3))[None])
    elif how == "other-store":
        data = ChunkEncoder("none").chunk(encode_record(1, 12345, [7] * (n_fields - 3))[None])
    else:
        data = ChunkEncoder("none").chunk(np.ones(1, np.uint8))
    record.write_bytes(data)
    s = blockcap.open_store(args["out"])
    lo, hi = windows_of(args, 1)
    expected = "differs from what was committed" if how == "forged-digests" else "commit record is damaged"
    with pytest.raises(DamagedError, match=expected):
        s.site("ffwd_output")[lo]  # a sharded store's reads fetch and check whole shards too
    assert any(expected in p for p in blockcap.verify(args["out"]))
    root = Path(args["out"], "zarr.json")
    doc = json.loads(root.read_text())
    doc["attributes"]["blockcap"]["state"] = "incomplete"
    root.write_text(json.dumps(doc))
    if how != "forged-digests":  # a valid-looking record with wrong digests needs verify to find it
        assert blockcap.run(**args).status == "resumed and completed"
        assert crashkit.files(Path(args["out"])) == crashkit.files(pristine)


@pytest.mark.parametrize(
    "doc, expect",
    [
        ("zarr.json", "not a Zarr v3 store \\(no zarr.json\\)"),
        ("committed/zarr.json", "metadata document committed/zarr.json is missing or differs"),
        (
            "block0/ffwd_output/zarr.json",
            "metadata document block0/ffwd_output/zarr.json is missing or differs",
        ),
        ("tokens/zarr.json", "metadata document tokens/zarr.json is missing or differs"),
        ("block0/zarr.json", "metadata document block0/zarr.json is missing or differs"),
    ],
)
@pytest.mark.parametrize("how", ["delete", "garble"])
def test_damaged_metadata_documents_get_one_line(made, doc, expect, how):
    args, pristine = made
    path = Path(args["out"], doc)
    if how == "delete":
        path.unlink()
    else:
        path.write_text("{not json")
        if doc == "zarr.json":
            expect = "zarr.json is damaged"
    problems = blockcap.verify(args["out"])
    assert problems and all("\n" not in p for p in problems)
    assert any(re.search(expect, p) for p in problems), problems
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IncompleteStoreWarning)
            s = blockcap.open_store(args["out"])
        s.site("ffwd_output")[0]
        s.tokens[0]
    except BlockcapError as e:
        assert "\n" not in str(e)
    if doc != "zarr.json":  # a run repairs the metadata of its own store
        assert blockcap.run(**args).status == "resumed and completed"
        assert crashkit.files(Path(args["out"])) == crashkit.files(pristine)


def test_a_deleted_commit_record_of_a_complete_store_is_damage_and_repaired(made):
    args, pristine = made
    Path(args["out"], "committed", "c", "1", "0").unlink()
    s = blockcap.open_store(args["out"])
    lo, _ = windows_of(args, 1)
    for read in (lambda: s.site("ffwd_output")[lo], lambda: s.tokens[lo], lambda: s.text(lo)):
        with pytest.raises(DamagedError, match="commit record is missing from a complete store"):
            read()
    assert any("not committed" in p for p in blockcap.verify(args["out"]))
    assert blockcap.run(**args).status == "resumed and completed"
    assert crashkit.files(Path(args["out"])) == crashkit.files(pristine)


def test_a_unit_copied_from_another_store_is_refused(made, tmp_path):
    args, _ = made
    other = {**args, "out": str(tmp_path / "other.zarr"), "dtype": "float16"}  # another spec, same grid
    blockcap.run(**other)
    for rel in ("block0/ffwd_output/c/1/0/0", "committed/c/1/0"):
        shutil.copy(Path(other["out"], rel), Path(args["out"], rel))
    s = blockcap.open_store(args["out"])
    with pytest.raises(DamagedError, match="commit record of another store"):
        s.site("ffwd_output")[windows_of(args, 1)[0]]
    assert any("another store" in p for p in blockcap.verify(args["out"]))


def test_altered_array_metadata_changes_nothing_blockcap_reads(made):
    args, pristine = made
    want = blockcap.open_store(args["out"]).site("ffwd_output")[:]
    doc = Path(args["out"], "block0/ffwd_output/zarr.json")
    meta = json.loads(doc.read_text())
    meta["data_type"] = "int32"
    doc.write_text(json.dumps(meta))
    assert torch.equal(blockcap.open_store(args["out"]).site("ffwd_output")[:], want)  # the layout decides
    assert any(
        "block0/ffwd_output/zarr.json is missing or differs" in p for p in blockcap.verify(args["out"])
    )
    assert blockcap.run(**args).status == "resumed and completed"
    assert crashkit.files(Path(args["out"])) == crashkit.files(pristine)


@pytest.mark.parametrize("how", ["flip", "delete", "foreign"])
def test_final_statistics_are_protected_and_repaired(made, tmp_path, how, capsys):
    args, pristine = made
    f = Path(args["out"], "block0/stats/ffwd_output/mean/c/0")
    if how == "flip":
        data = bytearray(f.read_bytes())
        data[10] ^= 1
        f.write_bytes(bytes(data))
    elif how == "delete":
        f.unlink()
    else:
        blockcap.run(**{**args, "out": str(tmp_path / "o.zarr"), "dtype": "float16"})
        shutil.copy(tmp_path / "o.zarr" / "block0/stats/ffwd_output/mean/c/0", f)
    with pytest.raises(DamagedError, match="block0/stats/ffwd_output/mean"):
        blockcap.open_store(args["out"]).stats("ffwd_output")
    assert any("block0/stats/ffwd_output/mean" in p for p in blockcap.verify(args["out"]))
    from blockcap.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["info", args["out"]])
    assert exc.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    if how == "delete":  # a run puts back what went missing; altered bytes are verify's to report
        assert blockcap.run(**args).status == "resumed and completed"
        assert crashkit.files(Path(args["out"])) == crashkit.files(pristine)


def test_a_dedup_store_index_is_protected(run_args, tmp_path):
    args = {**run_args, "sample_len": 3, "stride": 1, "dedup": True, "chunk_windows": 64, "batch_size": 64}
    blockcap.run(**args)
    a, b = Path(args["out"], "prefix_rows/c/0/0"), Path(args["out"], "prefix_rows/c/1/0")
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    s = blockcap.open_store(args["out"])
    with pytest.raises(DamagedError, match="prefix_rows: object prefix_rows/c/0/0 differs"):
        s.site("ffwd_output")[3]
    assert any("prefix_rows" in p for p in blockcap.verify(args["out"]))
