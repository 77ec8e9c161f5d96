"""The one exception type blockcap raises for bad input; the CLI turns it into a one-line error."""


class BlockcapError(Exception):
    """A user-facing problem: the message names the bad value and the fix."""
