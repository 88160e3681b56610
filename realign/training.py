"""One training loop for every method that updates weights (forgetting SFT and all recoveries).

Losses are plain functions `loss_fn(model, batch) -> scalar tensor`; constraints are parametrizations attached
to the model before the loop, so the loop itself never needs to know what kind of damage it works under.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from realign.data.sequences import collate
from realign.device import autocast, model_device, on_device

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int
    lr: float
    batch_size: int = 4
    grad_accum: int = 1
    schedule: str = "cosine"  # cosine | linear | constant, after `warmup_steps` of linear warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1 - progress
    return 1.0


def example_order(n_examples: int, n_needed: int, seed: int) -> list[int]:
    """Deterministic epochs of seeded permutations, long enough for `n_needed` draws."""
    if n_examples == 0:
        raise ValueError("no training examples")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_needed:
        order += torch.randperm(n_examples, generator=generator).tolist()
    return order[:n_needed]


def train(model, examples: list[dict], loss_fn, cfg: TrainConfig, pad_id: int, checkpoint_steps=(),
          on_checkpoint=None) -> list[dict]:
    """Run `cfg.steps` optimizer steps; returns the training curve [{step, loss, lr}].

    After each step in `checkpoint_steps`, `on_checkpoint(model, step, curve_so_far)` may save the model (the
    schedule is that of the whole run, so a checkpoint is the state of the full run at that step)."""
    bad = [s for s in checkpoint_steps if not 0 < s < cfg.steps]
    if bad:
        raise ValueError(f"checkpoint steps {bad} must lie strictly between 0 and the run's {cfg.steps} steps")
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    per_step = cfg.batch_size * cfg.grad_accum
    order = example_order(len(examples), cfg.steps * per_step, cfg.seed)
    curve = []
    device = model_device(model)
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", file=sys.stderr, mininterval=5, ascii=True)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            start = step * per_step + micro * cfg.batch_size
            batch = on_device(collate([examples[i] for i in order[start:start + cfg.batch_size]], pad_id), device)
            with autocast(device):
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged: loss is {loss.item()} at step {step} "
                                         f"(micro-batch {micro}); lower the learning rate (lr={cfg.lr})")
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"training diverged: gradient norm is {grad_norm.item()} at step {step}")
        optimizer.step()
        scheduler.step()
        curve.append({"step": step + 1, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{step_loss:.4f}")
        log.info("step %d/%d loss %.4f", step + 1, cfg.steps, step_loss)
        if step + 1 in checkpoint_steps and on_checkpoint is not None:
            model.eval()
            on_checkpoint(model, step + 1, list(curve))
            model.train()
    model.eval()
    return curve
