"""Location's reads: ``get_each`` streams, holding a bounded number of objects, in key order; a
reader racing a store's creation."""

import threading
import uuid

import pytest

from blockcap.core.errors import BlockcapError
from blockcap.storage.location import READ_AHEAD, Location
from blockcap.storage.metadata import read_meta


def test_get_each_reads_ahead_a_bounded_number_in_order(monkeypatch):
    location = Location(f"memory://get-each-{uuid.uuid4().hex}/s.zarr")
    keys = [f"a/c/{i}" for i in range(10 * READ_AHEAD)]
    for i, key in enumerate(keys):
        location.put(key, i.to_bytes(4, "little"))
    read, lock, get = [0], threading.Lock(), location.get

    def counting(key):
        with lock:
            read[0] += 1
        return get(key)

    monkeypatch.setattr(location, "get", counting)
    consumed = 0
    for i, data in enumerate(location.get_each([*keys, "a/c/missing"])):
        assert data == (i.to_bytes(4, "little") if i < len(keys) else None)
        consumed += 1
        assert read[0] <= consumed + READ_AHEAD  # never the whole array in flight
    assert consumed == len(keys) + 1


def test_a_store_directory_appearing_while_a_reader_lists_is_being_created(tmp_path, monkeypatch):
    """A new store's directory appears by a rename, whole; one that was not there when the reader
    listed it and is there now was just created, not an empty directory left in the way."""
    loc = Location(str(tmp_path / "s.zarr"))
    keys = Location.keys

    def listed_then_renamed(self, prefix=""):
        found = keys(self, prefix)
        (tmp_path / "s.zarr").mkdir(exist_ok=True)  # the rename lands just after the listing
        return found

    monkeypatch.setattr(Location, "keys", listed_then_renamed)
    with pytest.raises(BlockcapError, match="is being created"):
        read_meta(loc)
    with pytest.raises(BlockcapError, match="is an empty directory"):  # there before the listing: empty
        read_meta(loc)
