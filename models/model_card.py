"""`attnserve model-card NAME`: measure a checkpoint on its test split and write MODEL_CARD.md.

Test metrics are written into config.json ("test") too, so export can carry them into the manifest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.checkpoint import CHECKPOINTS, load_checkpoint

DATA_TRANSLATOR = """English→Spanish pairs of Tatoeba via manythings.org/anki
(`../shared/data/spa-eng/spa.txt`, CC BY 2.0, attribution: www.manythings.org/anki and tatoeba.org),
split by the sha256 rule of `SPLIT.md`
(train 113,075 / valid 2,473 / test 2,307 pairs; a test checks the three split checksums). The BPE vocabulary
(`tokenizer.json`, `tokenizers` library, NFKC + Metaspace + punctuation split) was trained on the train split only."""
DATA_VIT = """Fashion-MNIST (Zalando SE, MIT; `../shared/data/fashion-mnist`).
Trained on the first 55,000 training images, checkpoints picked on the last 5,000 training images (valid),
reported on the 10,000 test images."""


def describe(meta: dict, n_params: int) -> str:
    c = meta["config"]
    if meta["kind"] == "translator":
        return (
            f"Pre-LN Transformer encoder–decoder: d={c['dim']}, {c['encoder_layers']}+{c['decoder_layers']} layers, "
            f"{c['heads']} heads, FFN {c['ffn_dim']}, shared {c['vocab_size']}-token BPE with tied embeddings, "
            f"learned positions; {n_params / 1e6:.2f} M parameters. Greedy decoding with a key/value cache."
        )
    return (
        f"Vision Transformer for 28×28 grayscale: {c['stem']} stem to a {c['image_size'] // c['patch_size']}×"
        f"{c['image_size'] // c['patch_size']} grid of tokens (each a 4×4 region), CLS token, learned positions, "
        f"d={c['dim']}, {c['depth']} layers, {c['heads']} heads, MLP {c['mlp_dim']}; {n_params / 1e6:.2f} M parameters."
    )


def measure(path: Path, model: torch.nn.Module, meta: dict) -> dict:
    if meta["kind"] == "translator":
        from tokenizers import Tokenizer

        from models.data import spa_eng_splits
        from models.train_translator import bleu_chrf

        return bleu_chrf(model, Tokenizer.from_file(str(path / "tokenizer.json")), spa_eng_splits()["test"])
    from models.data import fashion_mnist
    from models.train_vit import accuracy

    images, labels = fashion_mnist("test")
    return {"accuracy": round(accuracy(model, images, labels), 4), "n": len(images)}


def write_card(path: Path) -> dict:
    model, meta = load_checkpoint(path)
    n_params = sum(p.numel() for p in model.parameters())
    test = measure(path, model, meta)
    meta["test"] = test
    (path / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    t = meta["training"]
    if meta["kind"] == "translator":
        quality = (
            f"| split | BLEU | chrF | n |\n| --- | --- | --- | --- |\n"
            f"| valid (checkpoint pick) | {meta['valid']['bleu']} | {meta['valid']['chrf']} | {meta['valid']['n']} |\n"
            f"| **test** | **{test['bleu']}** | {test['chrf']} | {test['n']} |\n\n"
            "Greedy decoding, sacrebleu defaults (13a tokenizer), one reference per line. Reproduce with "
            "`attnserve data && attnserve eval translator --pairs data-cache/spa-eng-test.tsv`."
        )
        data = DATA_TRANSLATOR
    else:
        quality = (
            f"| split | accuracy | n |\n| --- | --- | --- |\n"
            f"| valid (checkpoint pick) | {meta['valid']['accuracy']:.4f} | {meta['valid']['n']} |\n"
            f"| **test** | **{test['accuracy']:.4f}** | {test['n']} |\n\n"
            "Reproduce with `attnserve data && attnserve eval vit --npz data-cache/fashion-test.npz`."
        )
        data = DATA_VIT
    history = "\n".join(f"| {json.dumps({k: v for k, v in h.items()})} |" for h in t.get("history", []))
    tok_note = ", `tokenizer.json`" if meta["kind"] == "translator" else ""
    note = f"\n- Note: {t['note']}" if t.get("note") else ""  # e.g. how the machine was shared
    size_mb = (path / "model.safetensors").stat().st_size / 1e6
    files = (f"`model.safetensors` (weights stored in fp16, {size_mb:.1f} MB, upcast to fp32 on load; no pickle),"
             " `config.json` (architecture, training details, metrics)")
    card = f"""# {path.name}

## Model
{describe(meta, n_params)}

## Data
{data}

## Quality (measured by `attnserve model-card {path.name}`)
{quality}

## Training
- Command: `{t["command"]}`
- Hardware: {t["hardware"]}
- Training time: {t["train_minutes"]} min ({t["steps"]} optimizer steps), seed {t["seed"]}{note}
- Files: {files}{tok_note}

Validation history:

| entry |
| --- |
{history}
"""
    (path / "MODEL_CARD.md").write_text(card)
    return test


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve model-card", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=["translator-en-es", "vit-fashion"], metavar="NAME",
                   help="checkpoints under --root (default: both)")
    p.add_argument("--root", type=Path, default=CHECKPOINTS, help="checkpoint folder (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.names:
        print(name, json.dumps(write_card(args.root / name)))


if __name__ == "__main__":
    main()
