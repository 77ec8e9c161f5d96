"""blockcap's exceptions for the user: the CLI turns them into one line and an exit code."""

from __future__ import annotations

from typing import Any


class BlockcapError(Exception):
    """A user-facing problem: the message names the bad value and the fix."""


class BadValue(BlockcapError):
    """One option's value is wrong, raised with its parts as data so that each caller words them:
    the library says ``name=value problem; fix``, the CLI turns ``name=`` into ``--name=``, and a
    damaged store's metadata is reported as ``name value problem`` (``fact``), with no advice."""

    def __init__(self, name: str, value: Any, problem: str, fix: str = "") -> None:
        self.name, self.value, self.problem, self.fix = name, value, problem, fix
        super().__init__(f"{name}={value!r} {problem}" + (f"; {fix}" if fix else ""))

    @property
    def fact(self) -> str:
        return f"{self.name} {self.value!r} {self.problem}"


class Interrupted(BlockcapError):
    """The run was stopped by SIGINT/SIGTERM; the store is consistent and resumable."""
