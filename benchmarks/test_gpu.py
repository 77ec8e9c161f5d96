"""A store captured on CUDA equals a CPU capture of the same windows, within the stated tolerance.

Run by ``benchmarks/gpu.sh`` on a machine with a GPU; skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import blockcap
from blockcap.capture.chargpt.capture import FUSED_TOLERANCE, CharGPTCapture
from tests.conftest import make_text

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# CUDA and CPU kernels sum in different orders: float32 results agree to this, relative to each
# site's largest magnitude (TF32 is off, torch's default for float32 matmuls).
CUDA_TOLERANCE = 1e-5
BF16_TOLERANCE = 2**-7  # one bfloat16 rounding step on top


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_store_equals_cpu_capture(ckpt, tmp_path, dtype, fused):
    data = tmp_path / "t.txt"
    data.write_text(make_text(40_000, seed=5))
    out = tmp_path / "s.zarr"
    sites = ("heads_output", "mlp_hidden", "ffwd_output", "block_output")
    blockcap.run(weights=str(ckpt), dataset=str(data), out=str(out), split="all", sample_len=32, stride=32,
                 batch_size=16, block_idx=(0, 2), sites=",".join(sites), dtype=dtype, fused=fused,
                 device="cuda", progress=False)  # fmt: skip
    s = blockcap.open_store(out)
    assert s.meta["device"].startswith("cuda") and blockcap.verify(out) == []
    module = CharGPTCapture(blockcap.load_checkpoint(str(ckpt)).model, (0, 2), sites)  # CPU, exact
    with torch.inference_mode():
        ids = s.tokens[:].long()
        want = dict(zip(module.outputs, module(ids), strict=True))
    tol = CUDA_TOLERANCE + (FUSED_TOLERANCE if fused else 0) + (BF16_TOLERANCE if dtype == "bfloat16" else 0)
    for (b, site), value in want.items():
        got = s.site(site, b)[:].float()
        err = ((got - value).abs().max() / value.abs().max()).item()
        assert err <= tol, (b, site, err)
