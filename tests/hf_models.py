"""Tiny random Hugging Face models and a fast tokenizer, built offline inside the test session.

Each model is saved with ``save_pretrained`` beside a byte-level BPE tokenizer trained (with the
``tokenizers`` library) on ``hf_text``, so the whole path from a model directory to a store runs
without network. Fixtures, to import into a conftest or a test module:

* ``hf_text``: the text file the tokenizer was trained on (a dataset whose merges all occur).
* ``hf_zoo``: a factory ``hf_zoo(variant, **config_overrides) -> Path``, one directory per
  distinct call, for the variants in ``VARIANTS`` and ``FAMILY_VARIANTS`` (every site),
  ``GENERIC_VARIANTS`` (the generic path), and ``gptj``, ``olmo3`` and ``granite`` (which it refuses).

Helpers for the reference side: ``load_reference`` (the ``*ForCausalLM`` model, eager, float32)
and ``hooked`` (every site of every layer, read with hooks on that model).
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# for the test modules' pytestmark: without the hf extra they are skipped, not failed
NEEDS_TRANSFORMERS = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers (blockcap[hf])"
)
EOS, BOS = "<|endoftext|>", "<s>"  # ids 0 and 1: the trainer numbers special tokens first
TOKENIZER_VOCAB = 300
TEXT_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly pack boxes of liquor jugs "
    "and zebras vex daft judges; how many more sphinxes of black quartz judge my vow? nobody knows, "
    "but every morning the baker sings: bread, butter, honey and jam!"
)


def make_text(n_chars: int = 8000, seed: int = 1) -> str:
    """Sentences of ``TEXT_WORDS``, deterministic: the tokenizer's training text and the test dataset."""
    rng, words = random.Random(seed), TEXT_WORDS.split()
    lines, size = [], 0
    while size < n_chars:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".\n")
        size += len(lines[-1])
    return "".join(lines)


def train_tokenizer(text: str) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``TOKENIZER_VOCAB`` ids, eos and bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=[EOS, BOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS)


def _configs() -> dict[str, Callable[..., Any]]:
    """Variant name -> config class and its tiny settings (d_model 64, 4 query heads)."""
    import transformers as tf

    small = {"initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 0}  # 0.1: non-uniform attention
    llama = {
        **small, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "max_position_embeddings": 64,
    }  # fmt: skip
    neox = {
        **small, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
        "max_position_embeddings": 64,
    }  # fmt: skip
    gpt2 = {**small, "n_embd": 64, "n_head": 4, "n_positions": 64}
    # head_dim 24 is not hidden / heads, query_pre_attn_scalar 20 not head_dim; a softcap of 1 is active
    gemma = {
        **llama,
        "num_hidden_layers": 3,
        "head_dim": 24,
        "query_pre_attn_scalar": 20,
        "sliding_window": 5,
    }
    moe = {**llama, "num_hidden_layers": 3, "num_experts_per_tok": 2}
    sliding = ["sliding_attention", "full_attention", "sliding_attention"]
    return {
        "gpt2": lambda **o: tf.GPT2Config(**{**gpt2, "n_layer": 3, **o}),
        # the config switches that change GPT-2's attention arithmetic
        "gpt2_upcast": lambda **o: tf.GPT2Config(
            **{
                **gpt2,
                "n_layer": 2,
                "n_inner": 96,
                "reorder_and_upcast_attn": True,
                "scale_attn_by_inverse_layer_idx": True,
                **o,
            }
        ),  # fmt: skip
        "neox_parallel": lambda **o: tf.GPTNeoXConfig(
            **{**neox, "num_hidden_layers": 3, "rotary_pct": 0.25, "use_parallel_residual": True, **o}
        ),
        "neox_sequential": lambda **o: tf.GPTNeoXConfig(
            **{**neox, "num_hidden_layers": 2, "rotary_pct": 0.5, "use_parallel_residual": False, **o}
        ),
        "llama": lambda **o: tf.LlamaConfig(
            **{**llama, "num_hidden_layers": 3, "tie_word_embeddings": False, **o}
        ),
        "llama_tied": lambda **o: tf.LlamaConfig(
            **{
                **llama,
                "num_hidden_layers": 2,
                "num_key_value_heads": 1,
                "tie_word_embeddings": True,
                "attention_bias": True,
                "mlp_bias": True,
                **o,
            }
        ),  # fmt: skip
        "mistral": lambda **o: tf.MistralConfig(
            **{**llama, "num_hidden_layers": 2, "sliding_window": 5, **o}
        ),
        "qwen2": lambda **o: tf.Qwen2Config(
            **{
                **llama,
                "num_hidden_layers": 3,
                "use_sliding_window": True,
                "sliding_window": 6,
                "max_window_layers": 1,
                **o,
            }
        ),  # fmt: skip
        "qwen3": lambda **o: tf.Qwen3Config(
            **{
                **llama,
                "num_hidden_layers": 3,
                "head_dim": 24,
                "attention_bias": True,
                "use_sliding_window": True,
                "sliding_window": 6,
                "max_window_layers": 1,
                **o,
            }
        ),  # fmt: skip
        "phi3": lambda **o: tf.Phi3Config(
            **{
                **llama,
                "num_hidden_layers": 3,
                "sliding_window": 6,
                "partial_rotary_factor": 0.5,
                "pad_token_id": 0,
                **o,
            }
        ),  # fmt: skip
        "gemma2": lambda **o: tf.Gemma2Config(**{**gemma, "attn_logit_softcapping": 1.0, **o}),
        "gemma3_text": lambda **o: tf.Gemma3TextConfig(
            **{**gemma, "layer_types": sliding, "rope_local_base_freq": 100.0, **o}
        ),
        "gemma3": lambda **o: tf.Gemma3Config(
            text_config={**gemma, "layer_types": sliding, "rope_local_base_freq": 100.0, **o},
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            mm_tokens_per_image=4,
            initializer_range=0.1,
        ),  # fmt: skip
        "olmo2": lambda **o: tf.Olmo2Config(**{**llama, "num_hidden_layers": 3, "attention_bias": True, **o}),
        "mixtral": lambda **o: tf.MixtralConfig(**{**moe, "num_local_experts": 4, "sliding_window": 6, **o}),
        # block 1 dense (mlp_only_layers): mlp_hidden there, a router in blocks 0 and 2
        "qwen2_moe": lambda **o: tf.Qwen2MoeConfig(
            **{
                **moe,
                "num_experts": 4,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 48,
                "mlp_only_layers": [1],
                "norm_topk_prob": True,
                "use_sliding_window": True,
                "sliding_window": 6,
                "max_window_layers": 3,
                **o,
            }
        ),  # fmt: skip
        "olmoe": lambda **o: tf.OlmoeConfig(
            **{**moe, "num_experts": 4, "intermediate_size": 32, "clip_qkv": 0.5, **o}
        ),
        "qwen3_moe": lambda **o: tf.Qwen3MoeConfig(
            **{**moe, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 24, **o}
        ),
        # families blockcap has no capture module for: the generic path (block_input, block_output)
        "opt": lambda **o: tf.OPTConfig(
            **{
                **small,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "ffn_dim": 64,
                "num_attention_heads": 4,
                "word_embed_proj_dim": 16,
                "max_position_embeddings": 64,
                **o,
            }
        ),  # fmt: skip
        "bloom": lambda **o: tf.BloomConfig(**{**small, "hidden_size": 32, "n_layer": 2, "n_head": 4, **o}),
        "olmo": lambda **o: tf.OlmoConfig(**{**llama, "num_hidden_layers": 2, "clip_qkv": 0.5, **o}),
        # layers as model.h: a layout the generic path does not know
        "gptj": lambda **o: tf.GPTJConfig(
            **{**small, "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, **o}
        ),
        # its rotary table wants the layer type: its layers fail when the generic path calls them
        "olmo3": lambda **o: tf.Olmo3Config(**{**llama, "num_hidden_layers": 2, "sliding_window": 5, **o}),
        # its forward multiplies the embeddings outside its layers: the generic path must refuse it
        "granite": lambda **o: tf.GraniteConfig(
            **{**llama, "num_hidden_layers": 2, "embedding_multiplier": 3.0, **o}
        ),
    }


VARIANTS = (
    "gpt2",
    "gpt2_upcast",
    "neox_parallel",
    "neox_sequential",
    "llama",
    "llama_tied",
    "mistral",
    "qwen2",
)
FAMILY_VARIANTS = (
    "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3", "olmo2", "mixtral", "qwen2_moe", "olmoe", "qwen3_moe",
)  # fmt: skip
GENERIC_VARIANTS = ("opt", "bloom", "olmo")


def perturb(model: Any) -> None:
    """Non-trivial norms and biases: transformers initialises norm weights to one (Gemma's to zero)
    and biases to zero, which would hide a norm or bias applied in the wrong place."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session", name="hf_text")
def hf_text_fixture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_data") / "words.txt"
    path.write_text(make_text())
    return path


@pytest.fixture(scope="session", name="hf_zoo")
def hf_zoo_fixture(tmp_path_factory, hf_text) -> Callable[..., Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf_models")
    tokenizer = train_tokenizer(hf_text.read_text())
    configs = _configs()
    built: dict[tuple, Path] = {}

    def build(variant: str, **overrides: Any) -> Path:
        key = (variant, *sorted(overrides.items()))
        if key not in built:
            config = configs[variant](**{"vocab_size": TOKENIZER_VOCAB, **overrides})
            torch.manual_seed(len(built))
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            perturb(model)
            directory = root / f"{variant}-{len(built)}"
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            built[key] = directory
        return built[key]

    return build


def load_reference(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The saved model as transformers runs it: ``*ForCausalLM``, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager", local_files_only=True
    ).eval()


def text_model(base: Any) -> Any:
    """The decoder stack of a base model (a multimodal model's language model)."""
    return getattr(base, "language_model", base)


def layer_list(base: Any) -> list:
    base = text_model(base)
    if hasattr(base, "h"):  # GPT-2, BLOOM
        return list(base.h)
    return list(base.decoder.layers if hasattr(base, "decoder") else base.layers)


def final_norm(base: Any) -> Any:
    base = text_model(base)
    for name in ("ln_f", "final_layer_norm", "norm"):
        if hasattr(base, name):
            return getattr(base, name)
    return base.decoder.final_layer_norm  # OPT


# A hook point: (module, "pre" for its first positional input or "post" for its output, output index)
def hook_points(base: Any) -> list[dict[str, tuple[Any, str, int | None]]]:
    """Per layer, where a forward hook or pre-hook sees each site of the transformers model."""
    model_type = text_model(base).config.model_type
    points = []
    for L in layer_list(base):
        p = {
            "block_input": (L, "pre", None),
            "block_output": (L, "post", 0 if model_type == "bloom" else None),
        }
        if model_type in ("opt", "bloom", "olmo", "granite"):  # the generic path: nothing else
            points.append(p)
            continue
        if hasattr(L, "attn"):  # GPT-2
            attn, out_proj, norm2, down, mlp = L.attn, L.attn.c_proj, L.ln_2, L.mlp.c_proj, L.mlp
        elif hasattr(L, "attention"):  # GPT-NeoX: with a parallel residual the norm reads the block input
            attn, out_proj, down, mlp = L.attention, L.attention.dense, L.mlp.dense_4h_to_h, L.mlp
            norm2 = None if L.use_parallel_residual else L.post_attention_layernorm
        else:
            attn, out_proj, mlp = L.self_attn, L.self_attn.o_proj, L.mlp
            down = getattr(mlp, "down_proj", None)  # a sparse block has none
            norm2 = getattr(L, "pre_feedforward_layernorm", L.post_attention_layernorm)
        p |= {"heads_output": (out_proj, "pre", None), "proj_output": (out_proj, "post", None),
              "ffwd_output": (mlp, "post", None), "attention": (attn, "post", 1)}  # fmt: skip
        if model_type in ("gemma2", "gemma3_text", "olmo2"):  # what each half adds is after its post-norm
            p["proj_output"] = (L.post_attention_layernorm, "post", None)
            p["ffwd_output"] = (L.post_feedforward_layernorm, "post", None)
            norm2 = mlp if model_type == "olmo2" else norm2  # OLMo 2's MLP reads the residual stream itself
        if norm2 is not None:
            p["resid_mid"] = (norm2, "pre", None)
        if down is not None:
            p["mlp_hidden"] = (down, "pre", None)
        if hasattr(mlp, "gate") and hasattr(mlp, "experts"):
            p["router_logits"] = (mlp.gate, "post", 0)
        points.append(p)
    return points


def hooked(ref: Any, ids: torch.Tensor) -> tuple[dict, tuple]:
    """Every site of every layer, the final norm's input and ``hidden_states``, read with hooks.

    Run with ``use_cache=False``: a cache hands attention contiguous copies of k and v, which can
    change the last bit of GPT-2's and multi-head Llama's attention scores. The router's logits
    come flat, (B * T, n_experts); they are stored as (B, T, n_experts).
    """
    seen = {}
    handles = []
    B, T = ids.shape

    def pre(key):
        return lambda module, args: seen.__setitem__(key, args[0].clone())

    def post(key, index):
        def record(module, args, out):
            value = out if index is None else out[index]
            seen[key] = value.view(B, T, -1).clone() if key[1] == "router_logits" else value.clone()

        return record

    for b, points in enumerate(hook_points(ref.base_model)):
        for site, (module, kind, index) in points.items():
            key = (b, site)
            hook = pre(key) if kind == "pre" else post(key, index)
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(hook))
    handles.append(final_norm(ref.base_model).register_forward_pre_hook(pre("final_norm_input")))
    try:
        with torch.inference_mode():
            out = ref(ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return seen, out.hidden_states
