"""GPU check: blockcap's full ``run`` against the bare forward pass on CUDA, one table.

    bash benchmarks/gpu.sh        (or: python -m benchmarks.gpu [--windows=N])

Seed-size model (384/6/6/256, random init), long windows (sample_len 256, stride 256) at block 0
and block 5, storage float32 and bfloat16; also checks that fused and exact CUDA captures agree
with the CPU float32 reference within tolerance. Prints tokens/s and blockcap/bare ratios.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import blockcap
from benchmarks.baselines import bare_forward
from blockcap.capture import CaptureModule
from blockcap.checkpoint import save_checkpoint
from blockcap.data import CharTokenizer
from blockcap.model import GPT, PRESETS
from tests.conftest import make_text


def fresh_run(args: dict) -> None:
    shutil.rmtree(args["out"], ignore_errors=True)
    blockcap.run(**args)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, rounds: int, device: str) -> float:
    """Median seconds of ``rounds`` calls after one warm-up, synchronised with the device."""
    fn()
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(windows: int = 2048, batch_size: int = 64, rounds: int = 3, device: str = "cuda") -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --device=cpu for a smoke test")
    tmp = Path(tempfile.mkdtemp())
    text = make_text(windows * 256 + 256, seed=1)
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(replace(PRESETS["seed"], vocab_size=len(tok))).eval()
    save_checkpoint(tmp / "seed.pt", model, tok.vocab, {})
    (tmp / "t.txt").write_text(text)
    ids = torch.tensor(tok.encode(text)).unfold(0, 256, 256)[:windows]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"{name}, torch {torch.__version__}, {len(ids)} windows x 256 tokens")
    print("| block | storage | fused | bare tok/s | blockcap tok/s | blockcap/bare |")
    print("|---|---|---|---|---|---|")
    for block in (0, 5):
        model.to(device)
        bare = timed(
            functools.partial(bare_forward, model, ids.to(device), block, batch_size), rounds, device
        )
        for dtype in ("float32", "bfloat16"):
            for fused in (False, True):
                args = dict(
                    block_idx=block,
                    dtype=dtype,
                    fused=fused,
                    out=str(tmp / "s.zarr"),
                    weights=str(tmp / "seed.pt"),
                    dataset=str(tmp / "t.txt"),
                    split="all",
                    sample_len=256,
                    stride=256,
                    batch_size=batch_size,
                    device=device,
                    progress=False,
                )
                t = timed(functools.partial(fresh_run, args), rounds, device)
                n = ids.numel()
                print(f"| {block} | {dtype} | {fused} | {n / bare:,.0f} | {n / t:,.0f} | {bare / t:.2f} |")
    # device captures against the CPU float32 reference
    sample = ids[:8]
    with torch.inference_mode():
        ref = CaptureModule(model.cpu(), (5,), ("heads_output", "ffwd_output"))(sample)
        for fused in (False, True):
            module = CaptureModule(model.to(device), (5,), ("heads_output", "ffwd_output"), fused=fused)
            got = module(sample.to(device))
            err = max(
                ((g.cpu() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref, strict=True)
            )
            print(f"{device} {'fused' if fused else 'exact'} vs CPU reference: max relative error {err:.2e}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--windows", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    a = p.parse_args()
    main(windows=a.windows, rounds=a.rounds, device=a.device)
