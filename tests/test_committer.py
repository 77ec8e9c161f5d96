"""The group committer: a record is written only after a sync that covers what was put before it."""

import signal
import threading
import time

import pytest

from blockcap.storage.committer import Committer


class FakeLocation:
    """Records sync and put calls; the first sync waits for ``release`` (a slow disk)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()
        self.syncing = threading.Event()
        self.fail = fail

    def sync(self) -> None:
        self.syncing.set()
        self.release.wait(10)
        if self.fail:
            raise OSError(28, "No space left on device")
        self.calls.append("sync")

    def put(self, key: str, data: bytes, finishing: bool = False) -> None:
        self.calls.append(key)


def test_records_wait_for_a_sync_and_waiting_ones_share_the_next():
    loc, errors = FakeLocation(), []
    c = Committer(loc, 8, errors.append)  # type: ignore[arg-type]  # only sync and put are used
    c.submit("r1", b"1")
    assert loc.syncing.wait(10)  # r1's sync is under way: r2 and r3 arrive while it waits
    c.submit("r2", b"2")
    c.submit("r3", b"3")
    loc.release.set()
    c.close()
    assert loc.calls == ["sync", "r1", "sync", "r2", "r3"] and errors == []


def test_a_failed_sync_writes_no_record_then_or_after():
    loc, errors = FakeLocation(fail=True), []
    c = Committer(loc, 8, errors.append)  # type: ignore[arg-type]
    c.submit("r1", b"1")
    assert loc.syncing.wait(10)
    c.submit("r2", b"2")
    loc.release.set()
    c.close()
    assert loc.calls == [] and len(errors) == 1 and isinstance(errors[0], OSError)


@pytest.mark.parametrize("limit", [1, 3])
def test_at_most_limit_records_wait(limit):
    loc = FakeLocation()
    c = Committer(loc, limit, lambda e: None)  # type: ignore[arg-type]
    c.submit("r0", b"0")
    assert loc.syncing.wait(10)  # r0 is taken: its room is freed once it is written
    done = threading.Event()

    def submit_more() -> None:
        for i in range(1, limit + 2):
            c.submit(f"r{i}", b"")
        done.set()

    t = threading.Thread(target=submit_more)
    t.start()
    assert not done.wait(0.3)  # r0 in its sync and `limit` - 1 waiting fill the room: the last one waits
    loc.release.set()
    assert done.wait(10)
    t.join()
    c.close()
    records = [k for k in loc.calls if k != "sync"]
    assert loc.calls[0] == "sync" and records == [f"r{i}" for i in range(limit + 2)]


def test_a_stop_keeps_every_whole_unit_committed(run_args, monkeypatch):
    """Ctrl-C while units wait for the committer (a slow disk): each unit whose objects are all in
    place still gets its record, so a resume redoes only what was not written (before, every
    waiting unit, up to 16, lost its record)."""
    from pathlib import Path

    import blockcap
    from blockcap.core.layout import object_keys
    from blockcap.storage import location, stops
    from blockcap.storage.metadata import layout_of, read_meta

    sync, objects = location.Location.sync, [0]

    def slow_sync(self):
        time.sleep(0.2)
        sync(self)

    def stop_after_objects(op, key):
        if op == "put" and "/c/" in key and not key.startswith("committed/"):
            objects[0] += 1
            if objects[0] == 40:
                stops.request_stop(signal.SIGINT)

    monkeypatch.setattr(location.Location, "sync", slow_sync)
    monkeypatch.setattr(location, "WRITE_HOOKS", [*location.WRITE_HOOKS, stop_after_objects])
    args = {**run_args, "stride": 1, "chunk_windows": 4, "batch_size": 4, "writers": 1}
    try:
        with pytest.raises((KeyboardInterrupt, blockcap.BlockcapError)):
            blockcap.run(**args)
    finally:
        stops._STOPS.clear()
    store = Path(args["out"])
    layout = layout_of(read_meta(location.Location(str(store))))
    whole = [
        u for u in range(layout.n_units)
        if all((store / k).exists() for a in layout.unit_arrays() for k in object_keys(a, u))
    ]  # fmt: skip
    assert len(whole) >= 3
    assert [u for u in whole if not (store / f"committed/c/{u}/0").exists()] == []
