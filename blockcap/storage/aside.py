"""Replacing a store without losing it: ``<out>.replaced`` holds the last complete store until the
run that replaces it completes; blockcap deletes only stores it recognises as its own."""

from __future__ import annotations

from typing import Any

from blockcap.core.errors import BlockcapError
from blockcap.storage.location import Location
from blockcap.storage.metadata import ROOT, put_root, read_meta

ASIDE = ".replaced"


# --- replacing and discarding ------------------------------------------------------------------------
def aside_of(location: Location) -> Location:
    return location.sibling(ASIDE)


def _ours(location: Location) -> dict[str, Any] | None:
    """The store's metadata if ``location`` holds a blockcap store, else None."""
    try:
        return read_meta(location)
    except BlockcapError:
        return None


def discard(location: Location) -> None:
    """Delete a store blockcap wrote (callers have checked that it is one)."""
    location.remove_tree()


def discard_aside(location: Location, run_id: str) -> None:
    """Delete ``<out>.replaced`` if the run ``run_id`` set it aside (it is then a finished replacement)."""
    aside = aside_of(location)
    meta = _ours(aside)
    if meta is not None and meta.get("replaced_by") == run_id:
        discard(aside)


def set_aside(location: Location, meta: dict[str, Any], run_id: str) -> None:
    """Keep the complete store at ``location`` as ``<out>.replaced`` until run ``run_id`` completes.

    Any older set-aside store is deleted first (the store being set aside is newer and complete).
    Local stores are renamed; object stores are copied (root last, so a partial copy is never
    mistaken for a store) and then deleted.
    """
    aside = aside_of(location)
    check_aside_is_ours(location)
    if not aside.is_empty():
        discard(aside)
    marked = {**meta, "replaced_by": run_id}
    put_root(location, marked)  # marked while still in place: a kill here leaves it usable
    if location.local:
        location.rename_to(aside)
        return
    location.copy_to(aside, [k for k in location.keys() if k != ROOT])  # noqa: SIM118 - a listing
    put_root(aside, marked)  # the root last: a partial copy is never taken for a store
    discard(location)


def restamp_aside(location: Location, run_id: str) -> None:
    """Hand the set-aside store to run ``run_id`` (which now replaces it) so it completes the job."""
    aside = aside_of(location)
    meta = _ours(aside)
    if meta is not None and meta.get("replaced_by") != run_id:
        put_root(aside, {**meta, "replaced_by": run_id})


def check_aside_is_ours(location: Location) -> None:
    aside = aside_of(location)
    if aside.is_file() or (not aside.is_empty() and (_ours(aside) or {}).get("replaced_by") is None):
        raise BlockcapError(
            f"{aside} is in the way and was not set aside by blockcap; move it, or choose another out=PATH"
        )
