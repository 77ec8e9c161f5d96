"""Tiny random Hugging Face models and a fast tokenizer, built offline inside the test session.

Each model is saved with ``save_pretrained`` beside a byte-level BPE tokenizer trained (with the
``tokenizers`` library) on ``hf_text``, so the whole path from a model directory to a store runs
without network. Fixtures, to import into a conftest or a test module:

* ``hf_text``: the text file the tokenizer was trained on (a dataset whose merges all occur).
* ``hf_zoo``: a factory ``hf_zoo(variant, **config_overrides) -> Path``, one directory per
  distinct call, for the variants in ``VARIANTS`` (and ``opt``, an architecture blockcap refuses).

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
        # not supported by blockcap: for the error line
        "opt": lambda **o: tf.OPTConfig(
            **{
                **small,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "ffn_dim": 32,
                "num_attention_heads": 2,
                "word_embed_proj_dim": 16,
                "max_position_embeddings": 64,
                **o,
            }
        ),  # fmt: skip
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


def parts(base: Any) -> tuple[list[tuple], Any]:
    """Per layer (layer, attention, out projection, pre-MLP norm or None, down projection, mlp) and
    the final norm of a base model."""
    if hasattr(base, "h"):  # GPT-2
        layers = [(b, b.attn, b.attn.c_proj, b.ln_2, b.mlp.c_proj, b.mlp) for b in base.h]
        return layers, base.ln_f
    if hasattr(base, "embed_in"):  # GPT-NeoX: with a parallel residual the norm reads the block input
        layers = [
            (L, L.attention, L.attention.dense,
             None if L.use_parallel_residual else L.post_attention_layernorm, L.mlp.dense_4h_to_h, L.mlp)
            for L in base.layers
        ]  # fmt: skip
        return layers, base.final_layer_norm
    layers = [
        (L, L.self_attn, L.self_attn.o_proj, L.post_attention_layernorm, L.mlp.down_proj, L.mlp)
        for L in base.layers
    ]
    return layers, base.norm


def hooked(ref: Any, ids: torch.Tensor) -> tuple[dict, tuple]:
    """Every site of every layer, the final norm's input and ``hidden_states``, read with hooks.

    Run with ``use_cache=False``: a cache hands attention contiguous copies of k and v, which can
    change the last bit of GPT-2's and multi-head Llama's attention scores.
    """
    seen = {}
    handles = []

    def pre(key):
        return lambda module, args: seen.__setitem__(key, args[0].clone())

    def post(key, index=None):
        return lambda module, args, out: seen.__setitem__(key, (out if index is None else out[index]).clone())

    layers, final_norm = parts(ref.base_model)
    for b, (layer, attn, out_proj, norm2, down, mlp) in enumerate(layers):
        handles += [
            layer.register_forward_pre_hook(pre((b, "block_input"))),
            out_proj.register_forward_pre_hook(pre((b, "heads_output"))),
            out_proj.register_forward_hook(post((b, "proj_output"))),
            down.register_forward_pre_hook(pre((b, "mlp_hidden"))),
            mlp.register_forward_hook(post((b, "ffwd_output"))),
            layer.register_forward_hook(post((b, "block_output"))),
            attn.register_forward_hook(post((b, "attention"), 1)),  # (output, weights)
        ]
        if norm2 is not None:
            handles.append(norm2.register_forward_pre_hook(pre((b, "resid_mid"))))
    handles.append(final_norm.register_forward_pre_hook(pre("final_norm_input")))
    try:
        with torch.inference_mode():
            out = ref(ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return seen, out.hidden_states
