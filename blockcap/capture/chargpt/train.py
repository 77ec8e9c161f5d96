"""Train a preset GPT on a character dataset and write a blockcap checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blockcap.capture.chargpt.checkpoint import save_checkpoint
from blockcap.capture.chargpt.model import GPT, PRESETS
from blockcap.core.errors import BlockcapError
from blockcap.core.spec import positive
from blockcap.data.digest import sha256_file
from blockcap.data.sources import read_text, resolve_dataset
from blockcap.data.tokenizers import CharTokenizer
from blockcap.data.windows import split_tokens
from blockcap.run.device import pick_device


def _batch(
    data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + block_size + 1] for i in ix])
    return x, y


@torch.no_grad()
def estimate_loss(
    model: GPT, splits: dict[str, torch.Tensor], iters: int, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean loss over ``iters`` fixed-seed random batches of each split, in eval mode."""
    model.eval()
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(0)
        losses = [
            model(*(t.to(device) for t in _batch(data, batch_size, model.config.block_size, gen)))[1].item()
            for _ in range(iters)
        ]
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def _number(name: str, value: Any, lo: float, hi: float, integer: bool = True) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        raise BlockcapError(
            f"{name}={value!r} is out of range; use {'an integer' if integer else 'a number'} {lo}..{hi}"
        )


def _check_options(
    out: Any, max_iters: Any, batch_size: Any, block_size: Any, lr: Any, min_lr: Any, warmup: Any,
    eval_interval: Any, eval_iters: Any, seed: Any, threads: Any, config: Any,
) -> None:  # fmt: skip
    """Every option checked before the dataset is read or a model built."""
    positive("max_iters", max_iters, 1 << 30)
    positive("batch_size", batch_size, 1 << 16)
    positive("eval_interval", eval_interval, 1 << 30)
    positive("eval_iters", eval_iters, 1 << 20)
    _number("warmup", warmup, 0, 1 << 30)
    _number("lr", lr, 1e-12, 10.0, integer=False)
    _number("min_lr", min_lr, 0.0, 10.0, integer=False)
    _number("seed", seed, 0, 2**63 - 1)
    if threads is not None:
        positive("threads", threads, 1024)
    if block_size is not None:
        positive("block_size", block_size, config.block_size if config else 1 << 14)
    if not isinstance(out, str) or not out.strip():
        raise BlockcapError(f"out={out!r} is not a file path; pass out=PATH for the checkpoint")
    path = Path(out)
    if path.is_dir() or not path.absolute().parent.is_dir():
        raise BlockcapError(f"out={out!r} is a directory or its directory does not exist; pass out=FILE")


def train(
    out: str = "checkpoint.pt",
    preset: str = "small",
    dataset: str | None = None,
    max_iters: int = 3500,
    batch_size: int = 16,
    block_size: int | None = None,
    lr: float = 2e-3,
    min_lr: float = 2e-4,
    warmup: int = 100,
    eval_interval: int = 500,
    eval_iters: int = 50,
    seed: int = 1337,
    device: str | None = None,
    threads: int | None = None,
) -> dict[str, float]:
    """Train a preset model (small, seed) on a text dataset and write a checkpoint to ``out``.

    AdamW with linear warm-up and cosine decay; train/val loss estimated every ``eval_interval``
    steps on ``eval_iters`` fixed batches. ``block_size`` trains on shorter contexts than the
    model's; ``threads`` sets torch's CPU threads.
    """
    _check_options(
        out, max_iters, batch_size, block_size, lr, min_lr, warmup, eval_interval, eval_iters, seed, threads,
        PRESETS.get(preset),
    )  # fmt: skip
    if preset not in PRESETS:
        raise BlockcapError(f"preset={preset!r} is unknown; use one of {', '.join(PRESETS)}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    path = resolve_dataset(dataset)
    text = read_text(path)
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    splits = {name: torch.from_numpy(split_tokens(ids, name)) for name in ("train", "val")}
    config = replace(PRESETS[preset], vocab_size=len(tok))
    train_block = block_size or config.block_size
    dev = pick_device(device)
    model = GPT(config).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    losses: dict[str, float] = {}
    bar = tqdm(range(max_iters + 1), desc=f"train {preset}", unit="it")
    for it in bar:
        if it % eval_interval == 0 or it == max_iters:
            losses = estimate_loss(model, splits, eval_iters, batch_size, dev)
            bar.write(f"step {it}: train {losses['train']:.4f}, val {losses['val']:.4f}")
        if it == max_iters:
            break
        progress = min(1.0, max(0.0, (it - warmup) / max(1, max_iters - warmup)))
        scale = min(1.0, (it + 1) / warmup)
        for g in opt.param_groups:
            g["lr"] = scale * (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress)))
        x, y = (t.to(dev) for t in _batch(splits["train"], batch_size, train_block, gen))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    meta = {
        "preset": preset,
        "dataset_sha256": sha256_file(path),
        "max_iters": max_iters,
        "batch_size": batch_size,
        "train_block_size": train_block,
        "lr": lr,
        "seed": seed,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "seconds": round(time.time() - start, 1),
        "torch": str(torch.__version__),
    }
    try:
        save_checkpoint(Path(out), model.cpu().eval(), tok.vocab, meta)
    except OSError as e:
        raise BlockcapError(
            f"writing out={out!r} failed ({e.strerror or e}); choose another out=PATH"
        ) from None
    print(f"wrote {out}: val loss {losses['val']:.4f} nats/char after {meta['seconds']} s")
    return losses
