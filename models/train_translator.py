"""Train the English->Spanish translator on the SPLIT.md train split; pick checkpoints by valid BLEU."""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import sacrebleu
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from models.checkpoint import CHECKPOINTS, load_checkpoint, save_checkpoint
from models.data import spa_eng_splits
from models.tokenizer import train_tokenizer
from models.training import (
    Budget,
    Continuation,
    hardware,
    load_state,
    pick_device,
    save_state,
    seed_everything,
    set_lr,
)
from models.translator import BOS, EOS, PAD, Translator, TranslatorConfig, greedy_decode

MAX_LEN = 128


def encode_pairs(tok: Tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    src = tok.encode_batch([en for en, _ in pairs])
    tgt = tok.encode_batch([es for _, es in pairs])
    return [(s.ids[: MAX_LEN - 1] + [EOS], [BOS] + t.ids[: MAX_LEN - 2] + [EOS]) for s, t in zip(src, tgt, strict=True)]


def pad(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def token_batches(data: list, max_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length so that each batch holds about ``max_tokens`` real tokens."""
    order = list(range(len(data)))
    rng.shuffle(order)
    chunk = 100 * 64  # sort within large random chunks: little padding, still shuffled
    batches = []
    for c in range(0, len(order), chunk):
        idx = sorted(order[c : c + chunk], key=lambda i: (len(data[i][0]), len(data[i][1])))
        cur, n = [], 0
        for i in idx:
            cur.append(i)
            n += len(data[i][0]) + len(data[i][1])
            if n >= max_tokens:
                batches.append(cur)
                cur, n = [], 0
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def translate(model: Translator, tok: Tokenizer, texts: list[str], batch_size: int = 128) -> list[str]:
    """Greedy translations in input order (batches sorted by length for speed)."""
    ids = [e.ids[: MAX_LEN - 1] + [EOS] for e in tok.encode_batch(texts)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    device = next(model.parameters()).device
    # A bar on a terminal only (disable=None): eval and model-card run this over thousands of texts.
    for b in tqdm(range(0, len(order), batch_size), desc="translate", unit="batch", leave=False, disable=None):
        chunk = order[b : b + batch_size]
        hyps = greedy_decode(model, pad([ids[i] for i in chunk]).to(device), max_new_tokens=MAX_LEN)
        for i, h in zip(chunk, hyps, strict=True):
            out[i] = tok.decode(h)
    return out


def bleu_chrf(model: Translator, tok: Tokenizer, pairs: list[tuple[str, str]]) -> dict:
    hyps = translate(model, tok, [en for en, _ in pairs])
    refs = [[es for _, es in pairs]]
    return {
        "bleu": round(sacrebleu.corpus_bleu(hyps, refs).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hyps, refs).score, 2),
        "n": len(pairs),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve train translator", description=__doc__)
    p.add_argument("--out", type=Path, default=CHECKPOINTS / "translator-en-es",
                   help="checkpoint folder written (default %(default)s)")
    p.add_argument("--state", type=Path, default=Path("runs/translator-en-es/state.pt"),
                   help="optimizer state for --resume (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=60.0, help="training-time budget (evaluation excluded)")
    p.add_argument("--epochs", type=int, default=100, help="upper bound on epochs")
    p.add_argument("--eval-minutes", type=float, default=10.0, help="validate and checkpoint this often")
    p.add_argument("--max-tokens", type=int, default=3400, help="real tokens per batch")
    p.add_argument("--lr", type=float, default=7e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=400, help="learning-rate warmup steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue from --state (or the --out weights)")
    p.add_argument("--tiny", action="store_true", help="tiny model and data, for tests")
    p.add_argument("--dim", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=3, help="encoder layers, and as many decoder layers")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = pick_device(args.device)

    splits = spa_eng_splits()
    if args.tiny:
        splits = {"train": splits["train"][:2000], "valid": splits["valid"][:50], "test": splits["test"][:50]}
    args.out.mkdir(parents=True, exist_ok=True)
    tok_path = args.out / "tokenizer.json"
    if args.resume and tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer([x for pair in splits["train"] for x in pair], vocab_size=1000 if args.tiny else 8000)
        tok.save(str(tok_path))
    cfg = TranslatorConfig(
        vocab_size=tok.get_vocab_size(),
        dim=args.dim,
        ffn_dim=4 * args.dim,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
    )
    if args.tiny:
        cfg = TranslatorConfig(
            vocab_size=tok.get_vocab_size(), dim=32, heads=2, encoder_layers=1, decoder_layers=1, ffn_dim=64
        )
    model = Translator(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    train = encode_pairs(tok, splits["train"])
    steps_per_epoch = len(token_batches(train, args.max_tokens, random.Random(0)))
    budget = Budget(args.lr, args.warmup, args.max_minutes, steps_per_epoch * args.epochs)
    best, history, epoch = -1.0, [], 0
    command = "attnserve train translator " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    earlier: list[str] = []  # commands that trained these weights before this one
    state = load_state(args.state) if args.resume else None
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        budget.step, budget.elapsed_s = state["budget"]["step"], state["budget"]["elapsed_s"]
        budget.max_minutes = budget.elapsed_s / 60 + args.max_minutes  # the new budget is on top of the old
        best, history, epoch = state["best"], state["history"], state["epoch"]
        earlier = state.get("commands", [])
        print(f"resumed at step {budget.step}, {budget.elapsed_s / 60:.1f} min trained, best valid BLEU {best}")
    elif args.resume and (args.out / "model.safetensors").exists():
        weights, meta = load_checkpoint(args.out)
        model.load_state_dict(weights.state_dict())
        cont = Continuation.read(meta, best=meta["valid"]["bleu"])
        cont.apply(budget, args.max_minutes)
        best, history, earlier = cont.best, cont.history, cont.commands
        epoch = int(history[-1]["epoch"]) if history else 0
        print(f"continuing the weights in {args.out} (no optimizer state): {cont.steps} steps, best valid BLEU {best}")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"translator: {n_params / 1e6:.2f} M params, {len(train)} train pairs, "
        f"{steps_per_epoch} steps/epoch, {hardware()}"
    )

    wall0 = time.time()
    next_eval = budget.elapsed_s + args.eval_minutes * 60

    def evaluate_and_save() -> None:
        nonlocal best, next_eval
        budget.pause()
        metrics = bleu_chrf(model, tok, splits["valid"])
        history.append(
            {
                "epoch": round(epoch + frac, 2),
                "step": budget.step,
                "train_minutes": round(budget.elapsed_s / 60, 1),
                "valid": metrics,
            }
        )
        print(json.dumps(history[-1]), flush=True)
        if metrics["bleu"] > best:
            best = metrics["bleu"]
            save_checkpoint(model, args.out, kind="translator", extra={"training": training_info(), "valid": metrics})
        save_state(
            args.state,
            model,
            opt,
            budget,
            {"best": best, "history": history, "epoch": epoch, "commands": [*earlier, command]},
        )
        model.train()
        next_eval = budget.elapsed_s + args.eval_minutes * 60
        budget.resume()

    def training_info() -> dict:
        return {
            "command": "`, then `".join([*earlier, command]),
            "params": n_params,
            "steps": budget.step,
            "train_minutes": round(budget.elapsed_s / 60, 1),
            "hardware": hardware(),
            "seed": args.seed,
            "max_tokens": args.max_tokens,
            "lr": args.lr,
            "warmup": args.warmup,
            "label_smoothing": 0.1,
            "history": history,
        }

    frac = 0.0
    model.train()
    while epoch < args.epochs and not budget.done():
        batches = token_batches(train, args.max_tokens, random.Random(args.seed * 1000 + epoch))  # resumable order
        bar = tqdm(batches, desc=f"epoch {epoch + 1}", mininterval=30, file=sys.stdout)
        for bi, idx in enumerate(bar):
            src = pad([train[i][0] for i in idx]).to(device, non_blocking=True)
            tgt = pad([train[i][1] for i in idx]).to(device, non_blocking=True)
            set_lr(opt, budget.tick())
            loss = model.loss(src, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
            frac = bi / len(batches)
            if budget.elapsed_s >= next_eval or budget.done():
                evaluate_and_save()
            if budget.done():
                break
        else:
            epoch += 1
            frac = 0.0
    if not history or history[-1]["step"] != budget.step:
        evaluate_and_save()
    print(
        f"done: best valid BLEU {best}, {budget.elapsed_s / 60:.1f} training min, "
        f"{(time.time() - wall0) / 60:.1f} wall min"
    )


if __name__ == "__main__":
    main()
