"""Checkpoints load safely and fail with one clear line."""

import os
import pickle

import pytest
import torch

from blockcap.capture.chargpt.checkpoint import bundled_path, load_checkpoint, save_checkpoint
from blockcap.capture.chargpt.model import GPT, GPTConfig
from blockcap.core.errors import BlockcapError
from tests.reference import GPTLanguageModel


def test_blockcap_checkpoint_round_trip(tiny_model, tmp_path):
    model, tok = tiny_model
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, tok.vocab, {"val_loss": 1.5})
    loaded = load_checkpoint(path)
    assert loaded.vocab == tok.vocab and loaded.meta == {"val_loss": 1.5}
    assert loaded.model.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    assert len(loaded.sha256) == 64


def test_original_state_dict_loads_unchanged(tmp_path):
    torch.manual_seed(0)
    ref = GPTLanguageModel(65, 48, 6, 2, 16)
    path = tmp_path / "shakespeare.pt"
    torch.save(ref.state_dict(), path)  # exactly what the original code saved
    loaded = load_checkpoint(path)
    assert loaded.vocab is None
    assert (loaded.model.config.n_head, loaded.model.config.n_layer) == (6, 2)
    idx = torch.randint(0, 65, (2, 16))
    with torch.inference_mode():
        assert torch.equal(ref.eval()(idx)[0], loaded.model(idx)[0])


def test_bundled_checkpoint_loads_without_dataset():
    loaded = load_checkpoint()
    assert loaded.path == bundled_path()
    assert len(loaded.vocab) == loaded.model.config.vocab_size == 65
    assert os.path.getsize(bundled_path()) <= 5 * 1024 * 1024
    assert loaded.meta["val_loss"] <= 1.80


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "not a loadable checkpoint"),
        (None, "does not exist"),
        (  # torch.load read such text as a legacy checkpoint and failed with "list index out of range"
            b"root:x:0:0:root:/root:/bin/bash\n",
            "is not a loadable checkpoint: it is neither a torch.save zip archive nor a pickle; pass a file "
            "written by torch.save or blockcap train",
        ),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BlockcapError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint(ckpt, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(BlockcapError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def test_wrong_shapes(tiny_model, tmp_path):
    model, tok = tiny_model
    state = dict(model.state_dict())
    state["blocks.0.sa.proj.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(BlockcapError, match=r"blocks.0.sa.proj.weight has shape \(3, 3\)"):
        load_checkpoint(path)


def test_not_a_dict(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(BlockcapError, match="holds a Tensor"):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"x": _Exploit()}, path)  # torch.save pickles the object, __reduce__ and all
    with pytest.raises(BlockcapError, match="not a loadable checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()
    path.write_bytes(pickle.dumps(_Exploit()))  # and a bare pickle, not even a torch file
    with pytest.raises(BlockcapError):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_newer_checkpoint_version(tiny_model, tmp_path):
    model, tok = tiny_model
    obj = {
        "format": "blockcap-checkpoint",
        "version": 99,
        "config": model.config.to_dict(),
        "vocab": tok.vocab,
        "state_dict": model.state_dict(),
        "meta": {},
    }
    torch.save(obj, tmp_path / "new.pt")
    with pytest.raises(BlockcapError, match="newer"):
        load_checkpoint(tmp_path / "new.pt")


def test_vocabulary_must_match_model(tiny_model, tmp_path):
    model, tok = tiny_model
    save_checkpoint(tmp_path / "v.pt", model, tok.vocab[:-1], {})
    with pytest.raises(BlockcapError, match="vocabulary has"):
        load_checkpoint(tmp_path / "v.pt")


def test_gpt_from_checkpoint_is_in_eval_mode(ckpt):
    assert not load_checkpoint(ckpt).model.training
    assert isinstance(load_checkpoint(ckpt).model, GPT)
    assert GPTConfig().dropout == 0.2


@pytest.mark.parametrize(
    "path, kind", [("/dev/null", "a character device"), (None, "a directory")], ids=["device", "directory"]
)
def test_weights_that_are_no_file_are_one_line(tmp_path, capsys, path, kind):
    """Not "does not exist" for something that exists: one line, exit 2, no store (issue 21, item 11)."""
    from blockcap.cli import EXIT_ERROR, main

    path = path or str(tmp_path)
    with pytest.raises(BlockcapError, match=f"weights file {path} is not a regular file \\(it is {kind}\\)"):
        load_checkpoint(path)
    data, out = tmp_path / "d.txt", tmp_path / "s.zarr"
    data.write_text("hello world " * 20)
    with pytest.raises(SystemExit) as exc:
        main(["run", f"--weights={path}", f"--dataset={data}", f"--out={out}", "--progress=False"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == EXIT_ERROR and len(err.splitlines()) == 1 and "is not a regular file" in err
    assert not out.exists()
