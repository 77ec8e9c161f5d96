"""GPU check: blockcap's steady capture against the bare forward pass on CUDA, like for like.

    bash benchmarks/gpu.sh        (or: python -m benchmarks.gpu [--windows=N] [--device=cpu])

Models: the seed-size char GPT (384/6/6/256, random init) and, with transformers installed, a
GPT-2-small-shaped random model (12 layers, d_model 768), both at 256-token windows, block 5
(and block 0 for the char GPT), storage float32 and bfloat16, exact and fused attention. Fused
runs are compared with a fused bare forward (the same SDPA path). Each figure is the median of
``--rounds`` after a warm-up, synchronised with the device; store creation is outside the timer.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.baselines import bare_forward
from blockcap.capture.chargpt.checkpoint import save_checkpoint
from blockcap.capture.chargpt.model import GPT, PRESETS
from blockcap.data.tokenizers import CharTokenizer
from blockcap.run.job import Job
from tests.conftest import make_text


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, rounds: int, device: str, setup=None) -> float:
    """Median seconds of ``rounds`` calls after one warm-up; ``setup`` (untimed) feeds each call."""
    times = []
    for r in range(rounds + 1):
        args = setup() if setup else ()
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        if r:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def steady_capture(args: dict, rounds: int, device: str) -> float:
    jobs: list[Job] = []

    def fresh():
        shutil.rmtree(args["out"], ignore_errors=True)
        for job in jobs:
            job.close()
        jobs[:] = [Job(**args)]
        jobs[0].open()
        return (jobs[0],)

    seconds = timed(lambda job: job.capture(), rounds, device, fresh)
    jobs[0].close()
    return seconds


def char_gpt(tmp: Path, windows: int) -> tuple[Path, Path, torch.Tensor, GPT]:
    text = make_text(windows * 256 + 256, seed=1)
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(replace(PRESETS["seed"], vocab_size=len(tok))).eval()
    save_checkpoint(tmp / "seed.pt", model, tok.vocab, {})
    (tmp / "t.txt").write_text(text)
    ids = torch.from_numpy(tok.encode(text)).unfold(0, 256, 256)[:windows]
    return tmp / "seed.pt", tmp / "t.txt", ids, model


def gpt2_small(tmp: Path, windows: int) -> tuple[Path, Path, torch.Tensor, torch.nn.Module] | None:
    """A GPT-2-small-shaped random model with a tokenizer trained here, its text and windows."""
    try:
        import transformers
    except ImportError:
        return None
    from blockcap.data.tokenizers import HFTokenizer
    from tests.hf_models import make_text as words
    from tests.hf_models import train_tokenizer

    text = words(windows * 256 * 4, seed=3)
    fast = train_tokenizer(text)
    config = transformers.GPT2Config(
        n_layer=12,
        n_embd=768,
        n_head=12,
        n_positions=256,
        vocab_size=len(fast),
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp / "gpt2")
    fast.save_pretrained(tmp / "gpt2")
    (tmp / "g.txt").write_text(text)
    stream = HFTokenizer(fast.backend_tokenizer.to_str()).encode(text)  # one document: one encode
    ids = torch.from_numpy(stream)[: windows * 256].unfold(0, 256, 256)
    (tmp / "g.txt").write_text(fast.decode(ids.flatten().tolist()))
    model = transformers.AutoModel.from_pretrained(tmp / "gpt2", attn_implementation="eager").eval()
    model.h = model.h[:6]  # the bare forward stops after block 5, as the capture does
    return tmp / "gpt2", tmp / "g.txt", ids, model


def main(windows: int = 2048, batch_size: int = 64, rounds: int = 3, device: str = "cuda") -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --device=cpu for a smoke test")
    tmp = Path(tempfile.mkdtemp())
    weights, data, ids, model = char_gpt(tmp, windows)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"{name}, torch {torch.__version__}, {len(ids)} windows x 256 tokens, batch {batch_size}")
    print("| model | block | storage | attention | bare tok/s | blockcap tok/s | blockcap/bare |")
    print("|---|---|---|---|---|---|---|")
    common = dict(out=str(tmp / "s.zarr"), split="all", sample_len=256, stride=256, batch_size=batch_size,
                  device=device, progress=False)  # fmt: skip

    def row(what: str, block: int, dtype: str, kind: str, bare: float, ours: float) -> None:
        print(f"| {what} | {block} | {dtype} | {kind} | {bare:,.0f} | {ours:,.0f} | {ours / bare:.2f} |")

    n = ids.numel()
    model.to(device)
    on_device = ids.to(device)
    for block in (0, 5):
        for fused in (False, True):
            bare = timed(
                lambda f=fused, b=block: bare_forward(model, on_device, b, batch_size, fused=f),
                rounds,
                device,
            )
            for dtype in ("float32", "bfloat16"):
                args = dict(
                    common, block_idx=block, dtype=dtype, fused=fused, weights=str(weights), dataset=str(data)
                )
                row(
                    "char 384d",
                    block,
                    dtype,
                    "fused" if fused else "exact",
                    n / bare,
                    n / steady_capture(args, rounds, device),
                )
    hf = gpt2_small(tmp, windows)
    if hf is not None:
        directory, text, ids, base = hf
        base.to(device)
        on_device, n = ids.to(device), ids.numel()

        def bare_hf():
            with torch.inference_mode():
                for i in range(0, len(on_device), batch_size):
                    base(on_device[i : i + batch_size], use_cache=False)

        bare = timed(bare_hf, rounds, device)
        for dtype in ("float32", "bfloat16"):
            args = dict(common, model=str(directory), block_idx=5, dtype=dtype, dataset=str(text))
            row("GPT-2-small shape", 5, dtype, "exact", n / bare, n / steady_capture(args, rounds, device))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--windows", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    a = p.parse_args()
    main(windows=a.windows, rounds=a.rounds, device=a.device)
