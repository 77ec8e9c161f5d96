"""What blockcap is measured against: the bare forward pass and the original experiment.

Each comes in two forms, timed from the same starting point as blockcap's:

* steady: the model and the windows are already in memory (blockcap: its plan is built and its
  store created before the timer starts);
* whole: everything a user waits for, loading the weights and the text and tokenizing included.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blockcap.capture.chargpt.capture import CharGPTCapture
from blockcap.capture.chargpt.checkpoint import load_checkpoint
from blockcap.capture.chargpt.model import GPT, Block
from blockcap.data.tokenizers import CharTokenizer
from blockcap.data.windows import split_tokens


def bare_forward(model: GPT, windows: torch.Tensor, block: int, batch_size: int, fused: bool = False) -> None:
    """The floor: embeddings and blocks 0..block under inference_mode, results discarded.

    ``fused``: the same SDPA path blockcap's ``fused`` capture takes, so fused runs compare with
    a fused floor.
    """
    fused_module = CharGPTCapture(model, (block,), ("block_output",), fused=True) if fused else None
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            idx = windows[i : i + batch_size]
            if fused_module is not None:
                fused_module(idx)
                continue
            x = model.embed(idx)
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


def load_like_a_user(
    weights: Path, text_file: Path, sample_len: int, stride: int
) -> tuple[GPT, torch.Tensor]:
    """What the whole-run baselines do before computing: load the weights, read and tokenize the text."""
    loaded = load_checkpoint(weights)
    tok = CharTokenizer(loaded.vocab)
    stream = torch.from_numpy(tok.encode(text_file.read_text()))
    windows = split_tokens(stream, "all").unfold(0, sample_len, stride)
    return loaded.model, windows
