"""Hugging Face models: a ``save_pretrained`` directory or a hub id, loaded into a family adapter.

The families in ``FAMILIES`` load through transformers (the optional extra ``hf``) in float32 with
eager attention: the implementation their capture modules re-execute bit for bit (the pipeline
casts to ``model_dtype`` afterwards). Any other decoder transformers implements goes to the
generic path (block inputs and outputs), if its layout is one it knows. No model's own Python
ever runs (``trust_remote_code=False``, and ``auto_map`` configs are refused before transformers
sees them); configs are checked before the model is built, and every way a load can fail is one
BlockcapError line naming the file or the field and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from blockcap.capture.hf.adapter import HFAdapter
from blockcap.capture.hf.attention import config_windows
from blockcap.capture.hf.checks import (
    check_shapes,
    check_sizes,
    mismatch,
    read_config,
    refuse_remote_code,
    unpickling_reason,
)
from blockcap.capture.hf.hub import hub_options, locate, missing_extra, snapshot, unreachable
from blockcap.core.errors import BlockcapError
from blockcap.core.spec import CaptureSpec
from blockcap.data.digest import sha256_files
from blockcap.data.tokenizers import HFTokenizer

# config.model_type -> (family module, adapter class); any other type tries the generic path
FAMILIES = {
    "gpt2": ("gpt2", "GPT2"),
    "gpt_neox": ("neox", "NeoX"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "phi3"), ("llama", "Llama")),
    **dict.fromkeys(("gemma2", "gemma3_text", "gemma3"), ("gemma", "Gemma")),
    "olmo2": ("olmo2", "Olmo2"),
    **dict.fromkeys(("mixtral", "qwen2_moe", "olmoe", "qwen3_moe"), ("moe", "MoE")),
}
SUPPORTED = (
    "every site of GPT-2 (gpt2), GPT-NeoX/Pythia (gpt_neox), Llama (llama), Mistral (mistral), Qwen2 "
    "(qwen2), Qwen3 (qwen3), Phi-3 (phi3), Gemma 2 (gemma2), Gemma 3 (gemma3, gemma3_text), OLMo 2 "
    "(olmo2), Mixtral (mixtral), Qwen2-MoE (qwen2_moe), OLMoE (olmoe) and Qwen3-MoE (qwen3_moe), and "
    "block_input/block_output of other decoders laid out like Llama, OPT or BLOOM"
)
MULTIMODAL = {"gemma3": "language_model"}  # model_type -> the base model's attribute holding the text model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def _loading(
    model: str,
    what: str,
    hub: bool,
    fix: str = "pass a complete save_pretrained directory or an existing hub id",
    files: str = "",
) -> Iterator[None]:
    """Turn what transformers raises while loading ``what`` (read from ``files``, where known) into
    one line ending with ``fix``."""
    try:
        yield
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a pickled object
        raise BlockcapError(
            f"the {what} of model={model!r} ({files or 'from the hub'}) hold pickled Python objects, not "
            f"only tensors ({unpickling_reason(e)}); blockcap loads tensors only: re-save them with "
            f"save_pretrained (safetensors)"
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ArithmeticError) as e:
        from huggingface_hub.errors import LocalEntryNotFoundError

        if hub and any(isinstance(x, LocalEntryNotFoundError) for x in (e, e.__cause__)):
            raise unreachable(model) from None
        if "trust_remote_code" in str(e):
            raise BlockcapError(
                f"model={model!r} is a model whose code ships beside it, which transformers does not "
                f"implement; blockcap never runs a model's own Python: use a model transformers implements"
            ) from None
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
    lines = "".join(f"{p.name}\0{digest}\n" for p, digest in zip(files, sha256_files(files), strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()


def _tokenizer(
    transformers: Any, source: Path | str, model: str, hub: bool, kw: dict[str, Any]
) -> HFTokenizer:
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


def _family(model_type: str) -> type[HFAdapter]:
    module, cls_name = FAMILIES.get(model_type, ("generic", "Generic"))
    return getattr(importlib.import_module(f"blockcap.capture.hf.{module}"), cls_name)


def _check_config(name: str, where: str, config: Any) -> None:
    """Refuse what no capture can run: encoder-decoders, bad sizes, empty sliding windows."""
    if getattr(config, "is_encoder_decoder", False):
        raise BlockcapError(
            f"model={name!r} is a {config.model_type!r} encoder-decoder model; blockcap captures "
            f"decoder-only language models"
        )
    text = config.get_text_config()
    check_shapes(where, text)
    windows = config_windows(text, getattr(text, "num_hidden_layers", 0))
    if any(w is not None and w < 1 for w in windows):
        raise BlockcapError(
            f"{where} has sliding_window={text.sliding_window}; use a positive window: fix config.json"
        )


def _refuse_generic(name: str, model_type: str, why: str) -> BlockcapError:
    return BlockcapError(
        f"model={name!r} is a {model_type!r} model, which blockcap cannot capture: it has no capture module "
        f"for it and {why}; it captures {SUPPORTED}"
    )


def _generic_check(name: str, model: Any) -> None:
    """The generic path must know the model's layout and reproduce its hidden states on a probe."""
    from blockcap.capture.hf.generic import layout_of, verify

    layout = layout_of(model)
    if isinstance(layout, str):
        raise _refuse_generic(name, model.config.model_type, f"the generic path cannot run it: {layout}")
    failure = verify(model, layout)
    if failure:
        raise _refuse_generic(
            name, model.config.model_type, f"the generic path cannot reproduce it: {failure}"
        )


def load(spec: CaptureSpec) -> HFAdapter:
    """The adapter for ``spec.model``: a ``save_pretrained`` directory, or a hub id at ``spec.revision``."""
    name = str(spec.model)
    source, local = locate(name, spec.revision)
    where = str(Path(source) / "config.json") if local else f"the config.json of model={name!r}"
    listed = ""  # the weight files, named in errors while loading
    if local:  # all before transformers is imported, let alone anything in the directory
        raw = read_config(Path(source))
        check_sizes(where, raw)
        listed = ", ".join(p.name for p in weight_files(Path(source)))
    kw = {"local_files_only": True} if local else hub_options(name, spec.revision)
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        raise missing_extra(name) from None
    if local:
        refuse_remote_code(where, raw, CONFIG_MAPPING_NAMES)
        if raw["model_type"] not in CONFIG_MAPPING_NAMES:
            raise BlockcapError(
                f"{where} has model_type {raw['model_type']!r}, which transformers "
                f"{transformers.__version__} does not implement; pass a model it implements (or upgrade "
                f"transformers)"
            )
    kw["trust_remote_code"] = False
    with _loading(name, "config", not local):
        config = transformers.AutoConfig.from_pretrained(source, **kw)
    if not local:
        check_sizes(where, config.to_dict())
    _check_config(name, where, config)
    cls = _family(config.model_type)
    tokenizer = _tokenizer(transformers, source, name, not local, kw)
    with _loading(name, "weights", not local, files=listed), _quiet(transformers.utils.logging):
        model, info = transformers.AutoModel.from_pretrained(
            source, config=config, dtype=torch.float32, attn_implementation="eager",
            output_loading_info=True, ignore_mismatched_sizes=True, **kw,
        )  # fmt: skip
    if info["mismatched_keys"]:
        raise mismatch(f"model={name!r}", info["mismatched_keys"])
    model.eval()
    if config.model_type in MULTIMODAL:  # capture the text model; the other towers stay unused
        model = getattr(model, MULTIMODAL[config.model_type])
    if cls.family == "generic":  # first: a model it cannot run may lack weights it would never use
        _generic_check(name, model)
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise BlockcapError(
            f"model={name!r} lacks weights for {len(missing)} of its parameters ({shown}); transformers "
            f"would initialise them randomly: pass a complete checkpoint"
        )
    directory = Path(source) if local else snapshot(name, spec.revision)
    files = weight_files(directory)
    provenance = {
        "family": cls.family,
        "model_type": config.model_type,
        "model": str(source),
        "revision": spec.revision,
        "commit": None if local else directory.name,
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "transformers_version": transformers.__version__,
        "weight_files": [p.name for p in files],
        "tokenizer_sha256": tokenizer.sha256,
    }
    if cls.family == "moe":  # the experts run the implementation transformers chose
        provenance["experts_implementation"] = model.config._experts_implementation
    return cls(model, cls.dims_of(model), tokenizer, files_sha256(files), provenance)
