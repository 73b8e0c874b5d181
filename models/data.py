"""Readers for ../shared/data: the spa-eng split of SPLIT.md and Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
# From ../shared/data/spa-eng/SPLIT.md: sha256 of each split written as "english\tspanish\n" lines.
SPLIT_SHA256 = {
    "train": "96adb94bde0ed62f4f6ab49f4cc688e76e75408f7a24b8eeaf6092c9b698b3a5",
    "valid": "c23874126024d60099a326eb83ffcef2903c06400a341aed2740f3933984c38b",
    "test": "44ad4a209767e00fa73ccf0333886935af27e7f763489da98f8b3e221d51141d",
}
FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


FASHION_VALID = 5000  # the ViT's valid split: the last 5,000 Fashion-MNIST training images

def data_root() -> Path:
    """The shared data folder: $ATTNSERVE_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("ATTNSERVE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def split_of(english: str) -> str:
    bucket = int(hashlib.sha256(english.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < 2 else "valid" if bucket < 4 else "train"


def spa_eng_splits(path: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """All pairs of spa.txt split by SPLIT.md's rule, file order kept within each split."""
    path = path or data_root() / "spa-eng" / "spa.txt"
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            english, spanish = line.rstrip("\n").split("\t")
            splits[split_of(english)].append((english, spanish))
    return splits


def split_sha256(pairs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for en, es in pairs:
        h.update(f"{en}\t{es}\n".encode())
    return h.hexdigest()


def read_pairs_tsv(path: Path) -> list[tuple[str, str]]:
    """UTF-8 lines ``english<TAB>spanish``; blank lines are skipped."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise ValueError(f"{path}:{n}: expected 'english<TAB>spanish', got {line[:60]!r}")
            pairs.append((parts[0], parts[1]))
    return pairs


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain): uint8 images (N, rows, cols) or labels (N,)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """("train" | "test") -> (images uint8 (N, 28, 28), labels int64 (N,))."""
    root = root or data_root() / "fashion-mnist"
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels
