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
    from blockcap.inspect import describe

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


COMMANDS = {"run": run, "info": info, "verify": verify, "train": train, "generate": generate}


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
