import gzip
import struct

import numpy as np

from models.data import SPLIT_SHA256, fashion_mnist, read_idx, spa_eng_splits, split_sha256


def test_spa_eng_split_matches_split_md(shared_data):
    splits = spa_eng_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 113075, "valid": 2473, "test": 2307}
    for name, pairs in splits.items():
        assert split_sha256(pairs) == SPLIT_SHA256[name], name
    assert splits["valid"][:2] == [("I'm up.", "Estoy levantado."), ("Who won?", "¿Quién ganó?")]
    assert splits["test"][0] == ("Hi.", "Hola.")


def test_fashion_mnist_reader(shared_data):
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 2, 3, 4) + arr.tobytes())
    np.testing.assert_array_equal(read_idx(path), arr)
