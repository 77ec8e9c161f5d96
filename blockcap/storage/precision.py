"""Bounded-error lossy storage: float32 values rounded to N mantissa bits, the error measured.

``precision="keep_bits:N"`` rounds every stored float32 to its N most significant mantissa bits
(round half to even on the bit pattern, as numcodecs' ``BitRound``): the low 23 - N bits become
zeros, which Blosc and zstd then compress well. Decoding is the identity, so any Zarr reader
reads the rounded values as plain float32 and the codec chain stays [bytes, compressor, crc32c].

The error is measured, not assumed: for every value, ``|x' - x| / max(|x|, tiny)`` (x the float32
the model computed, x' the stored value, tiny the smallest normal float32), and each unit's worst
is kept in its statistics partial; the store's worst per site is their maximum. For normal
numbers it is at most 2**-(N+1); subnormals can exceed that (they have fewer significant bits),
and the measurement says so. Non-finite values are stored unchanged; a finite value that would
round up to infinity is truncated instead.
"""

from __future__ import annotations

import threading

import numpy as np

MANTISSA_BITS = 23  # float32
TINY = np.float32(np.finfo(np.float32).tiny)
BLOCK = 1 << 17  # values per block: the block's temporaries stay in a core's cache
_SCRATCH = threading.local()


def bound(keep: int) -> float:
    """The worst relative error of rounding a normal float32 to ``keep`` mantissa bits."""
    return 2.0 ** -(keep + 1)


def round_bits(x: np.ndarray, keep: int) -> tuple[np.ndarray, float]:
    """(``x`` rounded to ``keep`` mantissa bits, the worst relative error), ``x`` float32 C-contiguous.

    The result lives in this thread's scratch buffer until its next call. Block by block, so the
    bit arithmetic and the error of each block happen while it is in cache.
    """
    flat = np.ascontiguousarray(x).reshape(-1)
    out = _scratch(flat.size)
    drop = MANTISSA_BITS - keep
    half = np.uint32((1 << (drop - 1)) - 1)
    mask = np.uint32(0xFFFFFFFF >> drop << drop)
    exponent = np.uint32(0x7F800000)
    worst = 0.0
    for lo in range(0, flat.size, BLOCK):
        src = flat[lo : lo + BLOCK]
        bits = src.view(np.uint32)
        dst = out[lo : lo + src.size]
        rounded = dst.view(np.uint32)
        np.right_shift(bits, drop, out=rounded)
        rounded &= np.uint32(1)
        rounded += bits
        rounded += half
        rounded &= mask
        # non-finite inputs stay as they were; finite ones that overflowed are truncated
        special = (rounded & exponent) == exponent
        if special.any():
            kept = (bits & exponent) == exponent
            rounded[special] = np.where(kept[special], bits[special], bits[special] & mask)
        with np.errstate(invalid="ignore"):  # inf - inf, nan: not errors, left out of the worst
            err = np.abs(dst - src)
            err /= np.maximum(np.abs(src), TINY)
            worst = max(worst, float(np.nanmax(err, initial=0.0)))
    return out.reshape(x.shape), worst


def _scratch(size: int) -> np.ndarray:
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < size:
        buf = _SCRATCH.buf = np.empty(size, np.float32)
    return buf[:size]
