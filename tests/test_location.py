"""Location's reads: ``get_each`` streams, holding a bounded number of objects, in key order."""

import threading
import uuid

from blockcap.storage.location import READ_AHEAD, Location


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
