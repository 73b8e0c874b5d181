"""Train the ViT on Fashion-MNIST: train on 55k, pick checkpoints on the last 5k of train, report test."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import CHECKPOINTS, load_checkpoint, save_checkpoint
from models.data import FASHION_LABELS, FASHION_VALID, fashion_mnist
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
from models.vit import ViT, ViTConfig

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train pixel statistics (after /255)
VALID = FASHION_VALID


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), as the service's preprocessing does."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))[:, None] / 255.0
    return (x - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (pad 2) and horizontal flip, on a normalised batch."""
    n = x.size(0)
    padded = F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()  # one offset per batch: cheap, still varied
    x = padded[:, :, dy : dy + 28, dx : dx + 28]
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_strong(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image random affine (rotate ±10°, scale 0.9–1.1, shift ±3 px), flip, and erasing of one box.

    Costs nothing on a GPU; on a CPU the per-batch ``augment`` is the cheaper choice.
    """
    n, background = x.size(0), -MEAN / STD
    r = torch.rand(n, 6, generator=gen).to(x.device)
    angle = (r[:, 0] - 0.5) * (2 * torch.pi / 18)
    scale = 0.9 + 0.2 * r[:, 1]
    flip = torch.where(r[:, 2] < 0.5, -1.0, 1.0)
    shift = (r[:, 3:5] - 0.5) * (6 / 14)  # affine_grid's coordinates span [-1, 1] over 28 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x - background, grid, align_corners=False) + background  # pad with background
    # erase one 8x8 box in half of the images (random erasing)
    ys, xs = torch.arange(28, device=x.device)[None, :, None], torch.arange(28, device=x.device)[None, None, :]
    cy, cx = (torch.rand(n, 2, generator=gen).to(x.device) * 28).long().unbind(1)
    box = ((ys - cy[:, None, None]).abs() < 4) & ((xs - cx[:, None, None]).abs() < 4) & (r[:, 5, None, None] < 0.5)
    return torch.where(box[:, None], torch.full_like(x, background), x)


@torch.no_grad()
def accuracy(model: ViT, images: np.ndarray, labels: np.ndarray, batch: int = 500, *, flip: bool = False) -> float:
    """``flip``: the mean class probabilities of each image and its mirror image (test-time augmentation)."""
    model.eval()
    correct, device = 0, next(model.parameters()).device
    for i in tqdm(range(0, len(images), batch), desc="classify", unit="batch", leave=False, disable=None):
        x = normalize(images[i : i + batch]).to(device)
        probs = model(x)[0].softmax(-1)
        if flip:
            probs = probs + model(x.flip(-1))[0].softmax(-1)
        correct += int((probs.argmax(-1).cpu().numpy() == labels[i : i + batch]).sum())
    return correct / len(images)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve train vit", description=__doc__)
    p.add_argument("--out", type=Path, default=CHECKPOINTS / "vit-fashion",
                   help="checkpoint folder written (default %(default)s)")
    p.add_argument("--state", type=Path, default=Path("runs/vit-fashion/state.pt"),
                   help="optimizer state for --resume (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=60.0, help="training-time budget (evaluation excluded)")
    p.add_argument("--epochs", type=int, default=100, help="upper bound on epochs")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=300, help="learning-rate warmup steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue from --state (or the --out weights)")
    p.add_argument("--tiny", action="store_true", help="tiny model and data, for tests")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--depth", type=int, default=6, help="transformer layers")
    p.add_argument("--mlp-dim", type=int, default=256, help="hidden width of each MLP")
    p.add_argument("--augment", choices=["crop", "strong"], default="crop", help="strong: per-image affine + erasing")
    p.add_argument("--ema", type=float, default=0.0, help="validate and save an EMA of the weights (e.g. 0.999)")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = pick_device(args.device)
    augment_batch = augment_strong if args.augment == "strong" else augment

    images, labels = fashion_mnist("train")
    train_x, train_y, valid_x, valid_y = images[:-VALID], labels[:-VALID], images[-VALID:], labels[-VALID:]
    cfg = ViTConfig(dim=args.dim, depth=args.depth, mlp_dim=args.mlp_dim)
    if args.tiny:
        train_x, train_y, valid_x, valid_y = train_x[:1024], train_y[:1024], valid_x[:256], valid_y[:256]
        cfg = ViTConfig(dim=32, depth=1, heads=2, mlp_dim=64)
    model = ViT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(train_x) // args.batch_size
    budget = Budget(args.lr, args.warmup, args.max_minutes, steps_per_epoch * args.epochs)
    best, history, epoch = -1.0, [], 0
    earlier: list[str] = []  # commands that trained these weights before this one
    state = load_state(args.state) if args.resume else None
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        budget.step, budget.elapsed_s = state["budget"]["step"], state["budget"]["elapsed_s"]
        budget.max_minutes = budget.elapsed_s / 60 + args.max_minutes
        best, history, epoch = state["best"], state["history"], state["epoch"]
        earlier = state.get("commands", [])
        print(f"resumed at epoch {epoch}, {budget.elapsed_s / 60:.1f} min trained, best valid acc {best}")
    elif args.resume and (args.out / "model.safetensors").exists():
        weights, meta = load_checkpoint(args.out)
        model.load_state_dict(weights.state_dict())
        cont = Continuation.read(meta, best=meta["valid"]["accuracy"])
        cont.apply(budget, args.max_minutes)
        best, history, earlier, epoch = cont.best, cont.history, cont.commands, int(meta["training"]["epochs"])
        print(f"continuing the weights in {args.out} (no optimizer state): epoch {epoch}, best valid acc {best}")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"vit: {n_params / 1e6:.2f} M params, {len(train_x)} train images, {steps_per_epoch} steps/epoch, {hardware()}"
    )
    command = "attnserve train vit " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    # an exponential moving average of the weights (BatchNorm statistics included) is what gets validated and saved
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True
        )
        if args.ema
        else None
    )
    kept = ema.module if ema is not None else model
    x_all, y_all = normalize(train_x).to(device), torch.as_tensor(train_y).to(device)
    wall0 = time.time()
    while epoch < args.epochs and not budget.done():
        model.train()
        perm = torch.randperm(len(train_x), generator=gen).to(device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", mininterval=30, file=sys.stdout)
        for s in bar:
            idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
            set_lr(opt, budget.tick())
            logits, _ = model(augment_batch(x_all[idx], gen))
            loss = F.cross_entropy(logits, y_all[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if budget.done():
                break
        epoch += 1
        budget.pause()
        acc = accuracy(kept, valid_x, valid_y)
        history.append(
            {
                "epoch": epoch,
                "step": budget.step,
                "train_minutes": round(budget.elapsed_s / 60, 1),
                "valid_accuracy": acc,
            }
        )
        print(json.dumps(history[-1]), flush=True)
        if acc > best:
            best = acc
            info = {
                "command": "`, then `".join([*earlier, command]),
                "params": n_params,
                "steps": budget.step,
                "epochs": epoch,
                "train_minutes": round(budget.elapsed_s / 60, 1),
                "hardware": hardware(),
                "seed": args.seed,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "augment": args.augment,
                "ema": args.ema,
                "history": history,
            }
            extra = {
                "training": info,
                "valid": {"accuracy": acc, "n": len(valid_x)},
                "labels": FASHION_LABELS,
                "preprocessing": {"size": [28, 28], "mode": "L", "scale": 1 / 255, "mean": MEAN, "std": STD},
            }
            save_checkpoint(kept, args.out, kind="vit", extra=extra)
        save_state(
            args.state,
            model,
            opt,
            budget,
            {"best": best, "history": history, "epoch": epoch, "commands": [*earlier, command]},
        )
        budget.resume()
    print(
        f"done: best valid accuracy {best:.4f}, {budget.elapsed_s / 60:.1f} training min, "
        f"{(time.time() - wall0) / 60:.1f} wall min"
    )


if __name__ == "__main__":
    main()
