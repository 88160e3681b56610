"""One training loop for every method that updates weights (forgetting SFT and all recoveries).

Losses are plain functions `loss_fn(model, batch) -> scalar tensor`; constraints are parametrizations attached
to the model before the loop, so the loop itself never needs to know what kind of damage it works under. A loss
with a state of its own (alignment-held's Lagrange multipliers) is an object that also has `step_metrics()`
(what the curve and the log record for the step) and `state_dict()` / `load_state_dict()` (saved with the
training state, so a resumed run continues the same multipliers).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from realign.data.row_cache import examples_fingerprint
from realign.data.sequences import collate
from realign.device import autocast, model_device, on_device, training_precision
from realign.io import atomic_path

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
    precision: str | None = None  # training.dtype: float32 | bfloat16; None: realign.device.training_precision's default

    @classmethod
    def from_params(cls, params: dict, seed: int) -> "TrainConfig":
        """The loop's settings from a degradation's or recovery's training parameters (the `training:` defaults
        merged with the method's own entries, realign.config.training_params)."""
        return cls(steps=params["steps"], lr=params["lr"], batch_size=params["batch_size"],
                   grad_accum=params.get("grad_accum", 1), schedule=params.get("schedule", "cosine"),
                   warmup_steps=params.get("warmup_steps", 0), max_grad_norm=params.get("max_grad_norm", 1.0),
                   seed=seed, precision=params.get("dtype"))

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        training_precision("cpu", self.precision)  # an unknown training.dtype fails here, before any step

    def precision_on(self, device) -> str:
        """The precision of its training forwards on `device` (realign.device.training_precision)."""
        return training_precision(device, self.precision)


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


def _fingerprint(cfg: TrainConfig, examples: list[dict], params: list[tuple[str, torch.nn.Parameter]],
                 run_identity: dict | None) -> str:
    """What a saved state must share with the run to be continued: the config, the examples (their digest), the
    trainable parameters' names and shapes, and the caller's `run_identity` (parent weights, teacher, data...)."""
    return json.dumps({"cfg": asdict(cfg), "n_examples": len(examples), "examples": examples_fingerprint(examples),
                       "params": [(name, list(p.shape)) for name, p in params], "run": run_identity or {}},
                      sort_keys=True, default=str)


def _differences(saved, current: str) -> str:
    """Which parts of two fingerprints differ, for the log ("run.parent, cfg"), or "all" when unparsable."""
    try:
        saved, current = json.loads(saved), json.loads(current)
    except (TypeError, ValueError):
        return "its fingerprint is of another format"
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            keys.append(key)
    return ", ".join(keys)


def save_train_state(path: Path, step: int, curve: list[dict], params, optimizer, scheduler, fingerprint: str,
                     loss_fn=None):
    """Everything needed to continue the run bit for bit: trainable weights, optimizer and schedule, RNG, curve,
    and the loss's own state when it has one."""
    state = {"step": step, "curve": curve, "fingerprint": fingerprint,
             "params": {name: p.detach().cpu() for name, p in params},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if hasattr(loss_fn, "state_dict"):
        state["loss"] = loss_fn.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Path, params, optimizer, scheduler, fingerprint: str,
                     loss_fn=None) -> tuple[int, list[dict]] | None:
    """Restore a saved state into params/optimizer/scheduler/RNG; returns (step, curve), or None after deleting a
    stale state (one saved by another run: other config, examples, parent model, teacher...), which must not be
    continued; an unreadable state is an error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, never train on a half-read state
        raise ValueError(f"training state {path} is unreadable ({type(err).__name__}: {err}); delete it to "
                         "restart the run from step 0") from None
    if state.get("fingerprint") != fingerprint:
        log.warning("discarding training state %s: it belongs to another run (%s differ); restarting from step 0",
                    path, _differences(state.get("fingerprint"), fingerprint))
        path.unlink(missing_ok=True)
        return None
    with torch.no_grad():
        for name, p in params:
            p.copy_(state["params"][name].to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if hasattr(loss_fn, "load_state_dict"):
        loss_fn.load_state_dict(state["loss"])
    return state["step"], state["curve"]


def _compact(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + " ".join(_compact(v) for v in value) + "]"
    return str(value)


def train(model, examples: list[dict], loss_fn, cfg: TrainConfig, pad_id: int, checkpoint_steps=(),
          on_checkpoint=None, state_path: str | Path | None = None, state_every: int = 0,
          run_identity: dict | None = None, on_restart=None) -> list[dict]:
    """Run `cfg.steps` optimizer steps; returns the training curve [{step, loss, lr, **loss_fn.step_metrics()}].

    After each step in `checkpoint_steps`, `on_checkpoint(model, step, curve_so_far)` may save the model (the
    schedule is that of the whole run, so a checkpoint is the state of the full run at that step).
    With `state_path` and `state_every` > 0, the training state is saved every `state_every` steps, and a run
    that finds a state there (left by an interrupted run of the same config) continues from it, giving the same
    result as an uninterrupted run; the state file is removed when the run completes. `run_identity` (JSON-able:
    digests of the parent model, teacher and data, the method's parameters) joins the state's fingerprint, so a
    state left by a run with another parent, teacher or data is discarded (logged), never continued.
    `on_restart()` is called when the run starts from step 0 (no state, or a stale one discarded), e.g. to drop
    checkpoints that an interrupted run had saved."""
    bad = [s for s in checkpoint_steps if not 0 < s < cfg.steps]
    if bad:
        raise ValueError(f"checkpoint steps {bad} must lie strictly between 0 and the run's {cfg.steps} steps")
    if cfg.batch_size > len(examples):  # a batch would hold an example twice (issue 32)
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(examples)} training examples: a batch "
                         "would repeat examples; lower batch_size (training.batch_size or the run's own)")
    torch.manual_seed(cfg.seed)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    per_step = cfg.batch_size * cfg.grad_accum
    order = example_order(len(examples), cfg.steps * per_step, cfg.seed)
    curve: list[dict] = []
    first_step = 0
    state_path = Path(state_path) if state_path and state_every > 0 else None
    device = model_device(model)
    precision = cfg.precision_on(device)  # the student's forwards (and so its backward)
    # a state is continued only in the precision it was trained in (training.dtype resolved on this device)
    fingerprint = _fingerprint(replace(cfg, precision=precision), examples, named, run_identity)
    resumed = None
    if state_path is not None and state_path.is_file():
        resumed = load_train_state(state_path, named, optimizer, scheduler, fingerprint, loss_fn)
    if resumed is not None:
        first_step, curve = resumed
        log.info("resuming from %s at step %d of %d", state_path, first_step, cfg.steps)
    elif on_restart is not None:
        on_restart()
    model.train()
    bar = tqdm(range(first_step, cfg.steps), desc="train", file=sys.stderr, mininterval=5, ascii=True,
               initial=first_step, total=cfg.steps)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            start = step * per_step + micro * cfg.batch_size
            batch = on_device(collate([examples[i] for i in order[start:start + cfg.batch_size]], pad_id), device)
            with autocast(device, precision):
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
        extra = loss_fn.step_metrics() if hasattr(loss_fn, "step_metrics") else {}
        curve.append({"step": step + 1, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"], **extra})
        bar.set_postfix(loss=f"{step_loss:.4f}")
        log.info("step %d/%d loss %.4f%s", step + 1, cfg.steps, step_loss,
                 "".join(f" {k} {_compact(v)}" for k, v in extra.items()))
        if step + 1 in checkpoint_steps and on_checkpoint is not None:
            model.eval()
            on_checkpoint(model, step + 1, list(curve))
            model.train()
        if state_path is not None and (step + 1) % state_every == 0 and step + 1 < cfg.steps:
            save_train_state(state_path, step + 1, curve, named, optimizer, scheduler, fingerprint, loss_fn)
    model.eval()
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    return curve
