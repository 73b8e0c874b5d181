"""`attnserve export`: committed checkpoints -> verified ONNX artifacts under artifacts/<model>/<version>/."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.checkpoint import CHECKPOINTS

MODELS = ("translator-en-es", "vit-fashion")
REPO = Path(__file__).resolve().parents[1]


def parse_precisions(value: str) -> tuple[str, ...]:
    asked = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in asked if p not in ("fp32", "fp16", "int8")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {bad}; choose from fp32, fp16, int8")
    return tuple(dict.fromkeys(["fp32", *asked]))  # fp32 is always built: it is the parity reference


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve export", description=__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="checkpoint names under models/checkpoints/")
    p.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="folder holding the checkpoints")
    p.add_argument("--out", type=Path, default=REPO / "artifacts", help="artifact root written (default %(default)s)")
    p.add_argument(
        "--precision",
        type=parse_precisions,
        default=("fp32", "int8"),
        help="comma-separated: fp32 (always), int8 (CPU), fp16 (GPU); default fp32,int8",
    )
    p.add_argument("--version", help="artifact version (default: first 12 hex of the checkpoint's sha256)")
    p.add_argument("--force", action="store_true", help="rebuild even when an up-to-date artifact exists")
    p.add_argument("--greedy-sentences", type=int, default=200, help="test sentences for greedy-token parity")
    p.add_argument("--quality-limit", type=int, help="test examples for precision quality (default: whole split)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-gates", action="store_true",
                   help="install even when int8/fp16 lose more quality than export/gates.py allows (untrained models)")
    args = p.parse_args(argv)

    import torch  # after argparse: `--help` stays instant

    from export.build import ExportOptions, export_checkpoint
    from export.gates import QualityGateError
    from export.parity import ParityError

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = ExportOptions(
        out=args.out,
        precisions=args.precision,
        version=args.version,
        force=args.force,
        greedy_sentences=args.greedy_sentences,
        quality_limit=args.quality_limit,
        gates=not args.no_gates,
    )
    for name in args.models:
        ckpt = args.checkpoints / name
        if not (ckpt / "model.safetensors").exists():
            raise SystemExit(f"no checkpoint at {ckpt} (train it with `attnserve train ...`)")
        print(f"export {name} -> {args.out / name}", flush=True)
        try:
            export_checkpoint(ckpt, opts)
        except (ParityError, QualityGateError) as e:  # nothing was installed; say why without a traceback
            raise SystemExit(f"attnserve export: {type(e).__name__}: {e}") from None
