"""How values are stored, by the names a spec uses: storage dtypes, token dtypes, codec names.

The store layout contract needs these names and sizes; the codecs that encode bytes live in
``blockcap.storage.codecs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from blockcap.core.errors import BadValue

DEFAULT_CODEC = "blosc-lz4"
DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class StorageDtype:
    """How an activation is stored: the torch dtype computed to and the zarr dtype written.

    bfloat16 has no zarr v3 core dtype, so its bit pattern is stored as uint16 and the array's
    ``blockcap_dtype`` attribute says so; ``torch.from_numpy(a).view(torch.bfloat16)`` reads it.
    """

    name: str
    torch_dtype: torch.dtype
    zarr_dtype: np.dtype

    def to_numpy(self, t: torch.Tensor) -> np.ndarray:
        """A CPU tensor already in ``torch_dtype`` as the numpy array zarr stores."""
        return t.view(torch.uint16).numpy() if self.name == "bfloat16" else t.numpy()


DTYPES: dict[str, StorageDtype] = {
    "float32": StorageDtype("float32", torch.float32, np.dtype("float32")),
    "float16": StorageDtype("float16", torch.float16, np.dtype("float16")),
    "bfloat16": StorageDtype("bfloat16", torch.bfloat16, np.dtype("uint16")),
}


def storage_dtype(name: str) -> StorageDtype:
    if name not in DTYPES:
        raise BadValue("dtype", name, "is unknown", f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# name -> (default level, allowed levels)
_LEVELS = {"blosc-lz4": (5, range(0, 10)), "blosc-zstd": (1, range(0, 10)), "zstd": (3, range(-7, 23))}
CODEC_NAMES = (*_LEVELS, "none")


def parse_codec(spec: str) -> tuple[str, int | None]:
    name, _, level_text = str(spec).partition(":")
    if name not in CODEC_NAMES:
        raise BadValue(
            "codec", spec, "is unknown", f"use one of {', '.join(CODEC_NAMES)} (optionally name:level)"
        )
    if not level_text:
        return name, _LEVELS[name][0] if name in _LEVELS else None
    levels = _LEVELS.get(name, (0, range(0, 1)))[1]
    try:
        level = int(level_text)
    except ValueError:
        level = None
    if level is None or level not in levels:
        raise BadValue("codec", spec, "has a bad level", f"{name} takes {levels.start}..{levels.stop - 1}")
    return name, level


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every token id."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)
