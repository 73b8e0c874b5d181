"""`attnserve eval translator|vit`: quality on a file, through the ONNX runtime when artifacts exist.

With artifacts (``--artifacts``, default ``artifacts/``) the process never imports torch; without them it
falls back to the PyTorch checkpoint, importing torch only in that branch. The last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from models.data import read_pairs_tsv

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "models" / "checkpoints"


def common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="artifact root (from attnserve export)")
    p.add_argument("--version", help="artifact version (default: the newest)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="which exported graph (default %(default)s)")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "onnx", "torch"], help="auto: onnx when artifacts exist"
    )
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINTS / name, help="for the torch fallback")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (ORT or torch)")


def pick_artifact(args: argparse.Namespace, name: str) -> Path | None:
    """The artifact folder to use, or None for the torch fallback."""
    from service.runtime import ArtifactError, find_artifact

    if args.backend == "torch":
        return None
    try:
        return find_artifact(args.artifacts, name, args.version)
    except ArtifactError as e:
        if args.backend == "onnx":
            raise SystemExit(str(e)) from e
        print(f"no ONNX artifact ({e}); falling back to torch on {args.checkpoint}", file=sys.stderr)
        return None


def note_staleness(artifact: Path, checkpoint: Path) -> None:
    from service.runtime.manifest import load_manifest, sha256_file

    m = load_manifest(artifact, verify=False)
    ck = checkpoint / "model.safetensors"
    stale = ck.exists() and sha256_file(ck) != m.source.get("sha256")
    print(
        f"onnx: {artifact} (checkpoint sha256 {str(m.source.get('sha256'))[:12]}"
        + (", differs from the current checkpoint: re-run `attnserve export`)" if stale else ")"),
        file=sys.stderr,
    )


def translator_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve eval translator", description=__doc__)
    p.add_argument("--pairs", type=Path, required=True, help="UTF-8 lines english<TAB>spanish")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--batch-size", type=int, default=64, help="decoder slots of the engine (ONNX) or batch (torch)")
    common(p, "translator-en-es")
    args = p.parse_args(argv)
    pairs = read_pairs_tsv(args.pairs)
    artifact = pick_artifact(args, "translator-en-es")
    if artifact is not None:
        from export.metrics import translate_all
        from service.runtime import TranslatorRuntime

        note_staleness(artifact, args.checkpoint)
        rt = TranslatorRuntime(artifact, precision=args.precision, intra_op_threads=args.threads)
        hyps = translate_all(rt, [en for en, _ in pairs], beam_size=args.beam, slots=args.batch_size)
        backend = f"onnx {args.precision} {rt.device}"
    else:
        hyps = torch_translate(args, [en for en, _ in pairs])
        backend = "torch fp32"
    from export.metrics import bleu_chrf

    print(f"backend: {backend}, beam {args.beam}", file=sys.stderr)
    print(json.dumps(bleu_chrf(hyps, [es for _, es in pairs])))


def torch_translate(args: argparse.Namespace, texts: list[str]) -> list[str]:
    """The fallback: greedy via the model's reference decoder, beam via the runtime's search on torch steps."""
    import torch
    from tokenizers import Tokenizer

    from models.checkpoint import load_checkpoint
    from models.train_translator import MAX_LEN, pad, translate
    from models.translator import BOS, EOS, PAD
    from service.runtime.decoding import beam_search

    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint)
    tok = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json"))
    if args.beam == 1:
        return translate(model, tok, texts, batch_size=args.batch_size)

    @torch.no_grad()
    def step(tokens, cross, mask, past):
        logits, present, _ = model.decode(
            *(torch.from_numpy(np.ascontiguousarray(a)) for a in (tokens, cross, mask, past))
        )
        return logits[:, -1].numpy(), present.numpy(), None

    out = []
    for b in range(0, len(texts), args.batch_size):
        src = pad([e.ids[: MAX_LEN - 1] + [EOS] for e in tok.encode_batch(texts[b : b + args.batch_size])])
        with torch.no_grad():
            cross = model.cross_kv(model.encode(src)[0]).numpy()
        hyps = beam_search(
            step, cross, (src != PAD).numpy(), bos=BOS, eos=EOS, max_new_tokens=MAX_LEN, beam_size=args.beam
        )
        out += [tok.decode(h.tokens) for h in hyps]
    return out


def vit_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve eval vit", description=__doc__)
    p.add_argument("--npz", type=Path, required=True, help="arrays `images` (uint8 N x 28 x 28) and `labels` (int)")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="flip: average each image's and its mirror image's class probabilities (2x compute; a "
                        "measurement: the service classifies the image as sent)")
    common(p, "vit-fashion")
    args = p.parse_args(argv)
    with np.load(args.npz) as f:
        images, labels = f["images"].astype(np.uint8), f["labels"].astype(np.int64)
    artifact = pick_artifact(args, "vit-fashion")
    if artifact is not None:
        from export.metrics import vit_accuracy
        from service.runtime import ClassifierRuntime

        note_staleness(artifact, args.checkpoint)
        rt = ClassifierRuntime(artifact, precision=args.precision, intra_op_threads=args.threads)
        result = vit_accuracy(rt, images, labels, flip=args.tta == "flip")
        print(f"backend: onnx {args.precision} {rt.device}", file=sys.stderr)
    else:
        import torch

        from models.checkpoint import load_checkpoint
        from models.train_vit import accuracy

        torch.set_num_threads(args.threads)
        model, _ = load_checkpoint(args.checkpoint)
        result = {"accuracy": round(accuracy(model, images, labels, flip=args.tta == "flip"), 4), "n": int(len(images))}
        print("backend: torch fp32", file=sys.stderr)
    print(json.dumps(result))
