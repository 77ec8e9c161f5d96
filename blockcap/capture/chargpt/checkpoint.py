"""Loading and saving weights: blockcap checkpoints and raw state dicts of the original code.

Both load with ``torch.load(weights_only=True)``, so a checkpoint can never run pickled code.
The original ``torch.save(model.state_dict(), ...)`` layout is the layout of
``blockcap.model.GPT`` itself (same module names), so a raw state dict loads unchanged once its
config has been inferred from tensor shapes:

=====================================================  ===========================
key                                                    gives
=====================================================  ===========================
``token_embedding_table.weight`` (vocab, n_embed)      vocab_size, n_embed
``position_embedding_table.weight`` (block, n_embed)   block_size
``blocks.{i}.…``                                       n_layer = 1 + max i
``blocks.0.sa.heads.{h}.key.weight``                   n_head = 1 + max h
=====================================================  ===========================

blockcap's own checkpoints leave out the ``blocks.{i}.sa.heads.{h}.tril`` causal-mask buffers
(constant, and 9 MB of the 12 MB of the small model); loading rebuilds them.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from blockcap.capture.chargpt.model import GPT, GPTConfig, causal_mask, state_shapes
from blockcap.core.errors import BlockcapError

FORMAT = "blockcap-checkpoint"
# how every file torch.save writes starts: a zip archive (since torch 1.6) or a pickle (before)
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")
FORMAT_VERSION = 1
BUNDLED = "bundled"


def bundled_path() -> Path:
    """Path of the trained default checkpoint shipped inside the package."""
    return Path(str(resources.files("blockcap") / "weights" / "small.pt"))


@dataclass
class Loaded:
    """A loaded model with what came with it."""

    model: GPT
    vocab: str | None  # None for a raw state dict: the vocabulary comes from the dataset
    path: Path
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


def infer_config(state: dict[str, torch.Tensor], dropout: float = 0.0) -> GPTConfig:
    """Model size from the shapes of an original-layout state dict."""
    try:
        vocab_size, n_embed = state["token_embedding_table.weight"].shape
        block_size = state["position_embedding_table.weight"].shape[0]
    except (KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"missing or malformed embedding table ({e})") from None
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    heads = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.0\.sa\.heads\.(\d+)\.", k))}
    if not layers or not heads:
        raise ValueError("no transformer blocks or attention heads found")
    return GPTConfig(
        vocab_size=vocab_size,
        n_embed=n_embed,
        n_head=max(heads) + 1,
        n_layer=max(layers) + 1,
        block_size=block_size,
        dropout=dropout,
    )


def _is_mask(key: str) -> bool:
    return key.endswith(".tril")


def _build(state: dict[str, Any], config: GPTConfig, masks_included: bool = True) -> GPT:
    """The model of ``config`` holding ``state``, checked against the config before any allocation."""
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{bad} is a {type(state[bad]).__name__}, not a tensor")
    expected = state_shapes(config)  # checked before building: an absurd config allocates nothing
    if not masks_included:
        mask = causal_mask(config)
        state = {**state, **{k: mask for k in expected if _is_mask(k)}}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"keys differ from the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"{k} has shape {tuple(v.shape)}, the model needs {expected[k]}")
    model = GPT(config, init=False)  # the weights replace any initialisation
    model.load_state_dict(state)
    return model.eval()


_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"),
)  # fmt: skip


def _kind(p: Path) -> str:
    mode = p.stat().st_mode
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def _reason(e: Exception) -> str:
    """The informative line of a torch.load error (weights-only refusals bury it mid-text)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error" in ln or "Unsupported" in ln:
            return ln
    return lines[0] if lines else type(e).__name__


def load_checkpoint(path: str | os.PathLike[str] | None = None) -> Loaded:
    """Load a blockcap checkpoint or an original state dict; ``None`` or ``"bundled"`` is the default."""
    p = bundled_path() if path in (None, BUNDLED) else Path(path).expanduser()
    if p.exists() and not p.is_file():
        raise BlockcapError(
            f"weights file {p} is not a regular file (it is {_kind(p)}); pass --weights=PATH of a checkpoint "
            f"file or omit it for the bundled model"
        )
    if not p.is_file():
        raise BlockcapError(
            f"weights file {p} does not exist; pass --weights=PATH or omit it for the bundled model"
        )
    raw = p.read_bytes()
    if not raw.startswith(CHECKPOINT_MAGIC):
        raise BlockcapError(
            f"weights file {p} is not a loadable checkpoint: it is neither a torch.save zip archive nor a "
            f"pickle; pass a file written by torch.save or blockcap train"
        )
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any file that is not a checkpoint: pickle, zip, key errors
        if isinstance(e, MemoryError):
            raise

        raise BlockcapError(f"weights file {p} is not a loadable checkpoint ({_reason(e)})") from None
    if not isinstance(obj, dict):
        raise BlockcapError(f"weights file {p} holds a {type(obj).__name__}, not a checkpoint or state dict")
    try:
        if obj.get("format") == FORMAT:
            if obj.get("version", 0) > FORMAT_VERSION:
                raise ValueError(f"checkpoint version {obj['version']} is newer than this blockcap")
            config = GPTConfig(**obj["config"])
            model = _build(obj["state_dict"], config, masks_included=False)
            vocab, meta = obj["vocab"], obj.get("meta", {})
            if len(vocab) != config.vocab_size:
                raise ValueError(f"vocabulary has {len(vocab)} characters, the model {config.vocab_size}")
        else:
            model, vocab, meta = _build(obj, infer_config(obj)), None, {}
    except (ValueError, KeyError, TypeError) as e:
        raise BlockcapError(f"weights file {p} does not fit the model: {e}") from None
    return Loaded(model, vocab, p, hashlib.sha256(raw).hexdigest(), meta)


def save_checkpoint(path: str | os.PathLike[str], model: GPT, vocab: str, meta: dict[str, Any]) -> None:
    """Write a blockcap checkpoint (config, vocabulary, weights, training metadata) atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".part")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not _is_mask(k)}
    obj = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "vocab": vocab,
        "state_dict": state,
        "meta": meta,
    }
    torch.save(obj, tmp)
    os.replace(tmp, p)
