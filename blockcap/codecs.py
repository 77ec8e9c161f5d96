"""Storage dtypes and compression codecs, by the names the CLI accepts.

Every chunk also gets a ``crc32c`` checksum (Zarr v3's own codec), so a corrupted or truncated
chunk file fails on read instead of returning garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from blockcap.errors import BlockcapError

DEFAULT_CODEC = "blosc-lz4"
DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class StorageDtype:
    """How a float32 activation is stored: the torch dtype computed to and the zarr dtype written.

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
        raise BlockcapError(f"dtype={name!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _blosc(cname: str, default_level: int):
    return lambda level: BloscCodec(
        cname=cname, clevel=default_level if level is None else level, shuffle="bitshuffle"
    )


# name -> (factory(level or None) -> codec or None, allowed levels)
_CODECS = {
    "blosc-lz4": (_blosc("lz4", 5), range(0, 10)),
    "blosc-zstd": (_blosc("zstd", 1), range(0, 10)),
    "zstd": (lambda level: ZstdCodec(level=3 if level is None else level), range(-7, 23)),
    "none": (lambda level: None, range(0, 1)),
}
CODEC_NAMES = tuple(_CODECS)


def compressors(spec: str) -> list[BytesBytesCodec]:
    """The bytes-to-bytes codec chain for ``spec`` (``name`` or ``name:level``), checksum last."""
    name, _, level_text = str(spec).partition(":")
    if name not in _CODECS:
        raise BlockcapError(
            f"codec={spec!r} is unknown; use one of {', '.join(CODEC_NAMES)} (optionally name:level)"
        )
    factory, levels = _CODECS[name]
    level = None
    if level_text:
        try:
            level = int(level_text)
        except ValueError:
            level = None
        if level is None or level not in levels:
            raise BlockcapError(
                f"codec={spec!r} has a bad level; {name} takes {levels.start}..{levels.stop - 1}"
            )
    codec = factory(level)
    return ([codec] if codec is not None else []) + [Crc32cCodec()]
