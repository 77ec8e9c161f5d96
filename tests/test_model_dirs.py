"""Model directories that must not load (issue 21, items 4 and 5): one line, exit 2, no store.

No model's own Python ever runs: a config whose model exists only as code shipped beside it
(``auto_map``) is refused before transformers could import it, even where a terminal would be
asked and answered "y". Bad sizes, heads that do not divide, experts that are not there, shapes
the weights contradict and pickled objects in weights are each one line naming the field or tensor.
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch

from blockcap.cli import EXIT_ERROR, main
from tests.hf_models import NEEDS_TRANSFORMERS

pytestmark = NEEDS_TRANSFORMERS
CUSTOM_CODE = "from pathlib import Path\n(Path(__file__).resolve().parent / 'IMPORTED').write_text('ran')\n"


def edited(directory: Path, to: Path, **changes) -> Path:
    """A copy of a model directory with ``config.json`` keys changed (None deletes a key)."""
    shutil.copytree(directory, to)
    config = json.loads((to / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (to / "config.json").write_text(json.dumps(config))
    return to


def with_custom_code(directory: Path, to: Path, model_type: str, file: str = "config.json") -> Path:
    """A copy whose ``file`` points at Python shipped beside it, which marks IMPORTED when imported."""
    shutil.copytree(directory, to)
    for name in ("configuration_tiny.py", "modeling_tiny.py", "tokenization_tiny.py"):
        (to / name).write_text(CUSTOM_CODE)
    classes = {
        "config.json": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModel": "modeling_tiny.TinyModel",
        },
        "tokenizer_config.json": {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]},
    }[file]
    data = json.loads((to / file).read_text())
    data["auto_map"] = classes
    if file == "config.json":
        data["model_type"] = model_type
    (to / file).write_text(json.dumps(data))
    return to


def pickled_bin(directory: Path, to: Path) -> Path:
    """A copy whose weights are a pickled ``.bin`` holding a global that is not a tensor."""
    from safetensors.torch import load_file

    shutil.copytree(directory, to, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(directory / "model.safetensors")
    state["extra"] = print  # torch.save pickles a reference to builtins.print
    torch.save(state, to / "pytorch_model.bin")
    return to


def written(directory: Path, to: Path, text: str) -> Path:
    shutil.copytree(directory, to)
    (to / "config.json").write_text(text)
    return to


# (id, the model directory made from (hf_zoo, tmp_path), the error line's text or its parts)
BAD = [
    (
        "remote code, unknown type",
        lambda z, t: with_custom_code(z("gpt2"), t / "m", "tiny_custom"),
        "config.json is a 'tiny_custom' model whose code ships beside it (auto_map), which transformers "
        "does not implement; blockcap never runs a model's own Python",
    ),
    (
        "n_head negative",
        lambda z, t: edited(z("gpt2"), t / "m", n_head=-4),
        "config.json has n_head=-4; it must be",
    ),
    (
        "n_head zero",
        lambda z, t: edited(z("gpt2"), t / "m", n_head=0),
        "has n_head=0; it must be a positive integer",
    ),
    (
        "layers a float",
        lambda z, t: edited(z("llama"), t / "m", num_hidden_layers=2.5),
        "num_hidden_layers=2.5",
    ),
    (
        "heads do not divide",
        lambda z, t: edited(z("gpt2"), t / "m", n_head=5),
        "config.json has n_embd=64, which n_head=5 does not divide into heads; fix config.json",
    ),
    (
        "kv heads do not divide",
        lambda z, t: edited(z("llama"), t / "m", num_key_value_heads=3),
        "has num_key_value_heads=3, which does not divide num_attention_heads=4 query heads into groups",
    ),
    (
        "more experts chosen than there are",
        lambda z, t: edited(z("mixtral"), t / "m", num_experts_per_tok=5),
        "has num_experts_per_tok=5, more than its 4 experts",
    ),
    (
        "empty sliding window",
        lambda z, t: edited(z("mistral"), t / "m", sliding_window=0),
        "has sliding_window=0; use a positive window",
    ),
    (
        "shape mismatch",
        lambda z, t: edited(z("gpt2"), t / "m", n_inner=100),
        "tensor h.0.mlp.c_fc.bias has shape (256,) in the weights, but config.json makes it (100,) "
        "(and 8 more); the config does not belong to these weights",
    ),
    (
        "pickled global in weights",
        lambda z, t: pickled_bin(z("gpt2"), t / "m"),
        (
            "the weights of --model=",
            "(pytorch_model.bin) hold pickled Python objects, not only tensors (Unsupported global: GLOBAL "
            "print was not an allowed global by default); blockcap loads tensors only",
        ),
    ),
    (
        "config not JSON",
        lambda z, t: written(z("gpt2"), t / "m", "{'n_head': 4"),
        "config.json is not readable JSON",
    ),
    (
        "config without type",
        lambda z, t: edited(z("gpt2"), t / "m", model_type=None),
        "config.json names no model_type",
    ),
    (
        "type transformers does not know",
        lambda z, t: edited(z("gpt2"), t / "m", model_type="no_such_model"),
        "config.json has model_type 'no_such_model', which transformers 5.",
    ),
    (
        "bidirectional attention",
        lambda z, t: edited(z("gemma3_text"), t / "m", use_bidirectional_attention=True),
        "makes attention bidirectional (an embedding model, not a causal language model)",
    ),
    (
        "encoder-decoder",
        lambda z, t: edited(z("gpt2"), t / "m", is_encoder_decoder=True),
        "encoder-decoder model",
    ),
]


@pytest.fixture
def answer_yes(monkeypatch):
    """A terminal that answers every question "y" (transformers asks before running shipped code)."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    return asked


@pytest.mark.parametrize("make, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_directory_is_one_line_and_no_store(hf_zoo, hf_text, tmp_path, capsys, answer_yes, make, message):
    directory, out = make(hf_zoo, tmp_path), tmp_path / "s.zarr"
    capsys.readouterr()  # building a model shows save_pretrained's progress bar
    with pytest.raises(SystemExit) as exc:
        main([
            "run", f"--model={directory}", f"--dataset={hf_text}", f"--out={out}", "--sites=block_output",
            "--sample_len=8", "--progress=False",
        ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert (
        exc.value.code == EXIT_ERROR and err.startswith("blockcap: error: ") and len(err.splitlines()) == 1
    ), err
    assert all(part in err for part in ((message,) if isinstance(message, str) else message)), err
    assert not out.exists() and not answer_yes and not (directory / "IMPORTED").exists()


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_known_type_ignores_shipped_code(hf_zoo, hf_text, tmp_path, answer_yes, file):
    """An ``auto_map`` beside a type transformers implements loads transformers' own code."""
    directory = with_custom_code(hf_zoo("gpt2"), tmp_path / "m", "gpt2", file)
    main([
        "run", f"--model={directory}", f"--dataset={hf_text}", f"--out={tmp_path / 's.zarr'}",
        "--sites=block_output", "--sample_len=8", "--progress=False",
    ])  # fmt: skip
    assert (tmp_path / "s.zarr").exists() and not answer_yes and not (directory / "IMPORTED").exists()
