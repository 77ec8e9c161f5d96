"""What a Hugging Face model directory must be before blockcap loads it, each failure one line.

``read_config`` reads ``config.json`` without transformers; ``refuse_remote_code`` refuses a
config whose model exists only as Python shipped beside it (``auto_map``), before transformers
could import it (every load also passes ``trust_remote_code=False``); ``check_sizes`` and
``check_shapes`` refuse configs whose sizes would crash or silently misbuild the model, naming the
field; ``mismatch`` names a tensor whose shape the config contradicts.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from blockcap.core.errors import BlockcapError

RESAVE = "re-save the model with save_pretrained"
# config fields that are sizes or counts: a positive integer where present (None: the default)
POSITIVE = (
    "num_hidden_layers", "n_layer", "hidden_size", "n_embd", "num_attention_heads", "n_head",
    "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size",
    "shared_expert_intermediate_size", "vocab_size", "max_position_embeddings", "n_positions",
    "num_local_experts", "num_experts_per_tok", "word_embed_proj_dim", "decoder_sparse_step",
)  # fmt: skip
NON_NEGATIVE = ("num_experts", "sliding_window")  # Qwen2-MoE writes 0 for "none"
# families whose attention splits the model width itself into heads (the others size heads by head_dim)
SPLIT_WIDTH = ("gpt2", "gpt_neox", "opt", "bloom")


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict with a ``model_type``."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlockcapError(f"{path} is not readable JSON ({e}); fix it or {RESAVE}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BlockcapError(f"{path} names no model_type; {RESAVE}")
    return config


def refuse_remote_code(where: str, config: dict[str, Any], known_types: Any) -> None:
    """A BlockcapError when the config's model exists only as code it ships (``auto_map``).

    A known ``model_type`` loads transformers' own implementation whatever ``auto_map`` says.
    """
    model_type = config["model_type"]
    if model_type not in known_types and config.get("auto_map"):
        raise BlockcapError(
            f"{where} is a {model_type!r} model whose code ships beside it (auto_map), which transformers "
            f"does not implement; blockcap never runs a model's own Python: use a model transformers "
            f"implements"
        )


def check_sizes(where: str, config: dict[str, Any]) -> None:
    """Sizes and counts are integers in range (also inside a multimodal config's ``text_config``)."""
    for key in POSITIVE + NON_NEGATIVE:
        value = config.get(key)
        low = 1 if key in POSITIVE else 0
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            kind = "a positive integer" if low else "an integer 0 or more"
            raise BlockcapError(f"{where} has {key}={value!r}; it must be {kind}: fix config.json")
    if isinstance(config.get("text_config"), dict):
        check_sizes(f"{where} (text_config)", config["text_config"])


def check_shapes(where: str, cfg: Any) -> None:
    """Heads divide what must split into them; experts chosen are experts there; attention is causal."""

    def name(attr: str) -> str:  # the key config.json uses (GPT-2 says n_head for num_attention_heads)
        return getattr(cfg, "attribute_map", {}).get(attr, attr)

    heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
    if cfg.model_type in SPLIT_WIDTH and cfg.hidden_size % cfg.num_attention_heads:  # their configs have both
        raise BlockcapError(
            f"{where} has {name('hidden_size')}={hidden}, which {name('num_attention_heads')}={heads} does "
            f"not divide into heads; fix config.json"
        )
    if getattr(cfg, "use_bidirectional_attention", False) or not getattr(cfg, "is_causal", True):
        raise BlockcapError(
            f"{where} makes attention bidirectional (an embedding model, not a causal language model); "
            f"blockcap captures causal language models"
        )
    kv = getattr(cfg, "num_key_value_heads", None)
    if kv and heads and heads % kv:
        raise BlockcapError(
            f"{where} has num_key_value_heads={kv}, which does not divide {name('num_attention_heads')}="
            f"{heads} query heads into groups; fix config.json"
        )
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if experts and top_k and top_k > experts:
        raise BlockcapError(
            f"{where} has num_experts_per_tok={top_k}, more than its {experts} experts; fix config.json"
        )


def mismatch(where: str, mismatched: Any) -> BlockcapError:
    """The error for weights whose shapes the config contradicts (transformers' ``mismatched_keys``)."""
    rows = sorted(mismatched)
    key, stored, built = rows[0]
    more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
    return BlockcapError(
        f"{where}: tensor {key} has shape {tuple(stored)} in the weights, but config.json makes it "
        f"{tuple(built)}{more}; the config does not belong to these weights: fix config.json or {RESAVE}"
    )


def unpickling_reason(e: pickle.UnpicklingError) -> str:
    """The informative part of a weights-only refusal (torch buries it mid-text)."""
    for line in str(e).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
