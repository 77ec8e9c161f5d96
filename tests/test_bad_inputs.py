"""A checked list of bad inputs across every command: each exits 2 with exactly one line on stderr
(naming the value and the fix), before anything is created or changed (every file hashed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import blockcap
from blockcap.capture.chargpt.checkpoint import save_checkpoint
from blockcap.capture.chargpt.model import GPT
from blockcap.cli import EXIT_ERROR, main

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tmp_path_factory, ckpt, text_file, tiny_model) -> dict[str, Path]:
    """A directory with a good store, files that are not what commands want, and odd weights."""
    d = tmp_path_factory.mktemp("world")
    good = d / "good.zarr"
    blockcap.run(weights=str(ckpt), dataset=str(text_file), out=str(good), sample_len=8, stride=5,
                 batch_size=16, progress=False)  # fmt: skip
    shutil.copytree(good, d / "notes.zarr")  # a store whose set-aside path holds a user's directory
    (d / "notes.zarr.replaced").mkdir()
    (d / "notes.zarr.replaced" / "keep.txt").write_text("mine")
    (d / "file.txt").write_text("not a store")
    (d / "hi.pt").write_text("hi\n")
    (d / "dangling").symlink_to(d / "nowhere")
    (d / "notes").mkdir()
    (d / "notes" / "mine.txt").write_text("precious")
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x01")
    (d / "data.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    model, tok = tiny_model
    state = dict(model.state_dict())
    torch.save({**state, "ln_f.weight": "not a tensor"}, d / "strings.pt")
    for name, change in {"huge.pt": {"block_size": 100000}, "negative.pt": {"n_embed": -96}}.items():
        obj = {"format": "blockcap-checkpoint", "version": 1, "vocab": tok.vocab, "meta": {},
               "config": {**model.config.to_dict(), **change}, "state_dict": state}  # fmt: skip
        torch.save(obj, d / name)
    save_checkpoint(d / "ok.pt", GPT(model.config), tok.vocab, {})
    return {"dir": d, "good": good, "ckpt": ckpt, "text": text_file}


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def run_args(w: dict[str, Path], **extra: str) -> list[str]:
    args = {"weights": w["ckpt"], "dataset": w["text"], "out": w["dir"] / "new.zarr", "sample_len": 8,
            "stride": 5, "batch_size": 16, "progress": False, **extra}  # fmt: skip
    return ["run", *(f"--{k}={v}" for k, v in args.items())]


# (id, argv builder, text the one line must contain)
CASES = [
    ("block-too-big", lambda w: run_args(w, block_idx=6), "--block_idx=6 is not a block of this model"),
    ("block-negative", lambda w: run_args(w, block_idx=-1), "--block_idx=-1"),
    ("block-float", lambda w: run_args(w, block_idx=1.5), "--block_idx=1.5"),
    ("block-text", lambda w: run_args(w, block_idx="x"), "--block_idx='x'"),
    ("sites-unknown", lambda w: run_args(w, sites="nope"), "--sites='nope' has unknown 'nope'"),
    ("sites-empty", lambda w: run_args(w, sites=""), "is empty"),
    ("sample-len-zero", lambda w: run_args(w, sample_len=0), "--sample_len=0 is out of range"),
    ("sample-len-too-long", lambda w: run_args(w, sample_len=33), "longer than the model's context of 32"),
    ("sample-len-text", lambda w: run_args(w, sample_len="abc"), "--sample_len='abc' is not an integer"),
    ("sample-len-float", lambda w: run_args(w, sample_len=2.5), "--sample_len=2.5 is not an integer"),
    ("stride-zero", lambda w: run_args(w, stride=0), "--stride=0 is out of range"),
    ("stride-float", lambda w: run_args(w, stride=1.5), "--stride=1.5 is out of range"),
    ("batch-negative", lambda w: run_args(w, batch_size=-4), "--batch_size=-4 is out of range"),
    ("split", lambda w: run_args(w, split="test"), "--split='test' is unknown"),
    ("dtype", lambda w: run_args(w, dtype="float64"), "--dtype='float64' is unknown"),
    ("codec", lambda w: run_args(w, codec="gzip"), "--codec='gzip' is unknown"),
    ("codec-level", lambda w: run_args(w, codec="zstd:99"), "--codec='zstd:99' has a bad level"),
    ("codec-level-text", lambda w: run_args(w, codec="blosc-lz4:x"), "has a bad level"),
    ("device-index", lambda w: run_args(w, device="cuda:7"), "--device='cuda:7'"),
    ("device-kind", lambda w: run_args(w, device="tpu"), "--device='tpu'"),
    *(
        [("device-no-gpu", lambda w: run_args(w, device="cuda"), "no CUDA GPU is available")]
        if NO_GPU
        else []
    ),
    ("dataset-hash-wrong", lambda w: run_args(w, dataset_sha256="ab" * 32), "expected abab"),
    ("dataset-hash-not-hex", lambda w: run_args(w, dataset_sha256="xyz"), "is not a sha256"),
    ("model-hash-wrong", lambda w: run_args(w, model_sha256="cd" * 32), "does not match the model's weights"),
    (
        "chunk-misfit",
        lambda w: run_args(w, chunk_windows=5),
        "--chunk_windows=5 must be a multiple or a divisor",
    ),
    ("chunk-zero", lambda w: run_args(w, chunk_windows=0), "--chunk_windows=0 is out of range"),
    ("shard-zero", lambda w: run_args(w, shard_chunks=0), "--shard_chunks=0 is out of range"),
    ("query-zero", lambda w: run_args(w, sites="attention", query_chunk=0), "--query_chunk=0 is out of"),
    ("query-long", lambda w: run_args(w, sites="attention", query_chunk=9), "--query_chunk=9 is out of"),
    ("query-alone", lambda w: run_args(w, query_chunk=2), "add attention to sites or drop query_chunk"),
    ("weights-missing", lambda w: run_args(w, weights="/nonexistent.pt"), "does not exist"),
    (
        "weights-text-file",
        lambda w: run_args(w, weights=w["dir"] / "file.txt"),
        "is not a loadable checkpoint",
    ),
    (
        "weights-not-tensors",
        lambda w: run_args(w, weights=w["dir"] / "strings.pt"),
        "ln_f.weight is a str, not a tensor",
    ),
    (
        "weights-absurd-size",
        lambda w: run_args(w, weights=w["dir"] / "huge.pt"),
        "block_size=100000 is out of range",
    ),
    (
        "weights-negative-size",
        lambda w: run_args(w, weights=w["dir"] / "negative.pt"),
        "n_embed=-96 is out of range",
    ),
    ("dataset-missing", lambda w: run_args(w, dataset="/nonexistent.txt"), "does not exist"),
    ("dataset-empty", lambda w: run_args(w, dataset=w["dir"] / "empty.txt"), "is empty"),
    ("dataset-binary", lambda w: run_args(w, dataset=w["dir"] / "binary.txt"), "is not UTF-8 text"),
    (
        "dataset-column-missing",
        lambda w: run_args(w, dataset=w["dir"] / "data.jsonl", text_column="body"),
        "has no text_column 'body'",
    ),  # fmt: skip
    (
        "text-column-on-txt",
        lambda w: run_args(w, text_column="body"),
        "is for .jsonl, .parquet and .arrow datasets",
    ),
    ("out-is-a-file", lambda w: run_args(w, out=w["dir"] / "file.txt"), "is a file"),
    ("out-foreign-dir", lambda w: run_args(w, out=w["dir"] / "notes"), "is not a blockcap store; refusing"),
    (
        "out-foreign-dir-overwrite",
        lambda w: [*run_args(w, out=w["dir"] / "notes"), "--overwrite"],
        "refusing",
    ),
    ("out-no-parent", lambda w: run_args(w, out=w["dir"] / "no" / "such.zarr"), "does not exist"),
    ("out-other-params", lambda w: run_args(w, out=w["good"], stride=7), "other parameters (stride 5 -> 7"),
    (
        "replaced-in-the-way",
        lambda w: [*run_args(w, out=w["dir"] / "notes.zarr", stride=7), "--overwrite"],
        "was not set aside by blockcap",
    ),  # fmt: skip
    ("part", lambda w: run_args(w, part="2/2"), "--part='2/2' is not k/n"),
    ("part-text", lambda w: run_args(w, part="half"), "--part='half' is not k/n"),
    ("writers-zero", lambda w: run_args(w, writers=0), "--writers=0 is out of range"),
    ("writers-absurd", lambda w: run_args(w, writers=1000), "--writers=1000 is out of range"),
    ("storage-options-not-json", lambda w: run_args(w, storage_options="{oops"), "is not JSON"),
    ("storage-options-list", lambda w: run_args(w, storage_options="[1]"), "is not a JSON object"),
    ("model-and-weights", lambda w: run_args(w, model=w["dir"]), "both given"),
    (
        "model-missing",
        lambda w: ["run", "--model=/nonexistent/model", f"--dataset={w['text']}"],
        "does not exist",
    ),
    ("revision-without-model", lambda w: run_args(w, revision="main"), "--revision='main' is for a"),
    ("model-dtype", lambda w: run_args(w, model_dtype="float64"), "--model_dtype='float64' is unknown"),
    ("flag-not-bool", lambda w: run_args(w, compile="maybe"), "--compile='maybe' is not True or False"),
    ("dedup-attention", lambda w: run_args(w, dedup=True, sites="attention"), "cannot be deduplicated"),
    ("unknown-option", lambda w: [*run_args(w), "--no_such=1"], "unknown option --no_such for run"),
    ("positional-to-run", lambda w: ["run", "5"], "unexpected argument '5' for run"),
    ("short-option", lambda w: ["run", "-r", "x"], "pass options as --name=value"),
    ("unknown-command", lambda w: ["frob"], "unknown command 'frob'"),
    ("info-missing-store", lambda w: ["info", str(w["dir"] / "missing.zarr")], "does not exist"),
    ("info-a-file", lambda w: ["info", str(w["dir"] / "file.txt")], "is a file"),
    ("info-foreign-dir", lambda w: ["info", str(w["dir"] / "notes")], "not a Zarr v3 store"),
    ("info-no-argument", lambda w: ["info"], "info needs STORE"),
    ("verify-missing-store", lambda w: ["verify", str(w["dir"] / "missing.zarr")], "does not exist"),
    ("verify-bad-options", lambda w: ["verify", str(w["good"]), "--storage_options={x"], "is not JSON"),
    ("finalize-missing", lambda w: ["finalize", str(w["dir"] / "missing.zarr")], "does not exist"),
    ("search-window-text", lambda w: ["search", str(w["good"]), "--window=abc"], "--window='abc'"),
    ("search-window-float", lambda w: ["search", str(w["good"]), "--window=1.5"], "--window=1.5"),
    (
        "search-window-out",
        lambda w: ["search", str(w["good"]), "--window=100000"],
        "--window=100000 is outside",
    ),
    (
        "search-position-out",
        lambda w: ["search", str(w["good"]), "--window=1", "--position=99"],
        "--position=99",
    ),
    (
        "search-site-attention",
        lambda w: ["search", str(w["good"]), "--window=1", "--site=attention"],
        "attention",
    ),
    ("search-site-unknown", lambda w: ["search", str(w["good"]), "--window=1", "--site=nope"], "'nope'"),
    ("search-k", lambda w: ["search", str(w["good"]), "--window=1", "--k=0"], "--k=0"),
    ("search-metric", lambda w: ["search", str(w["good"]), "--window=1", "--metric=manhattan"], "manhattan"),
    ("search-block", lambda w: ["search", str(w["good"]), "--window=1", "--block=7"], "block 7"),
    ("generate-weights", lambda w: ["generate", "--weights=/nonexistent.pt"], "does not exist"),
    (
        "train-preset",
        lambda w: ["train", "--preset=huge", f"--dataset={w['text']}"],
        "--preset='huge' is unknown",
    ),
    ("stride-huge", lambda w: run_args(w, stride=10**20), "--stride=100000000000000000000 is out of range"),
    ("shard-huge", lambda w: run_args(w, shard_chunks=10**20), "--shard_chunks=100000000000000000000 is out"),
    ("shard-beyond-run", lambda w: run_args(w, shard_chunks=300000), "more chunks than the run has"),
    ("negated-flag-with-value", lambda w: [*run_args(w), "--nostats=1"], "--nostats takes no value"),
    ("weights-text", lambda w: run_args(w, weights=w["dir"] / "hi.pt"), "is not a loadable checkpoint"),
    (
        "out-in-proc",
        lambda w: run_args(w, out="/proc/x.zarr"),
        "cannot create the lock file /proc/.x.zarr.lock",
    ),
    ("out-dangling-link", lambda w: run_args(w, out=w["dir"] / "dangling"), "is a symbolic link to nothing"),
    (
        "s3-unreachable",
        lambda w: run_args(
            w,
            out="s3://bucket/x.zarr",
            storage_options='{"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", '
            '"config_kwargs": {"retries": {"max_attempts": 1}}}',  # no backoff: CI time
        ),
        "the object store",
    ),
    (
        "verify-flag-not-bool",
        lambda w: ["verify", str(w["good"]), "--dataset_check=maybe"],
        "is not True or False",
    ),
    ("verify-stray-argument", lambda w: ["verify", str(w["good"]), "extra"], "unexpected argument 'extra'"),
    ("info-empty-path", lambda w: ["info", ""], "is not a store path"),
    (
        "train-negative-iters",
        lambda w: ["train", "--max_iters=-1", f"--dataset={w['text']}"],
        "--max_iters=-1",
    ),
    ("train-zero-batch", lambda w: ["train", "--batch_size=0", f"--dataset={w['text']}"], "--batch_size=0"),
    (
        "train-block-size",
        lambda w: ["train", "--block_size=100000", f"--dataset={w['text']}"],
        "--block_size",
    ),
    ("train-lr-text", lambda w: ["train", "--lr=x", f"--dataset={w['text']}"], "--lr='x'"),
    ("train-out-dir", lambda w: ["train", f"--out={w['dir']}", f"--dataset={w['text']}"], "is a directory"),
    ("generate-length-text", lambda w: ["generate", "--length=x"], "--length='x'"),
    ("generate-length-huge", lambda w: ["generate", "--length=100000000000"], "--length=100000000000"),
    ("generate-seed-text", lambda w: ["generate", "--seed=x"], "--seed='x'"),
    ("generate-empty-prompt", lambda w: ["generate", "--prompt="], "is empty"),
]


@pytest.mark.parametrize("make, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, capsys, make, expect):
    before = snapshot(world["dir"])
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in make(world)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == EXIT_ERROR, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("blockcap: error: ") and expect in err, err
    assert "Traceback" not in err
    assert snapshot(world["dir"]) == before


def test_the_list_is_long_enough():
    assert len(CASES) >= 40


def test_a_batch_that_cannot_fit_is_refused(world, capsys, monkeypatch):
    from blockcap.run import plan

    monkeypatch.setattr(plan, "free_memory", lambda device: 50 << 20)
    before = snapshot(world["dir"])
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in run_args(world, batch_size=10**15, sample_len=32, stride=1, split="all")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == EXIT_ERROR and len(err.splitlines()) == 1
    assert "--batch_size=1000000000000000 needs about" in err and "use --batch_size=" in err
    assert snapshot(world["dir"]) == before


def test_any_batch_size_is_planned_at_once():
    from blockcap.core.layout import choose_chunk_windows

    assert choose_chunk_windows(10**15, 1000, 500) == 500  # one batch: the run, chunked by size only
    assert choose_chunk_windows(2**40, 10**6, 10**9) == 4  # the divisors of a huge batch, not a scan


def test_a_bad_value_survives_pickling():
    """Ranks hand errors on pickled: a BadValue arrives whole, its parts and wording intact."""
    import pickle

    from blockcap.core.errors import BadValue

    e = BadValue("model", "gpt2", "and {weights} both given", "pass one", {"weights": "w.pt"})
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is BadValue
    assert str(back) == str(e) == "model='gpt2' and weights='w.pt' both given; pass one"
    assert back.fact == "model 'gpt2' and weights 'w.pt' both given"
