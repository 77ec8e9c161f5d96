"""The fire CLI: ``python -m blockcap COMMAND`` (or ``blockcap COMMAND``).

Each command is a thin shell over the library. Bad input becomes one line on stderr and exit
status 2; the library names options as ``name=value``, which the CLI words as ``--name=value``.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json as jsonlib
import os
import re
import sys
from typing import Any

import fire

from blockcap.capture.chargpt.train import train as train_model
from blockcap.core.errors import BlockcapError, Interrupted
from blockcap.core.spec import option_help

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def default_command() -> str:
    """The command line that started this process, for the resume hint."""
    return " ".join(["python -m blockcap", *sys.argv[1:]])


def run(**kwargs) -> None:
    from blockcap.run.job import run as run_capture

    kwargs.setdefault("command", default_command())
    summary = run_capture(**kwargs)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports for the job
        print("\n".join(summary.lines()))


def _document_run() -> None:
    """Give ``run`` the spec's options as its signature and help, so fire can parse and show them."""
    params, doc = (
        [],
        ["Capture block internals for every window of a dataset into a Zarr store.", "", "Args:"],
    )
    for name, default, text in option_help():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
        doc.append(f"  {name}: {text}")
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__doc__ = "\n".join(doc)


_document_run()


def _store_arg(store: object) -> str:
    if not isinstance(store, (str, int)) or not str(store).strip():
        raise BlockcapError(f"store={store!r} is not a store path or URL")
    return str(store)


def _bool_arg(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BlockcapError(f"{name}={value!r} is not True or False")
    return value


def info(store: str, *, storage_options: str | None = None) -> None:
    """Print a store's layout, sizes, completion state, statistics and provenance."""
    from blockcap.analysis.describe import describe
    from blockcap.analysis.reader import CaptureStore
    from blockcap.core.spec import parse_storage_options
    from blockcap.storage.location import Location
    from blockcap.storage.metadata import open_location

    location = Location(_store_arg(store), parse_storage_options(storage_options))
    print(describe(CaptureStore(open_location(location))))


def verify(
    store: str, *, dataset_check: bool = True, stats: bool = False, repair: bool = False,
    storage_options: str | None = None, dataset: str | None = None,
    dataset_storage_options: str | None = None,
) -> None:  # fmt: skip
    """Read every object of a store and check metadata, commits, digests and tokens; exit 1 on a problem.

    --repair deletes the objects found altered, so that re-running the capture recomputes them.
    --dataset names the dataset to check the tokens against (default: the one the store names);
    --dataset_storage_options is its storage backend's JSON, as the run took it.
    """
    from blockcap.analysis.tokens import TOKENS_NOT_CHECKED
    from blockcap.analysis.verify import verify as verify_store

    problems = verify_store(
        _store_arg(store), check_dataset=_bool_arg("dataset_check", dataset_check),
        check_stats=_bool_arg("stats", stats), storage_options=storage_options,
        repair=_bool_arg("repair", repair), dataset=None if dataset is None else str(dataset),
        dataset_storage_options=dataset_storage_options,
    )  # fmt: skip
    for p in problems:
        print(f"problem: {cli_words(p)}", file=sys.stderr)
    hint = _verify_hint([p for p in problems if not p.startswith(TOKENS_NOT_CHECKED)], repair)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"ok: {store} is complete and every object matches its commit record")


# problems that verify --repair acts on
ALTERED = ("differs from what was", "record is damaged", "differs from the store's layout")


def _verify_hint(problems: list[str], repaired: bool) -> str | None:
    """What to do next about the store's ``problems`` (None: nothing to do to the store)."""
    if not problems:
        return None
    if repaired or not any(a in p for p in problems for a in ALTERED):
        return "re-run the capture command: it recomputes what is missing and finishes the store"
    return "verify --repair rewrites damaged metadata and deletes altered objects; then re-run the capture"


def finalize(store: str, *, storage_options: str | None = None) -> None:
    """Mark a store complete once every unit is committed (idempotent; safe from every job-array task)."""
    from blockcap.core.spec import parse_storage_options
    from blockcap.storage.lifecycle import finish
    from blockcap.storage.location import Location
    from blockcap.storage.metadata import read_meta

    location = Location(_store_arg(store), parse_storage_options(storage_options))
    meta = finish(location, read_meta(location))
    print(f"complete: {store} (finished {meta.get('finished')})")


@functools.wraps(train_model)
def train(*args, **kwargs) -> None:
    train_model(*args, **kwargs)


def generate(*, prompt: str = "\n", length: int = 300, weights: str | None = None, seed: int = 0) -> None:
    """Sample text from a char model (the bundled one by default) as a sanity check."""
    import torch

    from blockcap.capture.chargpt.checkpoint import load_checkpoint
    from blockcap.core.spec import positive
    from blockcap.data.tokenizers import CharTokenizer

    positive("length", length, 100_000)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BlockcapError(f"seed={seed!r} is not an integer 0 or more")
    if str(prompt) == "":
        raise BlockcapError("prompt='' is empty; the model needs at least one character to start from")

    loaded = load_checkpoint(weights)
    if loaded.vocab is None:
        raise BlockcapError(f"weights {loaded.path} carry no vocabulary; use a blockcap checkpoint")
    tok = CharTokenizer(loaded.vocab)
    torch.manual_seed(seed)
    idx = torch.tensor([tok.encode(str(prompt)).tolist()], dtype=torch.long)
    print(tok.decode(loaded.model.generate(idx, length)[0].tolist()))


def search(
    store: str, window: int, position: int = -1, site: str = "ffwd_output", block: int | None = None,
    k: int = 10, metric: str = "cosine",
) -> None:  # fmt: skip
    """Print the k tokens whose vectors are nearest to those of one token (window, position)."""
    from blockcap.analysis.reader import open_store
    from blockcap.analysis.search import nearest

    s = open_store(store)
    arr = s.site(site, block)
    for name, value, size in (("window", window, arr.shape[0]), ("position", position, arr.shape[1])):
        if isinstance(value, bool) or not isinstance(value, int):
            raise BlockcapError(f"{name}={value!r} is not an integer; use one in {-size}..{size - 1}")
        if not -size <= value < size:
            raise BlockcapError(
                f"{name}={value!r} is outside the store; use an integer in {-size}..{size - 1}"
            )
    w, p = window % arr.shape[0], position % arr.shape[1]
    print(f"nearest to window {w}, position {p}: {s.substring(w, p)!r} ({arr.name}, {metric})")
    for m in nearest(s, arr[w, p], site, block, k, metric):
        print(f"  {m.score:9.4f}  window {m.window:>7} position {m.position:>3}  {m.substring!r}")


def _query_argument(raw: str) -> str | list[str]:
    """``--query`` as typed (spaces kept, digits stay text); a list literal of strings gives several."""
    if raw.lstrip().startswith("["):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
    return raw


@fire.decorators.SetParseFn(_query_argument, "query")
def similar(
    store: str, query: Any = None, site: str = "ffwd_output", block: int | None = None, k: int = 10,
    metric: str = "cosine", position: int | None = None, unique: bool = False, largest: bool = True,
    json: bool = False, model: str | None = None, weights: str | None = None,
    storage_options: str | None = None,
) -> None:  # fmt: skip
    """Print the k tokens whose vectors are nearest to those of some text, for each query.

    --query="the " (verbatim), or several at once as a list: --query='["the ", "and"]'.
    Substrings show newlines as ⏎ and spaces as ␣; --json prints every match in full.
    """
    from blockcap.analysis.reader import open_store
    from blockcap.analysis.search import SHOWN_CHARS, topk, visible

    if isinstance(query, str):
        query = [query]
    if not isinstance(query, list) or not query or not all(isinstance(q, str) for q in query):
        raise BlockcapError(f'query={query!r} is not text; pass --query=TEXT or --query=\'["a", "b"]\'')
    if not isinstance(json, bool):
        raise BlockcapError(f"json={json!r} is not True or False")
    s = open_store(str(store), storage_options)
    found = topk(s, query, site, block, k, metric, position, largest, unique, model, weights)
    name = s.site(site, block).name
    if json:
        doc = {"store": str(s.location), "site": name, "metric": metric, "queries": [
            {"query": q, "matches": [{"rank": r + 1, **vars(m)} for r, m in enumerate(ms)]}
            for q, ms in zip(query, found, strict=True)
        ]}  # fmt: skip
        print(jsonlib.dumps(doc, ensure_ascii=False))
        return
    for q, ms in zip(query, found, strict=True):
        print(f"query {visible(q)} ({name}, {metric}, {len(ms)} {'best' if largest else 'worst'})")
        print(f"  {'rank':>4} {'score':>10} {'window':>7} {'position':>8}  substring")
        for r, m in enumerate(ms, 1):
            text = m.substring if len(m.substring) <= SHOWN_CHARS else "…" + m.substring[-SHOWN_CHARS:]
            print(f"  {r:>4} {m.score:>10.4f} {m.window:>7} {m.position:>8}  {visible(text)}")


def plot(
    store: str, site: str = "ffwd_output", block: int | None = None, out: str = "report.png",
    sample: int = 2000, seed: int = 0, storage_options: str | None = None,
) -> None:  # fmt: skip
    """Write a one-page PNG overview of a site: norms, values, channels and a PCA by token."""
    from blockcap.analysis.plot import plot as plot_store

    path = plot_store(_store_arg(store), site, block, out, sample, seed, storage_options)
    print(f"wrote {path} ({path.stat().st_size / 1e3:,.0f} kB)")


COMMANDS = {
    "run": run, "info": info, "verify": verify, "finalize": finalize, "search": search,
    "similar": similar, "plot": plot, "train": train, "generate": generate,
}  # fmt: skip


def cli_words(message: str) -> str:
    """A library message in CLI words: option ``name=`` becomes ``--name=``."""
    options = {name for fn in COMMANDS.values() for name in inspect.signature(fn).parameters}
    names = "|".join(map(re.escape, sorted(options, key=len, reverse=True)))
    return re.sub(rf"(?<![\w\-.])({names})=", r"--\1=", message)


# (command, old option) -> new option; the old spelling works, with a note, for one minor version
RENAMED = {("similar", "block_idx"): "block", ("plot", "block_idx"): "block"}


def renamed_options(argv: list[str]) -> list[str]:
    """``argv`` with renamed options spelt the new way (a one-line note on stderr for each)."""
    out = list(argv)
    for i, tok in enumerate(out[1:], 1):
        name, eq, value = tok[2:].partition("=")
        new = RENAMED.get((out[0], name)) if tok.startswith("--") else None
        if new:
            print(f"blockcap: note: --{name} is renamed --{new} for {out[0]}", file=sys.stderr)
            out[i] = f"--{new}{eq}{value}"
    return out


def check_args(argv: list[str]) -> None:
    """Refuse unknown commands, options and arguments in one line, before anything runs.

    (fire calls a command with the arguments it understood and complains about the rest only
    afterwards, in several lines: a misspelt option would otherwise start a capture.)
    """
    if not argv or argv[0] in ("-h", "--help", "--", "-"):
        return
    fn = COMMANDS.get(argv[0])
    if fn is None:
        raise BlockcapError(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}")
    params = inspect.signature(fn).parameters
    flags = {n for n, p in params.items() if isinstance(p.default, bool)}
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    given, named, i = [], set(), 1
    while i < len(argv):
        tok = argv[i]
        if tok in ("--", "-h", "--help", "--helpfull"):
            return  # fire's own: help, or arguments for the result
        if tok.startswith("--"):
            name, eq, _ = tok[2:].partition("=")
            name = name.replace("-", "_")
            negated = name.startswith("no") and name[2:] in flags and name not in params
            if negated and eq:
                raise BlockcapError(f"option --{name} takes no value; use --{name[2:]}=False")
            if name not in params and not negated:
                raise BlockcapError(f"unknown option --{name} for {argv[0]}; its options are "
                                    f"{', '.join('--' + n for n in params)}")  # fmt: skip
            named.add(name)
            if not eq and name in params and name not in flags:
                i += 1  # --name value
        elif tok.startswith("-") and not tok.lstrip("-").replace(".", "", 1).isdigit():
            raise BlockcapError(f"option {tok!r} for {argv[0]}: pass options as --name=value")
        else:
            given.append(tok)
        i += 1
    free = [n for n in positional if n not in named]
    if len(given) > len(free):
        raise BlockcapError(
            f"unexpected argument {given[len(free)]!r} for {argv[0]}; pass options as --name=value"
        )
    missing = [n for n in free[len(given) :] if params[n].default is inspect.Parameter.empty]
    if missing:
        raise BlockcapError(
            f"{argv[0]} needs {missing[0].upper()}: python -m blockcap {argv[0]} {missing[0].upper()}"
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``blockcap`` and ``python -m blockcap``.

    Under torchrun rank 0 speaks for the job: errors every rank knows of (``job_wide``) and
    interruptions are printed by rank 0 alone; an error of one rank is printed by that rank,
    with its number. A SIGINT or SIGTERM at any instant ends with status 130, even one that a
    library or finalizer swallowed (see ``location.stop_signals``).
    """
    from blockcap.storage.stops import stop_requested, stop_signals

    rank = os.environ.get("RANK", "0")
    quiet = rank != "0"
    with stop_signals():
        try:
            args = renamed_options(sys.argv[1:] if argv is None else list(argv))
            check_args(args)
            fire.Fire(COMMANDS, command=args, name="blockcap")
            if stop_requested():  # a stop that something swallowed on its way up
                raise KeyboardInterrupt
        except Interrupted as e:
            if not quiet:
                print(f"blockcap: {cli_words(str(e))}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:  # outside a capture loop: planning, creating or finishing a store
            if not quiet:
                print(
                    "blockcap: interrupted; every store is left consistent: re-run the same command",
                    file=sys.stderr,
                )
            sys.exit(EXIT_INTERRUPTED)
        except BlockcapError as e:
            if not (quiet and getattr(e, "job_wide", False)):
                who = f"rank {rank}: " if quiet else ""
                print(f"blockcap: error: {who}{cli_words(str(e))}", file=sys.stderr)
            sys.exit(getattr(e, "exit_status", EXIT_ERROR))
        except OSError as e:  # the environment (a name too long, a file system gone): one line
            where = f" ({e.filename})" if e.filename else ""
            print(f"blockcap: error: {e.strerror or e}{where}", file=sys.stderr)
            sys.exit(EXIT_ERROR)
