"""Hugging Face models end to end: run and CLI into a store, reading it back, datasets, resume, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import blockcap
from blockcap.capture.hf import load as hf
from blockcap.cli import EXIT_ERROR, main
from blockcap.core.spec import CaptureSpec
from blockcap.data.windows import split_tokens
from blockcap.storage import location
from tests.hf_models import (
    EOS,
    NEEDS_TRANSFORMERS,
    hooked,
    load_reference,
    make_text,
)

pytestmark = NEEDS_TRANSFORMERS

ROOT = Path(__file__).resolve().parent.parent
ALL_BUT_MID = "block_input,heads_output,proj_output,mlp_hidden,ffwd_output,block_output,attention"


def auto_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def windows_of(directory, text, sample_len, stride, split="val"):
    """The windows blockcap should store, tokenized by transformers itself."""
    ids = auto_tokenizer(directory).encode(text, add_special_tokens=False)
    return split_tokens(torch.tensor(ids), split).unfold(0, sample_len, stride)


@pytest.mark.parametrize(
    "variant, sites",
    [("gpt2", "all,attention"), ("neox_parallel", ALL_BUT_MID), ("llama", "all,attention"), ("qwen2", "all")],
)
def test_run_stores_what_hooks_see(hf_zoo, hf_text, tmp_path, variant, sites):
    directory = hf_zoo(variant)
    ref = load_reference(directory)
    last = ref.config.num_hidden_layers - 1
    out = tmp_path / "s.zarr"
    summary = blockcap.run(
        model=str(directory), dataset=str(hf_text), out=str(out), block_idx=f"0,{last}", sites=sites,
        sample_len=16, stride=8, batch_size=8, progress=False,
    )  # fmt: skip
    windows = windows_of(directory, hf_text.read_text(), 16, 8)
    assert summary.status == "complete" and summary.n_windows == len(windows)
    s = blockcap.open_store(out)
    assert s.blocks == (0, last) and torch.equal(s.tokens[:].long(), windows)
    for lo in range(0, len(windows), 8):  # the run's batches: the same arithmetic, bit for bit
        want, _ = hooked(ref, windows[lo : lo + 8])
        for b in s.blocks:
            for site in s.sites:
                assert torch.equal(s.site(site, b)[lo : lo + 8], want[(b, site)]), (lo, b, site)
    tok = auto_tokenizer(directory)
    for i in (0, len(windows) // 2, len(windows) - 1):
        assert s.text(i) == tok.decode(windows[i].tolist())
        for p in (0, 5, 15):
            assert s.substring(i, p) == tok.decode(windows[i][: p + 1].tolist())


def test_fused_run_within_stated_tolerance(hf_zoo, hf_text, tmp_path):
    from blockcap.capture.hf.llama import FUSED_TOLERANCE

    common = dict(
        model=str(hf_zoo("qwen2")), dataset=str(hf_text), block_idx="all", sites="all,attention",
        sample_len=16, stride=8, batch_size=8, progress=False,
    )  # fmt: skip
    blockcap.run(out=str(tmp_path / "exact.zarr"), **common)
    blockcap.run(out=str(tmp_path / "fused.zarr"), fused=True, **common)
    exact, fused = blockcap.open_store(tmp_path / "exact.zarr"), blockcap.open_store(tmp_path / "fused.zarr")
    assert fused.params["fused"] and not exact.params["fused"]
    worst = 0.0
    for b in exact.blocks:
        for site in exact.sites:
            want, got = exact.site(site, b)[:], fused.site(site, b)[:]
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    assert 0.0 < worst <= FUSED_TOLERANCE


def test_store_layout_with_plain_zarr(hf_zoo, hf_text, tmp_path):
    directory = hf_zoo("llama")
    out = tmp_path / "s.zarr"
    blockcap.run(
        model=str(directory), dataset=str(hf_text), out=str(out), block_idx=1, sites="all,attention",
        sample_len=8, stride=8, batch_size=8, progress=False,
    )  # fmt: skip
    g = zarr.open_group(str(out), mode="r")
    n, T = g["tokens"].shape
    assert g["tokens"].dtype == np.uint16  # 300 ids
    assert g["block1/heads_output"].shape == (n, T, 64)  # 4 query heads of 16, though only 2 kv heads
    assert g["block1/mlp_hidden"].shape == (n, T, 96)
    assert g["block1/attention"].shape == (n, 4, T, T)
    m = g.attrs["blockcap"]
    assert m["dims"] == {
        "n_layer": 3, "d_model": 64, "n_head": 4, "head_dim": 16, "d_mlp": 96, "vocab_size": 300,
        "context": 64,
    }  # fmt: skip
    assert m["model"]["family"] == "llama" and m["model"]["model"] == str(directory.resolve())
    assert m["model"]["weight_files"] == ["model.safetensors"]
    assert m["params"]["model_sha256"] == hf.files_sha256([directory / "model.safetensors"])
    stored = json.loads(np.asarray(g["tokenizer"][:]).tobytes())
    assert (
        stored["model"]["vocab"] == json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    )
    assert m["tokenizer"]["eos_id"] == 0 and m["tokenizer"]["sha256"] == m["model"]["tokenizer_sha256"]


def test_token_ids_above_65535_are_stored_as_uint32(hf_zoo, hf_text, tmp_path):
    directory = hf_zoo("gpt2", vocab_size=65_600, n_embd=16, n_head=2, n_layer=1)
    out = tmp_path / "s.zarr"
    blockcap.run(
        model=str(directory), dataset=str(hf_text), out=str(out), sites="block_output", sample_len=8,
        stride=8, batch_size=8, progress=False,
    )  # fmt: skip
    g = zarr.open_group(str(out), mode="r")
    assert g["tokens"].dtype == np.uint32
    assert np.array_equal(g["tokens"][:], windows_of(directory, hf_text.read_text(), 8, 8).numpy())


def test_cli_run_info_verify(hf_zoo, hf_text, tmp_path, capsys):
    directory = hf_zoo("neox_sequential")
    out = tmp_path / "s.zarr"
    main([
        "run", f"--model={directory}", f"--dataset={hf_text}", f"--out={out}", "--block_idx=all",
        "--sites=all", "--sample_len=12", "--stride=6", "--batch_size=8", "--progress=False",
    ])  # fmt: skip
    assert "complete:" in capsys.readouterr().out
    main(["info", str(out)])
    text = capsys.readouterr().out
    assert "block1/resid_mid" in text and "neox" in text
    main(["verify", str(out)])  # re-tokenizes the dataset with the stored tokenizer
    assert "ok:" in capsys.readouterr().out
    s = blockcap.open_store(out)
    assert s.blocks == (0, 1) and torch.equal(
        s.tokens[:].long(), windows_of(directory, hf_text.read_text(), 12, 6)
    )


def test_text_directory_and_jsonl_join_documents_with_eos(hf_zoo, tmp_path):
    directory = hf_zoo("gpt2")
    docs = [make_text(600, seed=s) for s in range(3)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i}.txt").write_text(doc)
    table = tmp_path / "docs.jsonl"
    table.write_text("".join(json.dumps({"id": i, "body": doc}) + "\n" for i, doc in enumerate(docs)))
    tok = auto_tokenizer(directory)
    stream = [
        *tok.encode(docs[0]),
        tok.eos_token_id,
        *tok.encode(docs[1]),
        tok.eos_token_id,
        *tok.encode(docs[2]),
    ]
    windows = torch.tensor(stream).unfold(0, 8, 4)
    values = []
    for dataset, extra in [(folder, {}), (table, {"text_column": "body"})]:
        out = tmp_path / f"{dataset.name}.zarr"
        blockcap.run(
            model=str(directory), dataset=str(dataset), out=str(out), split="all", sites="block_output",
            sample_len=8, stride=4, batch_size=8, progress=False, **extra,
        )  # fmt: skip
        s = blockcap.open_store(out)
        assert torch.equal(s.tokens[:].long(), windows)
        values.append(s.site("block_output")[:])
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS and (windows == tok.eos_token_id).any()
    assert torch.equal(values[0], values[1])


def fake_hub_cache(directory: Path, cache: Path, repo: str, commit: str) -> None:
    """``directory`` laid out as the hub client caches ``repo`` at ``commit`` (refs/main points there)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(directory, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_offline(monkeypatch, tmp_path) -> Path:
    """Offline hub access whatever the machine: an empty cache, and no endpoint reachable."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    return cache


def test_hub_id_loads_from_the_hub_cache_offline(hf_zoo, hf_text, tmp_path, hub_offline, monkeypatch):
    directory = hf_zoo("neox_parallel")
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(directory, hub_offline, "blockcap-tests/tiny-neox", commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = dict(
        dataset=str(hf_text), sites="ffwd_output", sample_len=8, stride=8, batch_size=8, progress=False
    )
    blockcap.run(model="blockcap-tests/tiny-neox", out=str(tmp_path / "hub.zarr"), **common)
    blockcap.run(model=str(directory), out=str(tmp_path / "dir.zarr"), **common)
    hub, local = blockcap.open_store(tmp_path / "hub.zarr"), blockcap.open_store(tmp_path / "dir.zarr")
    assert hub.meta["model"]["model"] == "blockcap-tests/tiny-neox" and hub.meta["model"]["commit"] == commit
    assert hub.params["model_sha256"] == local.params["model_sha256"]
    assert torch.equal(hub.site("ffwd_output")[:], local.site("ffwd_output")[:])
    adapter = hf.load(CaptureSpec(model="blockcap-tests/tiny-neox", revision=commit))
    assert adapter.provenance["revision"] == commit and adapter.family == "neox"


@pytest.mark.parametrize(
    "variant, dims",
    [
        ("gpt2_upcast", (2, 64, 4, 16, 96, 300, 64)),
        ("neox_parallel", (3, 64, 4, 16, 128, 300, 64)),
        ("llama_tied", (2, 64, 4, 16, 96, 300, 64)),
        ("mistral", (2, 64, 4, 16, 96, 300, 64)),
    ],
)
def test_load_reads_dims_and_identity(hf_zoo, variant, dims):
    directory = hf_zoo(variant)
    adapter = hf.load(CaptureSpec(model=str(directory)))
    assert tuple(adapter.dims.to_dict().values()) == dims
    assert not adapter.model.training and adapter.model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())
    assert adapter.model_sha256 == hf.files_sha256(hf.weight_files(directory))
    assert adapter.provenance["config"]["model_type"] == adapter.model.config.model_type
    assert adapter.tokenizer.eos_id == 0 and adapter.tokenizer.vocab_size == 300


def written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return written(path, "".join(json.dumps(r) + "\n" for r in rows))


def empty_directory(path: Path) -> Path:
    path.mkdir()
    return path


def model_only(directory: Path, to: Path) -> Path:
    """A copy of a model directory without its tokenizer."""
    shutil.copytree(directory, to, ignore=shutil.ignore_patterns("tokenizer*"))
    return to


def without_weight(directory: Path, to: Path, key: str) -> Path:
    """A copy of a model directory whose checkpoint lacks ``key``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(directory, to)
    weights = load_file(to / "model.safetensors")
    del weights[key]
    save_file(weights, to / "model.safetensors", metadata={"format": "pt"})
    return to


def offline_env(monkeypatch, args: dict) -> dict:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return args


def without_transformers(monkeypatch, args: dict) -> dict:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    return args


# (id, arguments made from (hf_zoo, tmp_path, monkeypatch), the error line's text)
BAD = [
    (  # no capture module, and a forward that does more than its layers (an embedding multiplier)
        "unsupported architecture",
        lambda z, t, m: {"model": z("granite"), "sites": "block_output"},
        "is a 'granite' model, which blockcap cannot capture: it has no capture module for it and the "
        "generic path cannot reproduce it: block 0's input differs from the model's own hidden_states",
    ),
    ("missing directory", lambda z, t, m: {"model": t / "nowhere" / "model"}, "does not exist"),
    ("no config.json", lambda z, t, m: {"model": empty_directory(t / "empty")}, "has no config.json"),
    (  # transformers 5 makes an empty GPT-2 tokenizer here
        "no tokenizer",
        lambda z, t, m: {"model": model_only(z("gpt2"), t / "bare")},
        "encodes text to no tokens (are its tokenizer files missing?); save the model's tokenizer beside it",
    ),
    (  # ... and raises for Llama
        "no tokenizer, llama",
        lambda z, t, m: {"model": model_only(z("llama"), t / "bare")},
        "; save the model's tokenizer beside it with tokenizer.save_pretrained",
    ),
    (
        "incomplete checkpoint",
        lambda z, t, m: {
            "model": without_weight(z("llama"), t / "part", "model.layers.1.mlp.up_proj.weight")
        },
        "lacks weights for 1 of its parameters (layers.1.mlp.up_proj.weight); transformers would initialise",
    ),
    ("model is a file", lambda z, t, m: {"model": z("gpt2") / "config.json"}, "is a file"),
    ("revision of a directory", lambda z, t, m: {"model": z("gpt2"), "revision": "main"}, "is for a hub id"),
    (
        "hub id offline",
        lambda z, t, m: offline_env(m, {"model": "blockcap-tests/no-such-model"}),
        "the Hugging Face hub could not be reached (or HF_HUB_OFFLINE is set) and the local hub cache "
        "lacks it; download it elsewhere (from_pretrained, then save_pretrained(DIR)) and pass "
        "--model=DIRECTORY",
    ),
    (
        "hub unreachable",
        lambda z, t, m: {"model": "blockcap-tests/no-such-model"},
        "the Hugging Face hub could not be reached",
    ),
    (
        "transformers missing",
        lambda z, t, m: without_transformers(m, {"model": z("gpt2")}),
        "needs transformers, which is not installed; install blockcap[hf]",
    ),
    (
        "sample_len beyond context",
        lambda z, t, m: {"model": z("gpt2"), "sample_len": 65},
        "--sample_len=65 is longer than the model's context of 64 tokens; use 1..64",
    ),
    (
        "resid_mid of a parallel residual",
        lambda z, t, m: {"model": z("neox_parallel"), "sites": "ffwd_output,resid_mid"},
        "uses a parallel residual",
    ),
    (
        "tokenizer larger than the embedding",
        lambda z, t, m: {"model": z("gpt2", vocab_size=260)},
        "but the model's embedding has 260 rows; the tokenizer does not belong to this model",
    ),
    (
        "text_column missing",
        lambda z, t, m: {
            "model": z("gpt2"),
            "dataset": jsonl(t / "d.jsonl", [{"body": "a b c"}]),
            "text_column": "text",
        },
        "line 1 has no text_column 'text'",
    ),
    (
        "empty text file",
        lambda z, t, m: {"model": z("gpt2"), "dataset": written(t / "e.txt", "")},
        "is empty (no tokens)",
    ),
    (
        "empty jsonl text",
        lambda z, t, m: {"model": z("llama"), "dataset": jsonl(t / "e.jsonl", [{"text": ""}])},
        "is empty (no tokens)",
    ),
]


@pytest.mark.usefixtures("hub_offline")
@pytest.mark.parametrize("make, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_no_store(hf_zoo, hf_text, tmp_path, monkeypatch, capsys, make, message):
    hf_zoo("gpt2")  # built before a case hides transformers
    args = {
        "dataset": hf_text, "out": tmp_path / "s.zarr", "sample_len": 8, "stride": 8, "batch_size": 8,
        "progress": False,
        **make(hf_zoo, tmp_path, monkeypatch),
    }  # fmt: skip
    capsys.readouterr()  # building a model shows save_pretrained's progress bar
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(["run", *[f"--{k}={v}" for k, v in args.items()]])
    assert time.perf_counter() - t0 < 5  # an offline hub fails at once, not after the client's retries
    assert exc.value.code == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("blockcap: error: ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


def store_files(store: Path) -> dict[str, bytes]:
    """Every chunk file of every array, by relative path (metadata files excluded)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


@pytest.mark.slow
def test_kill_mid_run_then_resume_is_bitwise(hf_zoo, hf_text, tmp_path, monkeypatch, capsys):
    directory = hf_zoo("llama")
    args = [
        "run", f"--model={directory}", f"--dataset={hf_text}", "--sample_len=16", "--stride=4",
        "--batch_size=8", "--chunk_windows=16", "--block_idx=0,2", "--sites=all", "--progress=False",
    ]  # fmt: skip
    writes: list[str] = []

    def count(
        op: str, key: str
    ) -> None:  # as tests/killer.py counts: files written to a temporary name do not
        if op != "put-partial":
            writes.append(key)

    monkeypatch.setattr(location, "WRITE_HOOKS", [count])
    main([*args, f"--out={tmp_path / 'ref.zarr'}"])
    monkeypatch.undo()
    crash = tmp_path / "crash.zarr"
    proc = subprocess.run(
        [sys.executable, "tests/killer.py", str(len(writes) // 2), *args, f"--out={crash}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert zarr.open_group(str(crash), mode="r").attrs["blockcap"]["state"] == "incomplete"
    capsys.readouterr()
    main([*args, f"--out={crash}"])
    assert "resumed and completed" in capsys.readouterr().out
    assert store_files(crash) == store_files(tmp_path / "ref.zarr")
    assert blockcap.verify(crash) == []
