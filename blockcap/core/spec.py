"""What a capture is (``CaptureSpec``) and how one run of it behaves (``RunOptions``).

``CaptureSpec`` holds every choice that fixes a store's contents; ``RunOptions`` holds the rest
(where to write, threads, progress). Both are frozen and validated on construction: every check
that needs no file happens in ``__post_init__``, so a typo fails before anything is loaded.
``run(**kw)`` splits its keywords between the two; the store records ``asdict`` of the resolved
spec as its ``params``, and resume compares specs field by field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Any

from blockcap.core.encoding import DEFAULT_CODEC, DEFAULT_DTYPE, parse_codec, storage_dtype
from blockcap.core.errors import BadValue, BlockcapError
from blockcap.core.sites import ALL_SITES, ATTENTION, DEFAULT_SITES, SITES

SPLITS = ("train", "val", "all")
SEPARATORS = ("eos", "bos", "none")
JOINED, DOCUMENTS = "joined", "documents"
WINDOW_MODES = (JOINED, DOCUMENTS)
EXACT = "exact"  # the default precision: values stored as computed
FLOAT32_MANTISSA = 23
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ALL = "all"


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"help": text})


def parse_blocks(value: Any) -> tuple[int, ...] | str:
    """``block_idx`` as sorted unique non-negative ints, or ``"all"`` (resolved once the model is known)."""
    if isinstance(value, str):
        if value.strip() == ALL:
            return ALL
        parts: list[Any] = [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    blocks = []
    for p in parts:
        v = p
        if isinstance(p, str):
            try:
                v = int(p)
            except ValueError:
                v = p
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise BadValue(
                "block_idx", p, "is not a block number", "use an integer 0 or more, a list like 0,2, or all"
            )
        blocks.append(v)
    if not blocks:
        raise BadValue("block_idx", value, "names no block", "use an integer, a list like 0,2, or all")
    return tuple(sorted(set(blocks)))


def resolve_blocks(blocks: tuple[int, ...] | str, n_layer: int) -> tuple[int, ...]:
    """``blocks`` checked against a model with ``n_layer`` blocks (``"all"`` becomes every block)."""
    if isinstance(blocks, str):  # ALL: parse_blocks gives no other string
        return tuple(range(n_layer))
    bad = [b for b in blocks if b >= n_layer]
    if bad:
        raise BadValue(
            "block_idx", bad[0], "is not a block of this model",
            f"use an integer in 0..{n_layer - 1}, a list, or all",
        )  # fmt: skip
    return tuple(blocks)


def parse_sites(value: Any) -> tuple[str, ...]:
    """Site names in canonical order, ``all`` first and kept as it is until the model's blocks are
    known (``resolve_sites``)."""
    if isinstance(value, str):
        names = [s.strip() for s in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = [str(s).strip() for s in value]
    else:
        names = []
    names = [n for n in names if n]
    bad = [n for n in names if n not in SITES and n != ALL]
    if bad or not names:
        problem = f"has unknown {bad[0]!r}" if bad else "is empty"
        raise BadValue("sites", value, problem, f"use a comma list of {', '.join(SITES)}, or all")
    return (ALL,) * (ALL in names) + tuple(s for s in SITES if s in names)


def resolve_sites(sites: tuple[str, ...], absent: Collection[str]) -> tuple[str, ...]:
    """``sites`` with ``all`` replaced by every vector site the blocks have (``absent``: those they
    lack, e.g. a sparse block's ``mlp_hidden``; attention and router_logits are opt-in)."""
    if ALL not in sites:
        return sites
    return tuple(s for s in SITES if (s in ALL_SITES and s not in absent) or s in sites)


MAX_COUNT = 1 << 40  # windows, strides and chunks beyond this are typos, not runs


def positive(name: str, value: Any, upper: int | None = None) -> int:
    """``value`` if it is an int in 1..upper, else a BlockcapError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper and value > upper):
        hi = (
            " or more" if not upper else f"..2^{upper.bit_length() - 1}" if upper >= 1 << 30 else f"..{upper}"
        )
        what = "is not an integer" if isinstance(value, str) else "is out of range"
        raise BadValue(name, value, what, f"use an integer 1{hi}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadValue(name, value, "is not True or False")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise BadValue(name, value, "is unknown", f"use one of {', '.join(allowed)}")
    return str(value)


def parse_precision(spec: Any, dtype: str) -> int | None:
    """Mantissa bits that ``precision`` keeps (``exact``: None), checked against the storage ``dtype``."""
    if spec == EXACT:
        return None
    name, _, bits = str(spec).partition(":")
    keep = int(bits) if name == "keep_bits" and bits.isdigit() else 0
    if not 1 <= keep <= FLOAT32_MANTISSA - 1:
        raise BadValue(
            "precision", spec, "is unknown",
            f"use exact, or keep_bits:N with N in 1..{FLOAT32_MANTISSA - 1} (the float32 mantissa bits kept)",
        )  # fmt: skip
    if dtype != "float32":
        raise BadValue("precision", spec, "rounds float32 values", "use it with dtype=float32")
    return keep


def _optional_text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # fire reads an all-digit path or hash as a number
    if not isinstance(value, str) or not value.strip():
        raise BadValue(name, value, "is not a non-empty string")
    return value


def _sha256(name: str, value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"{value:064d}"  # fire reads an all-digit hash as a number
    value = _optional_text(name, value)
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
        raise BadValue(name, value, "is not a sha256 (64 hex digits)")
    return value.lower() if value else None


@dataclass(frozen=True)
class CaptureSpec:
    """Everything that fixes the contents of a store. Validated on construction.

    Fields named in ``LOCATORS`` say where things are, not what they are; the resolved spec
    replaces them by content hashes for identity (a moved dataset or model still resumes).
    """

    block_idx: Any = _help("block to capture: an int, a list (0,2) or all", 0)
    sites: Any = _help(
        "comma list of block_input, heads_output, proj_output, resid_mid, mlp_hidden, ffwd_output, "
        "block_output, attention, router_logits (mixture-of-experts models); or all (every vector site "
        "the blocks have; attention and router_logits by name)",
        DEFAULT_SITES,
    )
    model: str | None = _help(
        "Hugging Face model: a save_pretrained directory or a hub id (default: the bundled char GPT)", None
    )
    revision: str | None = _help("hub revision (branch, tag or commit) of model", None)
    model_dtype: str = _help("dtype the model computes in: float32, bfloat16 or float16", "float32")
    weights: str | None = _help(
        "char GPT checkpoint or original state dict (default: the bundled model)", None
    )
    model_sha256: str | None = _help("refuse model weights whose sha256 differs", None)
    dataset: str | None = _help(
        "a file, a directory (recursive), a glob or a URL (s3://, gs://, az://) of .txt, .jsonl, .parquet "
        "(each optionally .gz/.bz2/.zst) or a datasets save_to_disk directory "
        "(default: $BLOCKCAP_DATASET, else TinyShakespeare, downloaded once)",
        None,
    )
    dataset_sha256: str | None = _help("refuse a dataset whose sha256 differs", None)
    text_column: str | None = _help("column holding the text in a .jsonl, .parquet or .arrow dataset", None)
    separator: str | None = _help(
        "token joined between documents: eos, bos or none (default: eos where the tokenizer has one)", None
    )
    windows: str = _help(
        "joined (windows run over the joined token stream) or documents (never cross a document boundary)",
        JOINED,
    )
    prepend_bos: bool = _help("start every window with the BOS token, then sample_len - 1 tokens", False)
    split: str = _help("val (last 10% of the token stream), train or all", "val")
    sample_len: int = _help("tokens per window (1..the model's context)", 3)
    stride: int = _help("tokens between window starts", 96)
    batch_size: int = _help("windows per forward pass", 64)
    dtype: str = _help("storage dtype: float32 (exact), float16 or bfloat16", DEFAULT_DTYPE)
    precision: str = _help(
        "exact, or keep_bits:N (lossy: float32 rounded to N mantissa bits, worst relative error "
        "2^-(N+1), measured and kept with the statistics)",
        EXACT,
    )
    codec: str = _help("blosc-lz4, blosc-zstd, zstd or none, optionally name:level", DEFAULT_CODEC)
    device: str | None = _help("cpu, cuda or cuda:N (default: cuda when available)", None)
    compile: bool = _help("torch.compile(fullgraph=True) the capture module", False)
    fused: bool = _help(
        "fused attention (one q/k/v matmul and SDPA): faster, within a tested tolerance", False
    )
    dedup: bool = _help(
        "compute and store each distinct window prefix once (short, repetitive windows)", False
    )
    stats: bool = _help("keep per-channel statistics of every site (mean, variance, min, max, norms)", True)
    chunk_windows: int | None = _help(
        "windows per chunk, a multiple or divisor of batch_size (default: ~4 MB chunks)", None
    )
    shard_chunks: int | None = _help(
        "chunks per file (Zarr v3 sharding); default: 1 on a local disk, on object storage enough for "
        "objects of ~16 MB on average (the largest at most 64 MB)",
        None,
    )
    query_chunk: int | None = _help(
        "query rows per chunk of the attention pattern (default: whole windows, unless one chunk of "
        "them would exceed ~4 MB, ~16 MB on object storage: then split along queries to that size)",
        None,
    )

    LOCATORS = ("model", "revision", "weights", "dataset")
    LATER = ("separator", "windows", "prepend_bos", "precision", "query_chunk")

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise in place, as a frozen dataclass allows
        set_(self, "block_idx", parse_blocks(self.block_idx))
        set_(self, "sites", parse_sites(self.sites))
        for name in ("model", "revision", "weights", "dataset", "text_column", "device"):
            set_(self, name, _optional_text(name, getattr(self, name)))
        for name in ("model_sha256", "dataset_sha256"):
            set_(self, name, _sha256(name, getattr(self, name)))
        if self.model is not None and self.weights is not None:
            raise BadValue(
                "model", self.model, "and {weights} both given",
                "weights is for the char GPT, model for a Hugging Face model: pass one",
                {"weights": self.weights},
            )  # fmt: skip
        if self.revision is not None and self.model is None:
            raise BadValue("revision", self.revision, "is for a Hugging Face model", "pass model= too")
        _choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        _choice("split", self.split, SPLITS)
        if self.separator is not None:
            _choice("separator", self.separator, SEPARATORS)
        _choice("windows", self.windows, WINDOW_MODES)
        if isinstance(self.sample_len, bool) or not isinstance(self.sample_len, int):
            raise BadValue("sample_len", self.sample_len, "is not an integer", "use 1..the model's context")
        positive("sample_len", self.sample_len, MAX_COUNT)
        if self.prepend_bos is True and self.sample_len < 2:
            raise BadValue(
                "prepend_bos", True, "needs windows of 2 tokens or more ({sample_len})", "",
                {"sample_len": self.sample_len},
            )  # fmt: skip
        positive("stride", self.stride, MAX_COUNT)
        positive("batch_size", self.batch_size, 1 << 62)
        storage_dtype(self.dtype)
        parse_codec(self.codec)
        if parse_precision(self.precision, self.dtype) is not None and not self.stats:
            raise BadValue(
                "precision", self.precision, "keeps its measured error with the statistics",
                "drop stats=False",
            )  # fmt: skip
        for name in ("compile", "fused", "dedup", "stats", "prepend_bos"):
            _flag(name, getattr(self, name))
        if self.chunk_windows is not None:  # its fit with batch_size needs the window count: see plan
            positive("chunk_windows", self.chunk_windows, MAX_COUNT)
        if self.shard_chunks is not None:  # resolved where the store will live: see plan
            positive("shard_chunks", self.shard_chunks, 1 << 20)
        if self.query_chunk is not None:
            positive("query_chunk", self.query_chunk, self.sample_len)
            if ATTENTION not in self.sites:
                raise BadValue(
                    "query_chunk", self.query_chunk, "splits the attention pattern",
                    "add attention to sites or drop query_chunk",
                )  # fmt: skip
        if self.dedup and ATTENTION in self.sites:
            raise BadValue(
                "dedup", self.dedup, "and sites with attention: attention cannot be deduplicated",
                "drop attention or dedup",
            )  # fmt: skip

    @property
    def blocks(self) -> tuple[int, ...]:
        """The resolved block list (only valid once ``block_idx`` is not ``"all"``)."""
        if isinstance(self.block_idx, str):
            raise ValueError("blocks are not resolved yet")
        return tuple(self.block_idx)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the contents (locators left out: hashes stand in for them).

        A field added after format 2 (``LATER``) is left out while at its default, so a store of
        an older blockcap keeps the identity, and the commit tag, it was written with.
        """
        defaults = {f.name: f.default for f in fields(self)}
        return {
            k: v for k, v in self.to_params().items()
            if k not in self.LOCATORS and not (k in self.LATER and v == defaults[k])
        }  # fmt: skip

    def to_params(self) -> dict[str, Any]:
        """JSON-ready ``asdict``: what a store records as ``params``."""
        params: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return params

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CaptureSpec:
        """The spec a store recorded (unknown keys, from a newer blockcap, are an error)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(params.keys() - names)
        if unknown:
            raise BlockcapError(f"the store's params have fields this blockcap does not know: {unknown}")
        return cls(**params)

    def differences(self, other: CaptureSpec) -> list[str]:
        """``"name old -> new"`` for each identity field that differs from ``other``."""
        return identity_differences(other.identity(), self.identity())


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"name old -> new"`` for each field of two identities (``CaptureSpec.identity``) that
    differs, a field that one of them leaves out (a later field at its default) included."""
    defaults = {f.name: f.default for f in fields(CaptureSpec)}
    a, b = ({k: d.get(k, defaults.get(k)) for k in [*new, *old]} for d in (old, new))
    return [f"{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def parse_part(part: Any) -> tuple[int, int]:
    """``"k/n"`` as (k, n) with 0 <= k < n: this process's share of a multi-process capture."""
    try:
        k, n = (int(x) for x in str(part).split("/"))
        if 0 <= k < n:
            return k, n
    except ValueError:
        pass
    raise BadValue("part", part, "is not k/n with 0 <= k < n", "use e.g. part=0/2 and part=1/2")


def parse_storage_options(value: Any, name: str = "storage_options") -> dict[str, Any]:
    """``storage_options`` (or the option ``name``) as a dict: a dict, a JSON object string, or None."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadValue(name, value, f"is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise BadValue(name, value, 'is not a JSON object like {"anon": true}')
    return value


@dataclass(frozen=True)
class RunOptions:
    """How one run behaves; none of it changes what the store holds."""

    out: str | None = _help("store path or URL (s3://bucket/x.zarr; default: block{b}_internals.zarr)", None)
    overwrite: bool = _help(
        "replace a store captured with other parameters (the old one is kept until the new one completes)",
        False,
    )
    writers: int = _help("background compression/writer threads", 2)
    part: Any = _help(
        "k/n: capture the k-th of n interleaved shares of the chunks (independent processes, e.g. a "
        "job array); finish with `blockcap finalize`",
        "0/1",
    )
    storage_options: Any = _help("JSON object for the storage backend (endpoint_url, anon, ...)", None)
    dataset_storage_options: Any = _help("JSON object for a dataset URL's storage backend", None)
    token_cache: str | None = _help(
        "directory of token caches (default: $BLOCKCAP_TOKEN_CACHE, else ~/.cache/blockcap/tokens)", None
    )
    dry_run: bool = _help(
        "print what the run would produce and its estimated time; create no store (the tokens are cached)",
        False,
    )
    force: bool = _help("start even when the target seems to lack the free space the run needs", False)
    progress: bool = _help("show a progress bar", True)
    verbose: bool = _help("per-rank progress lines in a distributed run", False)
    command: str | None = _help("the command line to show in the resume hint", None)
    stall_timeout: float = _help(
        "seconds a torchrun rank may make no progress before the job is ended on every rank (exit 1, "
        "the store resumable)",
        300,
    )
    fsync: bool = _help(
        "fsync every local object before its commit record (False: faster on scratch disks, but a "
        "power loss may then lose committed units)",
        True,
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "out", _optional_text("out", self.out))
        for name in ("overwrite", "dry_run", "force", "progress", "verbose", "fsync"):
            _flag(name, getattr(self, name))
        t = self.stall_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 1 <= t <= 7 * 86400:
            raise BadValue("stall_timeout", t, "is not a number of seconds in 1..604800")
        positive("writers", self.writers, 64)
        parse_part(self.part)
        set_(self, "storage_options", parse_storage_options(self.storage_options))
        set_(self, "dataset_storage_options",
             parse_storage_options(self.dataset_storage_options, "dataset_storage_options"))  # fmt: skip
        set_(self, "token_cache", _optional_text("token_cache", self.token_cache))

    @property
    def parts(self) -> tuple[int, int]:
        return parse_part(self.part)


def split_kwargs(kw: dict[str, Any]) -> tuple[CaptureSpec, RunOptions]:
    """``run``'s keywords as a spec and options; an unknown keyword is a BlockcapError."""
    spec_names = {f.name for f in fields(CaptureSpec)}
    opt_names = {f.name for f in fields(RunOptions)}
    unknown = sorted(kw.keys() - spec_names - opt_names)
    if unknown:
        raise BlockcapError(
            f"unknown option {unknown[0]!r}; the options are {', '.join(sorted(spec_names | opt_names))}"
        )
    spec = CaptureSpec(**{k: v for k, v in kw.items() if k in spec_names})
    opts = RunOptions(**{k: v for k, v in kw.items() if k in opt_names})
    return spec, opts


def option_help() -> list[tuple[str, Any, str]]:
    """(name, default, help) of every run option, spec first: the CLI's signature and docstring."""
    return [(f.name, f.default, f.metadata["help"]) for cls in (CaptureSpec, RunOptions) for f in fields(cls)]
