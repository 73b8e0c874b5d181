"""Pieces shared by both training loops: seeding, the time-budgeted schedule, resumable state."""

from __future__ import annotations

import math
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """ "auto" is the GPU when there is one. TF32 matmuls there: these models train in fp32 weights."""
    dev = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def hardware() -> str:
    dev = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return f"{dev}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


@dataclass
class Budget:
    """Linear warmup, then cosine decay over the training-time budget (minutes), or over ``total_steps``.

    A time budget lets the schedule reach its low learning rate however fast the machine is.
    """

    peak_lr: float
    warmup_steps: int
    max_minutes: float | None
    total_steps: int
    elapsed_s: float = 0.0  # training time so far, carried across resumes
    step: int = 0
    warmup_from: int = 0  # a continuation without optimizer state warms up again from this step
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def tick(self) -> float:
        """Count a step; return the learning rate for it."""
        self.step += 1
        now = time.monotonic()
        self.elapsed_s += now - self._t0
        self._t0 = now
        since = self.step - self.warmup_from
        if self.warmup_from == 0 and since <= self.warmup_steps:
            return self.peak_lr * since / self.warmup_steps
        lr = self.peak_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress()))))
        # fresh Adam moments: ramp up to the schedule rather than jump onto it
        return lr * min(1.0, since / max(1, self.warmup_steps))

    def pause(self) -> None:
        """Stop the clock (evaluation time does not count)."""
        self.elapsed_s += time.monotonic() - self._t0
        self._t0 = time.monotonic()

    def resume(self) -> None:
        self._t0 = time.monotonic()

    def progress(self) -> float:
        if self.max_minutes:
            return self.elapsed_s / (self.max_minutes * 60)
        return self.step / max(1, self.total_steps)

    def done(self) -> bool:
        return self.progress() >= 1.0


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, budget: Budget, extra: dict) -> None:
    """Full resumable state (optimizer included): git-ignored, under runs/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "budget": {"elapsed_s": budget.elapsed_s, "step": budget.step, "max_minutes": budget.max_minutes},
            "rng": torch.get_rng_state(),
            **extra,
        },
        tmp,
    )
    tmp.replace(path)


def load_state(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.exists() else None


@dataclass
class Continuation:
    """Where a committed checkpoint's training stopped (from its config.json), to train it further.

    Used when the optimizer state under runs/ is gone (a fresh clone): the weights and the record carry over,
    the schedule is extended by the new budget and warms up again, since the Adam moments start from zero.
    """

    commands: list[str]
    history: list[dict]
    best: float
    steps: int
    train_minutes: float

    @classmethod
    def read(cls, meta: dict, best: float) -> Continuation:
        t = meta["training"]
        return cls(
            t["command"].split("`, then `"),
            list(t.get("history", [])),
            best,
            int(t["steps"]),
            float(t["train_minutes"]),
        )

    def apply(self, budget: Budget, new_minutes: float) -> None:
        budget.step = budget.warmup_from = self.steps
        budget.elapsed_s = self.train_minutes * 60
        budget.max_minutes = self.train_minutes + new_minutes
