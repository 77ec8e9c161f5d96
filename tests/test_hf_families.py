"""The particulars of the families added with issue 19, and the router_logits site end to end.

Exactness against hooks for every site of every family is in test_hf_capture.py; here: that each
family's particulars are active (windows, softcapping, q/k clipping, the text tower of a
multimodal checkpoint), that router_logits is what the model itself reports, which sites a
mixture-of-experts block lacks, and a store of router_logits through statistics, search, the
loader, xarray and ``info``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import blockcap
from blockcap.capture.hf import load as hf
from blockcap.capture.hf.attention import sliding_windows
from blockcap.cli import EXIT_ERROR, main
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import ALL_SITES
from blockcap.core.spec import CaptureSpec
from tests.hf_models import NEEDS_TRANSFORMERS, hooked, load_reference

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


def ids_for(adapter, T=12, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, adapter.dims.vocab_size, (batch, T), generator=g)


def capture(module, ids):
    with torch.inference_mode():
        return dict(zip(module.outputs, module(ids), strict=True))


@pytest.mark.parametrize(
    "variant, family, windows",
    [
        ("qwen3", "llama", [None, 6, 6]),  # layer_types: sliding from max_window_layers on
        ("phi3", "llama", [6, 6, 6]),  # every layer when sliding_window is set
        ("gemma2", "gemma", [5, None, 5]),  # alternating local and global layers
        ("gemma3_text", "gemma", [5, None, 5]),
        ("olmo2", "olmo2", [None, None, None]),
        ("mixtral", "moe", [6, 6, 6]),
        ("qwen2_moe", "moe", [6, None, 6]),
        ("olmoe", "moe", [None, None, None]),
        ("qwen3_moe", "moe", [None, None, None]),  # use_sliding_window is off
    ],
)
def test_family_and_windows(loaded, variant, family, windows):
    _, adapter = loaded(variant)
    assert adapter.family == family and adapter.provenance["family"] == family
    assert adapter.provenance["model_type"] == variant
    assert sliding_windows(adapter.model) == windows


@pytest.mark.parametrize("variant, block", [("gemma2", 0), ("phi3", 1), ("mixtral", 2), ("qwen3", 1)])
def test_sliding_window_masks_the_pattern(loaded, variant, block):
    _, adapter = loaded(variant)
    window = sliding_windows(adapter.model)[block]
    pattern = capture(adapter.capture_module((block,), ("attention",), False), ids_for(adapter))[
        (block, "attention")
    ]
    q, first = 11, 11 - window + 1  # a query beyond the window: keys before its first are masked
    assert torch.all(pattern[..., q, :first] == 0) and torch.all(pattern[..., q, first:] > 0)


@pytest.mark.parametrize("variant, switch", [("gemma2", "eager_kwargs"), ("olmoe", "clip_qkv")])
def test_softcap_and_clip_are_active(loaded, variant, switch):
    """Gemma 2's softcapping and OLMoE's q/k/v clipping change the result: without them the capture
    would not equal the hooks (which the exactness tests check it does)."""
    ref, adapter = loaded(variant)
    ids = ids_for(adapter, T=16)
    want, _ = hooked(ref, ids)
    module = adapter.capture_module((0,), ("attention", "block_output"), False)
    assert all(torch.equal(v, want[k]) for k, v in capture(module, ids).items())
    setattr(module, switch, {} if switch == "eager_kwargs" else None)
    assert not torch.equal(capture(module, ids)[(0, "attention")], want[(0, "attention")])


def test_gemma3_checkpoint_captures_its_text_tower(loaded):
    ref, adapter = loaded("gemma3")
    assert type(adapter.model).__name__ == "Gemma3TextModel"
    assert adapter.provenance["model_type"] == "gemma3" and adapter.dims.n_layer == 3
    assert hasattr(ref.model, "vision_tower")  # the checkpoint holds a vision tower, left unused


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_router_logits_are_what_the_model_reports(loaded, variant):
    """Equal to transformers' own ``output_router_logits`` (no hooks), and their softmax top-k is
    the experts the block ran."""
    ref, adapter = loaded(variant)
    ids = ids_for(adapter, T=10, batch=3)
    sparse = [0, 2]  # qwen2_moe's block 1 is dense
    got = capture(adapter.capture_module(sparse, ("resid_mid", "router_logits"), False), ids)
    with torch.inference_mode():
        reported = ref(ids, use_cache=False, output_router_logits=True).router_logits
    reported = [r for r in reported if r is not None and r.shape[-1] == adapter.dims.n_experts]
    for b, logits in zip(sparse, reported[:1] + reported[-1:], strict=True):
        assert got[(b, "router_logits")].shape == (3, 10, adapter.dims.n_experts)
        assert torch.equal(got[(b, "router_logits")], logits.view(3, 10, -1))
        layer = adapter.model.layers[b]
        with torch.inference_mode():
            routed = torch.nn.functional.linear(
                layer.post_attention_layernorm(got[(b, "resid_mid")]), layer.mlp.gate.weight
            )
            assert torch.equal(got[(b, "router_logits")], routed)


def test_a_dense_block_of_a_moe_model_has_mlp_hidden_and_no_router(loaded):
    ref, adapter = loaded("qwen2_moe")
    ids = ids_for(adapter)
    want, _ = hooked(ref, ids)
    got = capture(adapter.capture_module((1,), ("mlp_hidden", "ffwd_output", "block_output"), False), ids)
    assert all(torch.equal(v, want[k]) for k, v in got.items())
    with pytest.raises(BlockcapError, match="block 1 of this model is a dense MLP block, with no router"):
        adapter.capture_module((1,), ("router_logits",), False)
    with pytest.raises(BlockcapError, match="block 0 is a sparse mixture-of-experts block"):
        adapter.capture_module((0, 1), ("mlp_hidden",), False)


@pytest.mark.parametrize(
    "variant, sites, message",
    [
        ("mixtral", "mlp_hidden", "sites has mlp_hidden, but block 0 is a sparse mixture-of-experts block"),
        ("llama", "router_logits", "sites has router_logits, but this model has no mixture-of-experts"),
    ],
)
def test_missing_site_is_one_line_and_no_store(hf_zoo, hf_text, tmp_path, capsys, variant, sites, message):
    out, directory = tmp_path / "s.zarr", hf_zoo(variant)
    capsys.readouterr()  # building a model shows save_pretrained's progress bar
    with pytest.raises(SystemExit) as exc:
        main([
            "run", f"--model={directory}", f"--dataset={hf_text}", f"--out={out}", f"--sites={sites}",
            "--sample_len=8", "--progress=False",
        ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exc.value.code == EXIT_ERROR and len(err.splitlines()) == 1 and message in err, err
    assert "drop" in err and not out.exists()


SPARSE_ALL = [s for s in ALL_SITES if s != "mlp_hidden"]


@pytest.mark.parametrize(
    "variant, blocks, sites, want",
    [
        ("mixtral", "0", "all", SPARSE_ALL),  # a sparse block has no one MLP hidden layer
        ("mixtral", "0", "all,router_logits", [*SPARSE_ALL, "router_logits"]),
        ("qwen2_moe", "1", "all", list(ALL_SITES)),  # a dense block of an MoE model has it
        ("qwen2_moe", "0,1", "all", SPARSE_ALL),
        ("opt", "0", "all", ["block_input", "block_output"]),  # the generic path: what it captures
    ],
)
def test_sites_all_is_what_the_blocks_have(hf_zoo, hf_text, tmp_path, variant, blocks, sites, want):
    """``all`` is resolved against the blocks: a site some block lacks is left out rather than
    refused, explicit additions (router_logits) are kept."""
    out = tmp_path / "s.zarr"
    blockcap.run(model=str(hf_zoo(variant)), dataset=str(hf_text), out=str(out), block_idx=blocks,
                 sites=sites, sample_len=8, stride=64, progress=False)  # fmt: skip
    s = blockcap.open_store(out)
    assert list(s.sites) == want
    assert s.spec.sites == tuple(want)  # the store records what was captured, not "all"


def test_router_logits_store_reads_everywhere(hf_zoo, hf_text, tmp_path, capsys):
    """A Mixtral store with router_logits: what hooks see, statistics, search, loader, xarray, info."""
    directory = hf_zoo("mixtral")
    out = tmp_path / "moe.zarr"
    blockcap.run(
        model=str(directory), dataset=str(hf_text), out=str(out), block_idx="0,2",
        sites="block_input,ffwd_output,router_logits", sample_len=16, stride=16, batch_size=8, progress=False,
    )  # fmt: skip
    s = blockcap.open_store(out)
    assert s.meta["dims"]["n_experts"] == 4 and s.meta["model"]["experts_implementation"]
    logits = s.site("router_logits", 2)[:]
    assert logits.shape == (s.n_windows, 16, 4)
    want, _ = hooked(load_reference(directory), s.tokens[:8].long())
    assert torch.equal(logits[:8], want[(2, "router_logits")])
    assert zarr.open_group(str(out), mode="r")["block2/router_logits"].metadata.dimension_names == (
        "window", "position", "expert",
    )  # fmt: skip
    st = s.stats("router_logits", 2)
    flat = logits.reshape(-1, 4).double()
    assert np.allclose(st.mean, flat.mean(0).numpy()) and np.allclose(st.max, flat.max(0).values.numpy())
    best = blockcap.topk(s, torch.tensor([1.0, 0, 0, 0]), site="router_logits", block=2, k=3, metric="dot")[0]
    assert [round(m.score, 4) for m in best] == [round(v, 4) for v in flat[:, 0].topk(3).values.tolist()]
    by_text = blockcap.topk(s, "the quick brown fox", site="router_logits", block=0, k=2)[0]
    assert len(by_text) == 2
    batch = next(iter(blockcap.loader(s, site="router_logits", block=0, batch_size=5)))
    assert batch.shape == (5, 4)
    ds = s.to_xarray()
    var = ds["block2.router_logits"]
    assert var.dims == ("window", "position", "expert") and "transformer_lens" not in var.attrs
    assert ds["block2.ffwd_output"].attrs["transformer_lens"] == "blocks.2.hook_mlp_out"
    assert torch.equal(torch.as_tensor(s["blocks.2.hook_mlp_out"][:]), s.site("ffwd_output", 2)[:])
    main(["info", str(out)])
    text = capsys.readouterr().out
    assert "sites, in moe blocks:" in text and "router_logits  the router's logits" in text


def test_dense_store_records_no_n_experts(hf_zoo, hf_text, tmp_path):
    out = tmp_path / "dense.zarr"
    blockcap.run(
        model=str(hf_zoo("gemma2")), dataset=str(hf_text), out=str(out), sites="proj_output",
        sample_len=8, stride=8, progress=False,
    )  # fmt: skip
    meta = blockcap.open_store(out).meta
    assert "n_experts" not in meta["dims"] and meta["model"]["family"] == "gemma"
