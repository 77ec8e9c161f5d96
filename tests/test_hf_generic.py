"""The generic path: block inputs and outputs of causal LMs blockcap has no capture module for.

OPT (learned positions, projected embeddings), BLOOM (ALiBi, an embedding norm) and OLMo (the
Llama layout: ``embed_tokens``, ``rotary_emb``, ``layers``) against hooks on the transformers
model; every other site, ``fused``, and models whose layout or forward the path cannot run are
refused in one line.
"""

from __future__ import annotations

import pytest
import torch

import blockcap
from blockcap.capture.hf import load as hf
from blockcap.cli import EXIT_ERROR, main
from blockcap.core.errors import BlockcapError
from blockcap.core.spec import CaptureSpec
from tests.hf_models import GENERIC_VARIANTS, NEEDS_TRANSFORMERS, hooked, load_reference

pytestmark = NEEDS_TRANSFORMERS
SITES = ("block_input", "block_output")


@pytest.fixture(scope="module")
def loaded(hf_zoo):
    cache = {}

    def get(variant):
        if variant not in cache:
            directory = hf_zoo(variant)
            cache[variant] = load_reference(directory), hf.load(CaptureSpec(model=str(directory)))
        return cache[variant]

    return get


def captured(module, ids):
    with torch.inference_mode():
        return dict(zip(module.outputs, module(ids), strict=True))


@pytest.mark.parametrize("T", [1, 32])
@pytest.mark.parametrize("variant", GENERIC_VARIANTS)
def test_block_inputs_and_outputs_are_bitwise_the_hooks(loaded, variant, T):
    ref, adapter = loaded(variant)
    assert adapter.family == "generic" and adapter.provenance["model_type"] == variant
    last = adapter.dims.n_layer - 1
    ids = torch.randint(0, adapter.dims.vocab_size, (3, T), generator=torch.Generator().manual_seed(T))
    want, hidden = hooked(ref, ids)
    for blocks in [(0,), (last,), (0, last)]:
        got = captured(adapter.capture_module(blocks, SITES, False), ids)
        assert list(got) == [(b, s) for b in blocks for s in SITES]
        for key, value in got.items():
            assert torch.equal(value, want[key]), key
    assert torch.equal(got[(0, "block_input")], hidden[0])
    assert torch.equal(got[(last, "block_output")], want["final_norm_input"])


@pytest.mark.parametrize("variant", GENERIC_VARIANTS)
def test_compiles_with_fullgraph(loaded, variant):
    _, adapter = loaded(variant)
    module = adapter.capture_module((0, adapter.dims.n_layer - 1), SITES, False)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    ids = torch.randint(0, adapter.dims.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for a, b in zip(module(ids), compiled(ids), strict=True):
            assert torch.equal(a, b)


def test_other_sites_and_fused_are_refused(loaded):
    _, adapter = loaded("opt")
    with pytest.raises(
        BlockcapError, match=r"no capture module for 'opt' models.*sites=block_input,block_output\)"
    ):
        adapter.capture_module((0,), ("block_output", "ffwd_output"), False)
    with pytest.raises(BlockcapError, match="fused=True changes nothing on the generic path"):
        adapter.capture_module((0,), SITES, True)


def run_cli(args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["run", *args, "--sample_len=8", "--progress=False"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == EXIT_ERROR and len(err.splitlines()) == 1, err
    return err


def test_default_sites_are_refused_naming_what_is_there(hf_zoo, hf_text, tmp_path, capsys):
    directory, out = hf_zoo("bloom"), tmp_path / "s.zarr"
    err = run_cli([f"--model={directory}", f"--dataset={hf_text}", f"--out={out}"], capsys)
    assert "sites has heads_output, but blockcap has no capture module for 'bloom' models" in err
    assert err.endswith("(these blocks have --sites=block_input,block_output)") and not out.exists()


@pytest.mark.parametrize(
    "variant, message",
    [
        (
            "granite",
            "the generic path cannot reproduce it: block 0's input differs from the model's own",
        ),
        ("gptj", "the generic path cannot run it: its decoder layers are not model.layers beside"),
        ("olmo3", "cannot reproduce it: its layers fail when called that way (TypeError: "),
    ],
)
def test_unknown_layouts_are_refused(hf_zoo, hf_text, tmp_path, capsys, variant, message):
    directory, out = hf_zoo(variant), tmp_path / "s.zarr"
    err = run_cli(
        [f"--model={directory}", f"--dataset={hf_text}", f"--out={out}", "--sites=block_output"], capsys
    )
    assert f"is a {variant!r} model, which blockcap cannot capture: it has no capture module" in err
    assert message in err and not out.exists()


def test_run_stores_what_hooks_see(hf_zoo, hf_text, tmp_path, capsys):
    directory, out = hf_zoo("opt"), tmp_path / "opt.zarr"
    blockcap.run(
        model=str(directory), dataset=str(hf_text), out=str(out), block_idx="all", sites=",".join(SITES),
        sample_len=16, stride=16, batch_size=8, progress=False,
    )  # fmt: skip
    s = blockcap.open_store(out)
    assert s.meta["model"]["family"] == "generic" and s.meta["dims"]["d_mlp"] == 0
    want, _ = hooked(load_reference(directory), s.tokens[:8].long())
    for b in (0, 1):
        for site in SITES:
            assert torch.equal(s.site(site, b)[:8], want[(b, site)])
    main(["info", str(out)])
    assert "sites, in generic blocks:" in capsys.readouterr().out
