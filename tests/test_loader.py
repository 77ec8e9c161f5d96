"""The training loader: every committed vector exactly once per epoch, reproducibly shuffled."""

import importlib
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from blockcap.core.errors import BlockcapError
from tests.conftest import small_store

L = importlib.import_module(
    "blockcap.analysis.loader"
)  # the module, whatever ``blockcap.analysis.loader`` is bound to


@pytest.fixture(scope="module")
def store(ckpt, text_file, tmp_path_factory):
    return small_store(ckpt, text_file, tmp_path_factory.mktemp("l") / "s.zarr")


@pytest.fixture(autouse=True)
def one_chunk_units(monkeypatch):
    """Units of one chunk (4 windows), so the tiny store has many units to order and split."""
    monkeypatch.setattr(L, "READ_BYTES", 1)


def epoch(ds, workers=0):
    """Every batch of one epoch, through a DataLoader as training code would use it."""
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def expected(store, positions=None):
    committed = store.committed_windows()
    cols = (
        np.arange(store.sample_len)
        if positions is None
        else np.unique(np.asarray(positions) % store.sample_len)
    )
    return [(w, p) for w in np.flatnonzero(committed) for p in cols]


def check_epoch(store, batches, positions=None, site="ffwd_output"):
    """Each committed (window, position) exactly once, with its stored vector and token."""
    where = torch.cat([b[2] for b in batches]).numpy()
    assert sorted(map(tuple, where.tolist())) == sorted(expected(store, positions))
    x = store.site(site).np[:]
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), x[where[:, 0], where[:, 1]])
    tokens = store.tokens.np[:]
    np.testing.assert_array_equal(
        torch.cat([b[1] for b in batches]).numpy(), tokens[where[:, 0], where[:, 1]]
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_vector_once(store, workers, shuffle):
    ds = L.loader(store, batch_size=50, shuffle=shuffle, buffer_mb=0.01, with_ids=True)
    batches = epoch(ds, workers)
    check_epoch(store, batches)
    assert ds.n_vectors == store.n_windows * store.sample_len
    assert sum(len(b[0]) != 50 for b in batches) <= max(1, workers)  # a short last batch per worker


def test_unshuffled_is_the_store_in_order(store):
    got = torch.cat(epoch(L.loader(store, "heads_output", batch_size=64, shuffle=False)))
    np.testing.assert_array_equal(got.numpy(), store.site("heads_output").np[:].reshape(-1, 32))


def test_incomplete_store_and_positions(ckpt, text_file, tmp_path):
    s = small_store(ckpt, text_file, tmp_path / "p.zarr", part="1/2")
    assert 0 < s.committed_windows().sum() < s.n_windows
    for workers in (0, 2):
        batches = epoch(L.loader(s, batch_size=7, positions=[-1, 2], with_ids=True), workers)
        check_epoch(s, batches, positions=[-1, 2])


def test_rows_decoded_ahead_are_never_evicted_unwritten(store, monkeypatch):
    """Units alternate between decoding into the buffer and being mixed in, reads are slow: every
    vector still comes out once (a buffer row is evicted only once its decoding has finished)."""
    whole, read = L.ActivationLoader._whole, L.ActivationLoader._read

    def slow_read(self, lo, into=None):
        time.sleep(0.01)
        return read(self, lo, into)

    monkeypatch.setattr(
        L.ActivationLoader, "_whole", lambda self, lo: (lo // self.unit) % 3 != 1 and whole(self, lo)
    )
    monkeypatch.setattr(L.ActivationLoader, "_read", slow_read)
    check_epoch(store, epoch(L.loader(store, batch_size=50, buffer_mb=0.05, with_ids=True)))


def test_the_buffer_is_kept_between_epochs_and_never_shared(store):
    """An epoch reuses the last one's shuffle buffer (its page faults are paid once) and yields what
    a fresh loader yields; an iteration running beside another makes its own buffer, and at most
    one buffer is kept."""

    def where(batches):
        return torch.cat([b[2] for b in batches]).tolist()

    ds = L.loader(store, batch_size=32, buffer_mb=0.02, with_ids=True)
    first = list(ds)
    check_epoch(store, first)
    buffer = ds._kept[0]
    ds.set_epoch(1)
    again = list(ds)
    assert ds._kept[0] is buffer  # the same arrays, not a new allocation
    fresh = L.loader(store, batch_size=32, buffer_mb=0.02, with_ids=True)
    fresh.set_epoch(1)
    assert where(again) == where(list(fresh))
    check_epoch(store, again)

    half = iter(ds)
    for _ in range(3):
        next(half)
    beside = list(ds)  # runs while ``half`` holds the buffer: gets a new one
    assert ds._kept[0] is not buffer
    kept = ds._kept[0]
    check_epoch(store, beside)
    half.close()  # its buffer is not kept: one is already
    assert len(ds._kept) == 1 and ds._kept[0] is kept
    assert where(list(ds)) == where(beside)


def test_dedup_store(ckpt, text_file, tmp_path):
    s = small_store(
        ckpt, text_file, tmp_path / "d.zarr", dedup=True, sample_len=4, stride=2, chunk_windows=32
    )
    check_epoch(s, epoch(L.loader(s, batch_size=100, with_ids=True), 2))


def test_reproducible_per_seed_epoch_and_workers(store):
    def order(seed=0, e=0, workers=0):
        ds = L.loader(store, batch_size=32, seed=seed, buffer_mb=0.02, with_ids=True)
        ds.set_epoch(e)
        return torch.cat([b[2] for b in epoch(ds, workers)]).tolist()

    first = order()
    assert order() == first and order(workers=2) == order(workers=2)
    for other in (order(seed=1), order(e=1), order(workers=2)):
        assert other != first and sorted(other) == sorted(first)
    ds = L.loader(store, batch_size=32, buffer_mb=0.02, with_ids=True)
    persistent = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    assert torch.cat([b[2] for b in persistent]).tolist() == order(workers=2)
    ds.set_epoch(1)  # reaches the running workers
    assert torch.cat([b[2] for b in persistent]).tolist() == order(e=1, workers=2)


def test_buffer_mixes_units(store):
    """With no buffer a batch holds one unit's windows; a buffer of the whole store mixes them all."""

    def units_per_batch(mb):
        batches = epoch(L.loader(store, batch_size=32, buffer_mb=mb, with_ids=True))
        return [len(np.unique(b[2][:, 0].numpy() // 4)) for b in batches]

    assert max(units_per_batch(0)) <= 2
    assert np.mean(units_per_batch(1)) > 10


def test_normalize_with_the_stats(store):
    x = torch.cat(epoch(L.loader(store, normalize="stats", batch_size=100)))
    np.testing.assert_allclose(x.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    raw = torch.cat(epoch(L.loader(store, batch_size=100, shuffle=False)))
    st = store.stats("ffwd_output")
    want = (raw.numpy() - st.mean) / st.std
    got = torch.cat(epoch(L.loader(store, batch_size=100, shuffle=False, normalize="stats")))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_drop_last_and_bfloat16(ckpt, text_file, tmp_path):
    s = small_store(ckpt, text_file, tmp_path / "b.zarr", dtype="bfloat16")
    batches = epoch(L.loader(s, batch_size=64, drop_last=True, with_ids=True), 2)
    assert all(b[0].shape == (64, 32) and b[0].dtype == torch.float32 for b in batches)
    units = range(0, s.n_windows, 4)
    per_worker = [sum(min(4, s.n_windows - u) * 8 for u in units if u // 4 % 2 == w) for w in (0, 1)]
    assert len(batches) == sum(n // 64 for n in per_worker)  # each worker drops its short batch
    where = torch.cat([b[2] for b in batches])
    want = s.site("ffwd_output")[:].float()[where[:, 0], where[:, 1]]
    assert torch.equal(torch.cat([b[0] for b in batches]), want)


BAD = [
    (dict(site="attention"), "site 'attention' was not captured"),
    (dict(site="nope"), "site 'nope' was not captured"),
    (dict(block=3), "block 3 was not captured"),
    (dict(batch_size=0), "batch_size=0 is out of range"),
    (dict(shuffle="yes"), "shuffle='yes' is not True or False"),
    (dict(seed=-1), "seed=-1 is not an integer 0 or more"),
    (dict(positions=8), r"positions=8 is not a position or list of positions in -8..7"),
    (dict(positions=[0, 1.5]), r"positions=\[0, 1.5\] is not a position"),
    (dict(positions=[]), r"positions=\[\] is not a position"),
    (dict(positions="last"), "positions='last' is not a position"),
    (dict(normalize="z"), "normalize='z' is unknown; use None or 'stats'"),
    (dict(buffer_mb=-1), "buffer_mb=-1 is not a size in MB"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_one_line(store, change, message):
    with pytest.raises(BlockcapError, match=message) as e:
        L.loader(store, **change)
    assert "\n" not in str(e.value)


def test_bad_epoch_and_no_stats(ckpt, text_file, tmp_path, store):
    with pytest.raises(BlockcapError, match="epoch=-1 is not an integer"):
        L.loader(store).set_epoch(-1)
    s = small_store(ckpt, text_file, tmp_path / "n.zarr", stats=False)
    with pytest.raises(BlockcapError, match="has no statistics for block0/ffwd_output"):
        L.loader(s, normalize="stats")


@pytest.mark.slow
def test_spawned_workers_reopen_the_store(store):
    """Under spawn the dataset is pickled: workers reopen the store and share the epoch."""
    ds = L.loader(store, batch_size=100, with_ids=True)
    ds.set_epoch(3)
    spawned = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert torch.cat([b[2] for b in spawned]).tolist() == torch.cat([b[2] for b in epoch(ds, 2)]).tolist()
