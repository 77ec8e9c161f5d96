"""blockcap's exceptions for the user: the CLI turns them into one line and an exit code."""


class BlockcapError(Exception):
    """A user-facing problem: the message names the bad value and the fix."""


class Interrupted(BlockcapError):
    """The run was stopped by SIGINT/SIGTERM; the store is consistent and resumable."""
