"""The fire CLI: ``python -m blockcap COMMAND`` (or ``blockcap COMMAND``).

Each command is a thin shell over the library; bad input becomes one line on stderr and a
non-zero exit code.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import fire

from blockcap.errors import BlockcapError
from blockcap.pipeline import Interrupted, default_command
from blockcap.pipeline import run as run_capture
from blockcap.train import train as train_model

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


@functools.wraps(run_capture)
def run(*args, **kwargs) -> None:
    call = inspect.signature(run_capture).bind(*args, **kwargs)
    if not call.arguments.get("command"):
        call.arguments["command"] = default_command()
    print("\n".join(run_capture(*call.args, **call.kwargs).lines()))


def info(store: str) -> None:
    """Print a store's layout, sizes, completion state and provenance."""
    from blockcap.describe import describe

    print(describe(Path(store)))


def verify(store: str, dataset_check: bool = True) -> None:
    """Read every chunk of a store and check state, shapes and tokens; exit 1 on any problem."""
    from blockcap.verify import verify as verify_store

    problems = verify_store(Path(store), check_dataset=dataset_check)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"ok: {store} is complete and every chunk reads back with a valid checksum")


@functools.wraps(train_model)
def train(*args, **kwargs) -> None:
    train_model(*args, **kwargs)


def generate(prompt: str = "\n", length: int = 300, weights: str | None = None, seed: int = 0) -> None:
    """Sample text from a model (the bundled one by default) as a sanity check."""
    import torch

    from blockcap.checkpoint import load_checkpoint
    from blockcap.data import CharTokenizer

    loaded = load_checkpoint(weights)
    if loaded.vocab is None:
        raise BlockcapError(f"weights {loaded.path} carry no vocabulary; use a blockcap checkpoint")
    tok = CharTokenizer(loaded.vocab)
    torch.manual_seed(seed)
    idx = torch.tensor([tok.encode(str(prompt))], dtype=torch.long)
    print(tok.decode(loaded.model.generate(idx, length)[0].tolist()))


def search(
    store: str, window: int, position: int = -1, site: str = "ffwd_output", block: int | None = None,
    k: int = 10, metric: str = "cosine",
) -> None:  # fmt: skip
    """Print the k tokens whose vectors are nearest to those of one token (window, position)."""
    from blockcap.reader import open_store
    from blockcap.search import nearest

    s = open_store(store)
    arr = s.site(site, block)
    if not -arr.shape[0] <= window < arr.shape[0] or not -arr.shape[1] <= position < arr.shape[1]:
        raise BlockcapError(
            f"window={window}, position={position} is outside the store; "
            f"use 0..{arr.shape[0] - 1} and 0..{arr.shape[1] - 1}"
        )
    w, p = window % arr.shape[0], position % arr.shape[1]
    print(f"nearest to window {w}, position {p}: {s.substring(w, p)!r} ({arr.name}, {metric})")
    for m in nearest(s, arr[w, p], site, block, k, metric):
        print(f"  {m.score:9.4f}  window {m.window:>7} position {m.position:>3}  {m.substring!r}")


COMMANDS = {
    "run": run, "info": info, "verify": verify, "search": search, "train": train, "generate": generate,
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``blockcap`` and ``python -m blockcap``."""
    try:
        fire.Fire(COMMANDS, command=argv, name="blockcap")
    except Interrupted as e:
        print(f"blockcap: {e}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BlockcapError as e:
        print(f"blockcap: error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
