"""The two baselines blockcap is measured against: the bare forward pass and the original experiment."""

from __future__ import annotations

from pathlib import Path

import torch

from blockcap.model import GPT, Block


def bare_forward(model: GPT, windows: torch.Tensor, block: int, batch_size: int) -> None:
    """The floor: embeddings and blocks 0..block under inference_mode, results discarded."""
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            x = model.embed(windows[i : i + batch_size])
            for b in model.blocks[: block + 1]:
                x = b(x)


def original_experiment(model: GPT, windows: torch.Tensor, block: int, batch_size: int, out: Path) -> int:
    """The notebook's way: per batch, run earlier blocks, copy the target block into a freshly built
    Block, read its internals with forward hooks, and ``torch.save`` each tensor to its own file.
    Gradients stay enabled, as they were. Returns the number of files written."""
    files = 0
    for n, i in enumerate(range(0, len(windows), batch_size)):
        x = model.embed(windows[i : i + batch_size])
        for b in model.blocks[:block]:
            x = b(x)
        target = Block(model.config)
        target.load_state_dict(model.blocks[block].state_dict())
        target.eval()
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            target.sa.proj.register_forward_hook(lambda m, a, o, seen=seen: seen.update(heads=a[0], proj=o)),
            target.ffwd.register_forward_hook(lambda m, a, o, seen=seen: seen.update(ffwd=o)),
        ]
        target(x)
        for h in hooks:
            h.remove()
        for name, t in (("input", x), *seen.items()):
            torch.save(t, out / f"batch{n}_{name}.pt")
            files += 1
    return files
