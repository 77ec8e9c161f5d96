"""Dataset resolution, hashing, tokenizer, split and windows, all offline."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from blockcap.core.errors import BlockcapError
from blockcap.data import sources as data
from blockcap.data.corpus import open_corpus
from blockcap.data.digest import sha256_file
from blockcap.data.inputs import list_inputs
from blockcap.data.sources import resolve_dataset
from blockcap.data.tokenizers import CharTokenizer
from blockcap.data.windows import Windows, split_tokens, window_count


def test_tokenizer_round_trip_and_order():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.vocab == "\n dehlorw"
    assert tok.decode(tok.encode("world hello")) == "world hello"


def test_unknown_character_is_named():
    with pytest.raises(BlockcapError, match="'Z' is not in the model's vocabulary"):
        CharTokenizer("abc").encode("abZ")
    with pytest.raises(BlockcapError, match="2 characters not in"):
        CharTokenizer("abc").check_covers("abxy", "dataset d")


def test_split_boundary_is_the_originals():
    d = np.arange(1000)
    n = int(0.9 * 1000)
    assert np.array_equal(split_tokens(d, "train"), d[:n])
    assert np.array_equal(split_tokens(d, "val"), d[n:])
    assert np.array_equal(split_tokens(d, "all"), d)


@pytest.mark.parametrize("n, sample_len, stride", [(111540, 3, 96), (1000, 256, 256), (10, 3, 1), (5, 7, 1)])
def test_windows_equal_a_direct_unfold(n, sample_len, stride):
    tokens = torch.randint(0, 65, (n,))
    w = Windows(tokens.numpy().astype(np.uint8), sample_len, stride)
    direct = tokens.unfold(0, sample_len, stride) if n >= sample_len else torch.empty(0, sample_len)
    assert len(w) == window_count(n, sample_len, stride) == direct.shape[0]
    if len(w):
        assert torch.equal(w.get(0, len(w)), direct)
        lo, hi = len(w) // 3, len(w) // 3 + max(1, len(w) // 4)
        assert torch.equal(w.get(lo, hi), direct[lo:hi])
        assert np.array_equal(w.offsets(lo, hi), np.arange(lo, hi) * stride)


def test_original_settings_give_1162_windows():
    assert window_count(1115394 - int(0.9 * 1115394), 3, 96) == 1162


def test_explicit_path_and_environment(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("abc")
    assert resolve_dataset(f) == str(f)
    monkeypatch.setenv(data.DATASET_ENV, str(f))
    assert resolve_dataset() == str(f)
    with pytest.raises(BlockcapError, match="does not exist"):
        list_inputs(resolve_dataset(tmp_path / "missing.txt"))


def test_explicit_hash_is_checked(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abc")
    good = hashlib.sha256(b"abc").hexdigest()
    tokenizer, cache = CharTokenizer("abc"), str(tmp_path / "tokens")
    assert open_corpus(str(f), tokenizer, sha256=good, token_cache=cache).sha256 == good
    with pytest.raises(BlockcapError, match="expected 00"):
        open_corpus(str(f), tokenizer, sha256="00" * 32, token_cache=cache)


def test_download_to_cache_verifies_hash(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATASET_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "upstream.txt"
    src.write_text("to be or not to be")
    url = src.as_uri()  # a local file:// URL: no network in tests
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(BlockcapError, match="pass the right file as dataset=PATH"):
        resolve_dataset(url=url)  # TinyShakespeare's hash: mismatch, nothing cached
    assert not (tmp_path / "cache" / "blockcap" / "tinyshakespeare.txt").exists()
    path = Path(resolve_dataset(url=url, sha256=good))
    assert path == tmp_path / "cache" / "blockcap" / "tinyshakespeare.txt"
    assert path.read_text() == "to be or not to be"
    assert not list(path.parent.glob("*.part"))  # no partial files left behind


def test_corrupted_cache_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATASET_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "blockcap").mkdir()
    (tmp_path / "blockcap" / "tinyshakespeare.txt").write_text("truncated")
    with pytest.raises(BlockcapError, match="delete it, or pass the right file"):
        resolve_dataset()


def test_failed_download_says_how_to_pass_a_path(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATASET_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(BlockcapError, match="could not download .*dataset=PATH"):
        resolve_dataset(url=(tmp_path / "nowhere.txt").as_uri())


def test_empty_and_binary_datasets(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(BlockcapError, match="is empty"):
        data.read_text(tmp_path / "e.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BlockcapError, match="not UTF-8"):
        data.read_text(tmp_path / "b.txt")


def test_real_text_hash(real_dataset):
    assert sha256_file(real_dataset) == data.TINYSHAKESPEARE_SHA256
