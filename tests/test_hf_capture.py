"""Hugging Face capture modules return exactly what hooks on the transformers model see.

The reference is the ``*ForCausalLM`` model itself (eager attention, float32, CPU,
``use_cache=False``), read with forward hooks and pre-hooks; the capture runs on the base model
``blockcap.capture.hf.load.load`` returns for the same directory. Every named family: the first
families (``VARIANTS``) and those added with issue 19 (``FAMILY_VARIANTS``), whose particulars are
tested in test_hf_families.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from blockcap.capture.hf import load as hf
from blockcap.core.sites import SITES
from blockcap.core.spec import CaptureSpec
from tests.hf_models import (
    FAMILY_VARIANTS,
    NEEDS_TRANSFORMERS,
    VARIANTS,
    final_norm,
    hooked,
    layer_list,
    load_reference,
)

pytestmark = NEEDS_TRANSFORMERS


@pytest.fixture(scope="module")
def loaded(hf_zoo):
    """variant -> (reference *ForCausalLM, blockcap adapter), loaded once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            directory = hf_zoo(variant)
            cache[variant] = load_reference(directory), hf.load(CaptureSpec(model=str(directory)))
        return cache[variant]

    return get


NAMED = VARIANTS + FAMILY_VARIANTS


def sites_of(adapter, blocks) -> tuple[str, ...]:
    """Every site the blocks have."""
    absent = adapter.absent_sites(blocks)
    return tuple(s for s in SITES if s not in absent)


def captured(module, ids):
    with torch.inference_mode():
        return dict(zip(module.outputs, module(ids), strict=True))


def random_ids(adapter, T, seed=0, batch=3):
    return torch.randint(
        0, adapter.dims.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize(
    "variant, T",
    [(v, T) for v in VARIANTS for T in (1, 7, 32)] + [(v, T) for v in FAMILY_VARIANTS for T in (1, 32)],
)
def test_exact_capture_is_bitwise_the_hooks(loaded, variant, T):
    ref, adapter = loaded(variant)
    last = adapter.dims.n_layer - 1
    ids = random_ids(adapter, T, seed=T)
    want, hidden = hooked(ref, ids)
    for blocks in [(0,), (last,), (0, last)]:
        sites = sites_of(adapter, blocks)
        assert all((b, s) in want for b in blocks for s in sites)  # no site without a hook,
        assert not [key for key in want if key[0] in blocks and key[1] not in sites]  # no hook without a site
        got = captured(adapter.capture_module(blocks, sites, False), ids)
        assert list(got) == [(b, s) for b in blocks for s in sites]
        for key, value in got.items():
            assert value.dtype == torch.float32
            assert torch.equal(value, want[key]), (blocks, key)
    every = captured(adapter.capture_module(range(last + 1), ("block_input", "block_output"), False), ids)
    assert torch.equal(every[(0, "block_input")], hidden[0])
    for i in range(last):
        assert torch.equal(every[(i, "block_output")], hidden[i + 1]), i
    # transformers 5 ends hidden_states with the final norm's output: the last block's output is its input
    assert torch.equal(every[(last, "block_output")], want["final_norm_input"])
    assert not torch.equal(every[(last, "block_output")], hidden[last + 1])


def test_sliding_windows_are_active(loaded):
    """Mistral masks every layer and Qwen2 the layers after max_window_layers, at T beyond the window."""
    from blockcap.capture.hf.attention import sliding_windows

    assert sliding_windows(loaded("mistral")[1].model) == [5, 5]
    assert sliding_windows(loaded("qwen2")[1].model) == [None, 6, 6]
    assert sliding_windows(loaded("llama")[1].model) == [None, None, None]
    _, adapter = loaded("mistral")
    pattern = captured(adapter.capture_module((1,), ("attention",), False), random_ids(adapter, 12))[
        (1, "attention")
    ]
    assert torch.all(pattern[..., 11, :7] == 0) and torch.all(pattern[..., 11, 7:] > 0)


@pytest.mark.parametrize("variant", NAMED)
def test_fused_capture_within_stated_tolerance(loaded, variant):
    ref, adapter = loaded(variant)
    tolerance = importlib.import_module(f"blockcap.capture.hf.{adapter.family}").FUSED_TOLERANCE
    ids = random_ids(adapter, 32, seed=5)
    want, _ = hooked(ref, ids)
    blocks = (0, adapter.dims.n_layer - 1)
    module = adapter.capture_module(blocks, sites_of(adapter, blocks), True)
    got = captured(module, ids)
    worst = 0.0
    for key, value in got.items():
        scale = want[key].abs().max().clamp_min(1e-12)
        err = ((value - want[key]).abs().max() / scale).item()
        worst = max(worst, err)
        assert err <= tolerance, (key, err)
    # SDPA really is a different computation; exact mode is the bitwise one. Gemma 2's softcapped
    # attention has no SDPA kernel, so it stays exact.
    assert (worst > 0.0) == module.fused == (variant != "gemma2")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "variant", [*VARIANTS, *(pytest.param(v, marks=pytest.mark.slow) for v in FAMILY_VARIANTS)]
)
def test_compiles_with_fullgraph(loaded, variant, fused):
    _, adapter = loaded(variant)
    blocks = (0, adapter.dims.n_layer - 1)
    module = adapter.capture_module(blocks, sites_of(adapter, blocks), fused)
    torch._dynamo.reset()  # one run compiles one module; this process compiles many, sharing code objects
    compiled = torch.compile(module, fullgraph=True, backend="eager")  # graph capture, no C compiler
    ids = random_ids(adapter, 9)
    with torch.inference_mode():
        for a, b in zip(module(ids), compiled(ids), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "variant", [*VARIANTS, *(pytest.param(v, marks=pytest.mark.slow) for v in FAMILY_VARIANTS)]
)
def test_exports(loaded, variant, fused):
    _, adapter = loaded(variant)
    blocks = (0, adapter.dims.n_layer - 1)
    module = adapter.capture_module(blocks, sites_of(adapter, blocks), fused)
    ids = random_ids(adapter, 9)
    exported = torch.export.export(module, (ids,))
    with torch.inference_mode():
        for a, b in zip(module(ids), exported.module()(ids), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("variant", NAMED)
def test_capture_stops_after_the_deepest_block(loaded, variant):
    _, adapter = loaded(variant)
    module = adapter.capture_module((0,), ("ffwd_output",), False)
    layers = layer_list(adapter.model)
    ours = {id(p) for p in module.parameters()}
    later = {id(p) for layer in layers[1:] for p in layer.parameters()} | {
        id(p) for p in final_norm(adapter.model).parameters()
    }
    assert later and not ours & later
    assert {id(p) for p in layers[0].parameters()} <= ours


@pytest.mark.parametrize("variant", ["gpt2", "neox_parallel", "qwen2", "gemma3_text", "mixtral"])
def test_bfloat16_capture_is_bitwise_the_bfloat16_model(hf_zoo, variant):
    """Cast by the pipeline (``adapter.to``) equals transformers loading in bfloat16, rotary included."""
    directory = hf_zoo(variant)
    ref = load_reference(directory, torch.bfloat16)
    adapter = hf.load(CaptureSpec(model=str(directory)))
    adapter.to(torch.device("cpu"), torch.bfloat16)
    rotary = getattr(adapter.model, "rotary_emb", None)
    assert rotary is None or all(b.dtype == torch.float32 for b in rotary.buffers())
    blocks = range(adapter.dims.n_layer)
    ids = random_ids(adapter, 20)
    want, _ = hooked(ref, ids)
    got = captured(adapter.capture_module(blocks, sites_of(adapter, blocks), False), ids)
    for key, value in got.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, want[key]), key


def test_resid_mid_of_a_parallel_residual_is_refused(loaded):
    from blockcap.core.errors import BlockcapError

    _, adapter = loaded("neox_parallel")
    with pytest.raises(BlockcapError, match="parallel residual"):
        adapter.check_sites(("ffwd_output", "resid_mid"), (0,))
    with pytest.raises(BlockcapError, match="parallel residual"):
        adapter.capture_module((0,), ("resid_mid",), False)
    loaded("neox_sequential")[1].check_sites(("resid_mid",), (0,))
