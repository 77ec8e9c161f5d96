"""Concurrent fsyncs on kept threads: safe across fork, and a failure raised only once all finished."""

import errno
import os
import signal
import threading
import time

import pytest

from blockcap.storage import durable


def _files(tmp_path, names="abc"):
    paths = [tmp_path / n for n in names]
    for p in paths:
        p.write_bytes(b"x")
    return paths


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_mid_sync_syncs(tmp_path):
    """A child forked while another thread is inside ``fsync_all`` (here: holding its lock) makes
    its own threads and syncs, instead of waiting forever on a lock no thread of it will release."""
    paths = _files(tmp_path, "ab")
    durable.fsync_all(paths)  # the parent's threads exist
    inside, leave = threading.Event(), threading.Event()

    def holder():
        with durable._POOL_LOCK:
            inside.set()
            leave.wait()

    t = threading.Thread(target=holder)
    t.start()
    inside.wait()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        signal.alarm(10)
        durable.fsync_all(paths)
        os._exit(0)
    leave.set()
    t.join()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_failed_fsync_is_raised_after_the_others_finish(tmp_path, monkeypatch):
    """The first path fails at once, the others take a while: the error reaches the caller only
    after every fsync of the call has ended, so none runs on behind a failed sync."""
    paths = _files(tmp_path)
    finished, sync = [], durable.fsync_path

    def fsync(p):
        if p == paths[0]:
            raise OSError(errno.EIO, "injected")
        time.sleep(0.2)
        sync(p)
        finished.append(p)

    monkeypatch.setattr(durable, "fsync_path", fsync)
    with pytest.raises(OSError, match="injected"):
        durable.fsync_all(paths)
    assert sorted(finished) == sorted(paths[1:])
