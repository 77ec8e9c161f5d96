"""The package version, from the installed distribution's metadata (pyproject's version)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("blockcap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
