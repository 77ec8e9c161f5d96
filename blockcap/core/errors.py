"""blockcap's exceptions for the user: the CLI turns them into one line and an exit code."""

from __future__ import annotations

from typing import Any


class BlockcapError(Exception):
    """A user-facing problem: the message names the bad value and the fix."""


class BadValue(BlockcapError):
    """One option's value is wrong, raised with its parts as data so that each caller words them:
    the library says ``name=value problem; fix``, the CLI turns ``name=`` into ``--name=``, and a
    damaged store's metadata is reported as ``name value problem`` (``fact``), with no advice and
    no ``name=`` for the CLI to take for an option. ``others``: further fields the problem names,
    as ``{field}`` placeholders in it."""

    def __init__(
        self, name: str, value: Any, problem: str, fix: str = "", others: dict[str, Any] | None = None
    ) -> None:
        self.name, self.value, self.problem, self.fix, self.others = name, value, problem, fix, others or {}
        super().__init__(f"{name}={value!r} {self._problem('=')}" + (f"; {fix}" if fix else ""))

    def _problem(self, sep: str) -> str:
        if not self.others:  # a problem without placeholders may hold braces of its own
            return self.problem
        return self.problem.format(**{k: f"{k}{sep}{v!r}" for k, v in self.others.items()})

    @property
    def fact(self) -> str:
        return f"{self.name} {self.value!r} {self._problem(' ')}"

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (a torchrun rank hands errors on)
        return type(self), (self.name, self.value, self.problem, self.fix, self.others)


class Interrupted(BlockcapError):
    """The run was stopped by SIGINT/SIGTERM; the store is consistent and resumable."""
