"""The capture module returns exactly what forward hooks on the original model see."""

import pytest
import torch

from blockcap.capture.chargpt.capture import FUSED_TOLERANCE, CharGPTCapture
from blockcap.capture.chargpt.model import GPT, GPTConfig
from blockcap.core.sites import DENSE_SITES as SITES  # the char GPT has no router
from tests.reference import GPTLanguageModel

CFG = GPTConfig(vocab_size=30, n_embed=48, n_head=6, n_layer=3, block_size=16, dropout=0.2)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(3)
    ref = GPTLanguageModel(CFG.vocab_size, CFG.n_embed, CFG.n_head, CFG.n_layer, CFG.block_size).eval()
    ours = GPT(CFG)
    ours.load_state_dict(ref.state_dict())
    return ref, ours.eval()


def hooked(ref: GPTLanguageModel, idx: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Every site of every block, read with forward hooks on the reference model (tests only)."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep(key, use_input):
        def hook(module, inputs, output):
            seen[key] = (inputs[0] if use_input else output).clone()

        return hook

    for b, block in enumerate(ref.blocks):
        handles += [
            block.register_forward_hook(keep((b, "block_input"), True)),
            block.register_forward_hook(keep((b, "block_output"), False)),
            block.sa.proj.register_forward_hook(keep((b, "heads_output"), True)),
            block.sa.proj.register_forward_hook(keep((b, "proj_output"), False)),
            block.ln2.register_forward_hook(keep((b, "resid_mid"), True)),
            block.ffwd.register_forward_hook(keep((b, "ffwd_output"), False)),
            block.ffwd.net[2].register_forward_hook(keep((b, "mlp_hidden"), True)),
        ]
        for h, head in enumerate(block.sa.heads):  # dropout's input is the softmax pattern
            handles.append(head.dropout.register_forward_hook(keep((b, f"pattern{h}"), True)))
    with torch.inference_mode():
        ref(idx)
    for h in handles:
        h.remove()
    for b in range(len(ref.blocks)):
        seen[(b, "attention")] = torch.stack([seen.pop((b, f"pattern{h}")) for h in range(CFG.n_head)], dim=1)
    return seen


def captured(module: CharGPTCapture, idx: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    with torch.inference_mode():
        return dict(zip(module.outputs, module(idx), strict=True))


@pytest.mark.parametrize("blocks", [(0,), (2,), (0, 1, 2), (1, 2)])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_exact_capture_is_bitwise_the_hooks(models, blocks, T):
    ref, ours = models
    idx = torch.randint(0, CFG.vocab_size, (5, T), generator=torch.Generator().manual_seed(T))
    want = hooked(ref, idx)
    got = captured(CharGPTCapture(ours, blocks, SITES), idx)
    assert set(got) == {(b, s) for b in blocks for s in SITES}
    for key, value in got.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, want[key]), key


def test_capture_stops_after_the_deepest_block(models):
    _, ours = models
    module = CharGPTCapture(ours, (1,), ("ffwd_output",))
    assert len(module.blocks) == 2
    assert not any(name.startswith(("ln_f", "lm_head")) for name, _ in module.named_parameters())


def test_requested_order_and_default_sites(models):
    _, ours = models
    module = CharGPTCapture(ours, (0, 2), ("heads_output", "proj_output", "ffwd_output"))
    assert module.outputs == [
        (0, "heads_output"),
        (0, "proj_output"),
        (0, "ffwd_output"),
        (2, "heads_output"),
        (2, "proj_output"),
        (2, "ffwd_output"),
    ]


def test_fused_capture_within_stated_tolerance(models):
    ref, ours = models
    idx = torch.randint(0, CFG.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    want = hooked(ref, idx)
    got = captured(CharGPTCapture(ours, (0, 1, 2), SITES, fused=True), idx)
    worst = 0.0
    for key, value in got.items():
        scale = want[key].abs().max().clamp_min(1e-12)
        err = ((value - want[key]).abs().max() / scale).item()
        worst = max(worst, err)
        assert err <= FUSED_TOLERANCE, (key, err)
    assert worst > 0.0  # fused really is a different computation; exact mode is the bitwise one


def test_compiles_with_fullgraph(models):
    _, ours = models
    module = CharGPTCapture(ours, (0, 1), ("heads_output", "ffwd_output", "attention"))
    compiled = torch.compile(module, fullgraph=True, backend="eager")  # graph capture, no C compiler
    idx = torch.randint(0, CFG.vocab_size, (4, 7))
    with torch.inference_mode():
        for a, b in zip(module(idx), compiled(idx), strict=True):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_compiles_with_inductor(models):
    _, ours = models
    module = CharGPTCapture(ours, (1,), ("heads_output", "proj_output", "ffwd_output"))
    compiled = torch.compile(module, fullgraph=True)
    idx = torch.randint(0, CFG.vocab_size, (4, 7))
    with torch.inference_mode():
        for a, b in zip(module(idx), compiled(idx), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_exports(models, fused):
    _, ours = models
    module = CharGPTCapture(ours, (0, 2), SITES, fused=fused)
    idx = torch.randint(0, CFG.vocab_size, (4, 7))
    exported = torch.export.export(module, (idx,))
    with torch.inference_mode():
        for a, b in zip(module(idx), exported.module()(idx), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_module_arguments(models):
    _, ours = models
    with pytest.raises(ValueError, match="unknown sites"):
        CharGPTCapture(ours, (0,), ("nope",))
    with pytest.raises(ValueError, match="at least one"):
        CharGPTCapture(ours, (), ("ffwd_output",))
