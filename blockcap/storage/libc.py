"""The C library's functions that Python's standard library lacks (glibc on Linux; None elsewhere)."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any


def _load() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _load()


def function(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Callable[..., int] | None:
    """The C function ``name`` with its signature set, or None where the C library lacks it."""
    found = getattr(_LIBC, name, None) if _LIBC is not None else None
    if found is None:
        return None
    found.argtypes, found.restype = argtypes, restype
    fn: Callable[..., int] = found
    return fn
