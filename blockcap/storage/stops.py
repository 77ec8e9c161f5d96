"""What stops a run's writes: a signal's stop request, and guards that forbid writing.

A SIGINT or SIGTERM raises KeyboardInterrupt where the main thread is, and is also remembered,
so that a raise swallowed on its way (by a finalizer, or a library's ``except``) still stops the
run at its next write (``check_stop``, called by ``Location`` before every mutation) or when the
command ends. Guards (a lease that may be lost) raise their own error before every write.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_STOPS: list[int] = []  # signals received
_GUARDS: list[Callable[[], None]] = []  # each raises when this process must not write any more
_DEPTH: list[int] = []  # nesting of stop_signals


def request_stop(signum: int) -> None:
    """Remember that a signal asked the process to stop (called by the SIGINT/SIGTERM handlers)."""
    _STOPS.append(signum)


def _on_signal(signum: int, frame: Any) -> None:
    request_stop(signum)
    raise KeyboardInterrupt


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop the process the same way: KeyboardInterrupt now, and the request
    remembered (``check_stop``) in case a finalizer or a library swallows that raise. The
    outermost use starts with no request pending. Outside the main thread it does nothing."""
    try:
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    if not _DEPTH:
        _STOPS.clear()
    _DEPTH.append(1)
    try:
        yield
    finally:
        _DEPTH.pop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_requested() -> bool:
    return bool(_STOPS)


def check_stop(finishing: bool = False) -> None:
    """Before a write: KeyboardInterrupt when a stop was requested (a stop is never lost to a
    swallowed raise), or the error of a guard that forbids writing (a lease lost). A write that
    is ``finishing`` work already done (the commit record of a unit whose objects are all in
    place) goes on after a stop request; a guard still forbids it."""
    if _STOPS and not finishing:
        raise KeyboardInterrupt
    for guard in list(_GUARDS):
        guard()


def add_guard(guard: Callable[[], None]) -> None:
    _GUARDS.append(guard)


def remove_guard(guard: Callable[[], None]) -> None:
    if guard in _GUARDS:
        _GUARDS.remove(guard)
