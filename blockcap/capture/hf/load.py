"""Hugging Face models: a ``save_pretrained`` directory or a hub id, loaded into a family adapter.

GPT-2, GPT-NeoX (Pythia) and the Llama family (Llama, Mistral, Qwen2) load through transformers
(the optional extra ``hf``) in float32 with eager attention: the implementation the capture
modules re-execute bit for bit (the pipeline casts to ``model_dtype`` afterwards). Every way a load
can fail is one BlockcapError line, and an unreachable hub fails at once instead of after the hub
client's retries. The attention helpers the family modules share live here too.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import socket
import threading
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn
from torch.nn import functional as F

from blockcap.capture.adapter import Adapter
from blockcap.core.dims import ModelDims
from blockcap.core.errors import BlockcapError
from blockcap.core.spec import CaptureSpec
from blockcap.data.digest import sha256_file
from blockcap.data.tokenizers import HFTokenizer

# config.model_type -> (family module, adapter class)
FAMILIES = {
    "gpt2": ("gpt2", "GPT2"),
    "gpt_neox": ("neox", "NeoX"),
    "llama": ("llama", "Llama"),
    "mistral": ("llama", "Llama"),
    "qwen2": ("llama", "Llama"),
}
SUPPORTED = "GPT-2 (gpt2), GPT-NeoX/Pythia (gpt_neox), Llama (llama), Mistral (mistral), Qwen2 (qwen2)"
HUB_PROBE_SECONDS = 3.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HFAdapter(Adapter):
    """A transformers base model (``GPT2Model``, ``GPTNeoXModel``, ``LlamaModel``, ...)."""

    @staticmethod
    @abstractmethod
    def dims_of(model: nn.Module) -> ModelDims:
        """The sizes, read from the model's modules (the truth where configs leave fields out)."""

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move and cast the weights; rotary inverse frequencies stay float32.

        That is what transformers does when it loads a model in lower precision; cast to bfloat16
        they would misplace the angles of distant positions.
        """
        rotary = getattr(self.model, "rotary_emb", None)
        kept = dict(rotary.named_buffers()) if rotary is not None else {}
        self.model.to(device=device, dtype=dtype)
        for name, buf in kept.items():
            setattr(rotary, name, buf.to(device))


def _missing_extra(model: str) -> BlockcapError:
    return BlockcapError(
        f"model={model!r} needs transformers, which is not installed; install blockcap[hf] "
        f"(pip install 'blockcap[hf]')"
    )


def _unreachable(model: str) -> BlockcapError:
    return BlockcapError(
        f"model={model!r} is not a local directory, the Hugging Face hub could not be reached (or "
        f"HF_HUB_OFFLINE is set) and the local hub cache lacks it; download it elsewhere (from_pretrained, "
        f"then save_pretrained(DIR)) and pass model=DIRECTORY"
    )


def _locate(model: str, revision: str | None) -> tuple[Path | str, bool]:
    """``model`` as an existing directory (checked) or a hub id; True when it is a directory."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BlockcapError(
                f"model={model!r} is a file; pass a directory written by save_pretrained or a hub id"
            )
        if not (path / "config.json").is_file():
            raise BlockcapError(
                f"model directory {path} has no config.json; pass a directory written by save_pretrained"
            )
        if revision is not None:
            raise BlockcapError(f"revision={revision!r} is for a hub id, not the directory {path}")
        return path.resolve(), True
    if not _HUB_ID.fullmatch(model) or ".." in model:
        raise BlockcapError(
            f"model directory {path} does not exist; pass a directory written by save_pretrained "
            f"or a hub id such as EleutherAI/pythia-70m"
        )
    return model, False


def _offline_by_env() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable() -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``HUB_PROBE_SECONDS``.

    Behind a proxy a direct connection proves nothing, so the hub client decides there. The probe
    runs in a thread because name resolution has no timeout of its own.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
            opened.append(True)
        except (OSError, UnicodeError):
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_SECONDS)
    return bool(opened)


def _hub_options(name: str, revision: str | None) -> dict[str, Any]:
    """``from_pretrained`` options for a hub id: from the cache alone when the hub is out of reach.

    Offline, a model missing from the cache fails here at once, before transformers is imported,
    instead of after the hub client's retries.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise _missing_extra(name) from None
    offline = _offline_by_env() or not _hub_reachable()
    if offline and not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        raise _unreachable(name)
    return {"revision": revision, "local_files_only": offline}


def _snapshot(name: str, revision: str | None) -> Path:
    """The cache directory (named by its commit) the hub client resolved ``revision`` to."""
    from huggingface_hub import try_to_load_from_cache

    return Path(str(try_to_load_from_cache(name, "config.json", revision=revision))).parent


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def _loading(
    model: str,
    what: str,
    hub: bool,
    fix: str = "pass a complete save_pretrained directory or an existing hub id",
) -> Iterator[None]:
    """Turn what transformers raises while loading ``what`` into one line ending with ``fix``."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        from huggingface_hub.errors import LocalEntryNotFoundError

        if hub and any(isinstance(x, LocalEntryNotFoundError) for x in (e, e.__cause__)):
            raise _unreachable(model) from None
        raise BlockcapError(
            f"could not load the {what} of model={model!r} ({_first_line(e)}); {fix}"
        ) from None


@contextmanager
def _quiet(tf_logging: Any) -> Iterator[None]:
    """No load report or progress bar: a base model loaded from a ``*ForCausalLM`` checkpoint leaves
    its head's weights unused, which transformers reports as a warning; missing weights, the report
    that matters, are checked by ``load`` itself."""
    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: its ``*.safetensors``, else its ``*.bin``, sorted."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise BlockcapError(f"model directory {directory} has no weight files (*.safetensors or *.bin)")


def files_sha256(files: list[Path]) -> str:
    """One sha256 over several files: of their ``name\\0sha256\\n`` lines, in the given order."""
    lines = "".join(f"{p.name}\0{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _tokenizer(transformers: Any, source: Path | str, model: str, hub: bool, kw: dict) -> HFTokenizer:
    from tokenizers import Tokenizer

    with _loading(
        model, "tokenizer", hub, "save the model's tokenizer beside it with tokenizer.save_pretrained"
    ):
        tok = transformers.AutoTokenizer.from_pretrained(source, **kw)
    backend = getattr(tok, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise BlockcapError(
            f"the tokenizer of model={model!r} ({type(tok).__name__}) is not a fast tokenizer; blockcap "
            f"stores its tokenizer.json: save the model with a fast tokenizer"
        )
    if not backend.encode("The quick brown fox.", add_special_tokens=False).ids:
        raise BlockcapError(  # transformers 5 builds an empty tokenizer when it finds no tokenizer files
            f"the tokenizer of model={model!r} encodes text to no tokens (are its tokenizer files missing?); "
            f"save the model's tokenizer beside it with tokenizer.save_pretrained"
        )
    whole = Tokenizer.from_str(backend.to_str())  # a copy: the model's own tokenizer is left as it is
    whole.no_truncation()  # a tokenizer.json may carry a training-time max_length
    whole.no_padding()
    return HFTokenizer(whole.to_str(), tok.eos_token_id, tok.bos_token_id)


def load(spec: CaptureSpec) -> HFAdapter:
    """The adapter for ``spec.model``: a ``save_pretrained`` directory, or a hub id at ``spec.revision``."""
    name = str(spec.model)
    source, local = _locate(name, spec.revision)
    kw = {"local_files_only": True} if local else _hub_options(name, spec.revision)
    try:
        import transformers
    except ImportError:
        raise _missing_extra(name) from None
    with _loading(name, "config", not local):
        config = transformers.AutoConfig.from_pretrained(source, **kw)
    if config.model_type not in FAMILIES:
        raise BlockcapError(
            f"model={name!r} is a {config.model_type!r} model, which blockcap cannot capture; "
            f"it supports {SUPPORTED}"
        )
    module, cls_name = FAMILIES[config.model_type]
    cls: type[HFAdapter] = getattr(importlib.import_module(f"blockcap.capture.hf.{module}"), cls_name)
    tokenizer = _tokenizer(transformers, source, name, not local, kw)
    with _loading(name, "weights", not local), _quiet(transformers.utils.logging):
        model, info = transformers.AutoModel.from_pretrained(
            source, config=config, dtype=torch.float32, attn_implementation="eager",
            output_loading_info=True, **kw,
        )  # fmt: skip
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise BlockcapError(
            f"model={name!r} lacks weights for {len(missing)} of its parameters ({shown}); transformers "
            f"would initialise them randomly: pass a complete checkpoint"
        )
    directory = Path(source) if local else _snapshot(name, spec.revision)
    files = weight_files(directory)
    provenance = {
        "family": cls.family,
        "model": str(source),
        "revision": spec.revision,
        "commit": None if local else directory.name,
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "transformers_version": transformers.__version__,
        "weight_files": [p.name for p in files],
        "tokenizer_sha256": tokenizer.sha256,
    }
    model.eval()
    return cls(model, cls.dims_of(model), tokenizer, files_sha256(files), provenance)


# Attention helpers shared by the family modules.


def causal_allowed(T: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(T, T) bool: query i may attend key j when j <= i (and j > i - window for a sliding window)."""
    i = torch.arange(T, device=device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed = allowed & (i[None, :] > i[:, None] - window)
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, T): 0 where allowed, ``finfo(dtype).min`` elsewhere.

    Eager attention in transformers ignores ``is_causal``: causality is only this mask, and these
    are the values its mask functions produce, so adding it is bitwise the library's own step.
    """
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, allowed: torch.Tensor,
    window: int | None, want_pattern: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """SDPA over (B, heads, T, head_dim) q and (B, kv_heads, T, head_dim) k, v.

    Returns the output as (B, T, heads, head_dim), like the eager functions, and when asked the
    softmax pattern computed explicitly (SDPA does not return it).
    """
    gqa = q.shape[1] != k.shape[1]
    if window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    pattern = None
    if want_pattern:
        keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if gqa else k
        scores = torch.matmul(q, keys.transpose(-2, -1)) * scaling + additive_mask(allowed, q.dtype)
        pattern = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return out.transpose(1, 2), pattern
