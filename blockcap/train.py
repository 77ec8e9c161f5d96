"""Train a preset GPT on a character dataset and write a blockcap checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from blockcap.checkpoint import save_checkpoint
from blockcap.data import read_text, resolve_dataset, sha256_file, split_tokens
from blockcap.device import pick_device
from blockcap.errors import BlockcapError
from blockcap.model import GPT, PRESETS
from blockcap.tokens import CharTokenizer


def _batch(data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
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
    if preset not in PRESETS:
        raise BlockcapError(f"preset={preset!r} is unknown; use one of {', '.join(PRESETS)}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    path = resolve_dataset(dataset)
    text = read_text(path)
    tok = CharTokenizer.from_text(text)
    data = torch.from_numpy(tok.encode(text))
    splits = {"train": split_tokens(data, "train"), "val": split_tokens(data, "val")}
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
    save_checkpoint(Path(out), model.cpu().eval(), tok.vocab, meta)
    print(f"wrote {out}: val loss {losses['val']:.4f} nats/char after {meta['seconds']} s")
    return losses
