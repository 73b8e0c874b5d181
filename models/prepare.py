"""`attnserve data`: write the evaluation inputs the eval commands take, from ../shared/data.

spa-eng splits as ``english<TAB>spanish`` TSV files, and the Fashion-MNIST test set and the ViT's valid split
as .npz files with ``images`` (uint8 N x 28 x 28) and ``labels``. Output is git-ignored (data is never committed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.data import FASHION_VALID, fashion_mnist, spa_eng_splits


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data-cache"), help="folder written (default %(default)s)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, pairs in spa_eng_splits().items():
        path = args.out / f"spa-eng-{name}.tsv"
        path.write_text("".join(f"{en}\t{es}\n" for en, es in pairs), encoding="utf-8")
        print(f"{path}: {len(pairs)} pairs")
    train_images, train_labels = fashion_mnist("train")
    splits = {"valid": (train_images[-FASHION_VALID:], train_labels[-FASHION_VALID:]), "test": fashion_mnist("test")}
    for name, (images, labels) in splits.items():
        path = args.out / f"fashion-{name}.npz"
        np.savez_compressed(path, images=images, labels=labels)
        print(f"{path}: {len(images)} images")


if __name__ == "__main__":
    main()
