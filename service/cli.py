"""The `attnserve` command. Each subcommand lives in the layer it belongs to and parses its own flags.

This is the one place that names every layer; it imports a subcommand's module only when that
subcommand runs, so `attnserve serve` never loads torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train", "translator"): ("models.train_translator:main", "train the English->Spanish translator"),
    ("train", "vit"): ("models.train_vit:main", "train the Fashion-MNIST ViT"),
    ("data",): ("models.prepare:main", "write eval inputs (split TSVs, test .npz) to data-cache/"),
    ("model-card",): ("models.model_card:main", "measure checkpoints on test, write MODEL_CARD.md"),
    ("eval", "translator"): ("export.evaluate:translator_main", "BLEU/chrF of the translator on a TSV file"),
    ("eval", "vit"): ("export.evaluate:vit_main", "accuracy of the ViT on an .npz file"),
    ("export",): ("export.cli:main", "checkpoints -> verified ONNX artifacts"),
    ("serve",): ("service.launch.local:main", "start Ray and the Serve app, print URLs"),
    ("translate",): ("service.client:translate_main", "translate with a running server (--attention, --png)"),
    ("classify",): ("service.client:classify_main", "classify images with a running server (--png)"),
    # Benchmarks: programs that print tables, in bench/ (not part of the serving image).
    ("bench", "runtime"): ("bench.runtime:main", "the serving engine vs CTranslate2 (same weights, threads)"),
    ("bench", "http"): ("bench.http:main", "the HTTP service vs a single-process baseline"),
    ("bench", "engine"): ("bench.engine:main", "continuous-batching engine vs request-level batching"),
    ("bench", "explain"): ("bench.explain:main", "ViT attention maps vs random order: deletion/insertion curves"),
    ("bench", "soak"): ("bench.soak:main", "steady load at ~70% of capacity for N minutes: errors, latency, RSS"),
    ("bench", "cost"): ("bench.cost:main", "CPU per request in each process of the serving path vs the baseline"),
    ("bench", "step"): ("bench.step:main", "the decoder step graph alone per precision: CPU ms per step, tokens/CPU-s"),
}


def usage() -> str:
    rows = [f"  attnserve {' '.join(k):<18} {help_}" for k, (_, help_) in COMMANDS.items()]
    return "usage: attnserve COMMAND [--help] | --version\n\ncommands:\n" + "\n".join(rows)


def version() -> str:
    """The installed package's version (pyproject.toml), from its metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("attnserve")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"attnserve {version()}")
        return
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            module, func = COMMANDS[key][0].split(":")
            sys.argv = [f"attnserve {' '.join(key)}", *argv[n:]]
            getattr(importlib.import_module(module), func)(argv[n:])
            return
    print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)


if __name__ == "__main__":
    main()
