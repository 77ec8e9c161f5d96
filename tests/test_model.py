"""The model computes what the original does and shares its state_dict layout."""

import pytest
import torch

from blockcap.capture.chargpt.checkpoint import infer_config
from blockcap.capture.chargpt.model import GPT, PRESETS, GPTConfig
from tests.reference import GPTLanguageModel


def reference_and_ours(cfg: GPTConfig):
    torch.manual_seed(1)
    ref = GPTLanguageModel(cfg.vocab_size, cfg.n_embed, cfg.n_head, cfg.n_layer, cfg.block_size).eval()
    ours = GPT(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_state_dict_layout_matches_the_original():
    cfg = GPTConfig(vocab_size=65, n_embed=48, n_head=6, n_layer=2, block_size=16)
    ref, ours = reference_and_ours(cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ref_shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    for key in (
        "token_embedding_table.weight",
        "position_embedding_table.weight",
        "blocks.1.sa.heads.5.query.weight",
        "blocks.0.sa.heads.0.tril",
        "blocks.0.sa.proj.bias",
        "blocks.0.ffwd.net.0.weight",
        "blocks.0.ffwd.net.2.bias",
        "blocks.1.ln2.weight",
        "ln_f.bias",
        "lm_head.weight",
    ):
        assert key in ref_shapes


def test_forward_is_bitwise_the_original():
    cfg = GPTConfig(vocab_size=20, n_embed=24, n_head=3, n_layer=2, block_size=12)
    ref, ours = reference_and_ours(cfg)
    idx = torch.randint(0, 20, (4, 12))
    with torch.inference_mode():
        assert torch.equal(ref(idx)[0], ours(idx)[0])


def test_seed_preset_is_the_original_size():
    s = PRESETS["seed"]
    assert (s.n_embed, s.n_head, s.n_layer, s.block_size) == (384, 6, 6, 256)
    assert PRESETS["small"].n_layer == 6 and PRESETS["small"].block_size == 256


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(vocab_size=65, n_embed=384, n_head=6, n_layer=6, block_size=256),
        GPTConfig(vocab_size=7, n_embed=16, n_head=2, n_layer=3, block_size=5),
    ],
)
def test_config_inferred_from_shapes(cfg):
    ref = GPTLanguageModel(cfg.vocab_size, cfg.n_embed, cfg.n_head, cfg.n_layer, cfg.block_size)
    inferred = infer_config(ref.state_dict())
    assert (
        inferred.vocab_size,
        inferred.n_embed,
        inferred.n_head,
        inferred.n_layer,
        inferred.block_size,
    ) == (cfg.vocab_size, cfg.n_embed, cfg.n_head, cfg.n_layer, cfg.block_size)


def test_embed_width_must_split_into_heads():
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embed=10, n_head=3)
