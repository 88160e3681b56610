"""A recovery run: its method's setup (realign.recover.registry's entry, realign.recover.methods), then the one
training loop (realign.training.train) under the damage's constraint."""

from __future__ import annotations

from realign.degrade import constraints
from realign.recover.methods import Setup
from realign.recover.registry import METHODS
from realign.training import TrainConfig, train


def needs_live_teacher(params: dict, states_cached: bool = False) -> bool:
    """Whether a recovery runs the teacher model during training (realign.recover.registry); `states_cached`: the
    run is given the content-states caches its method reads."""
    return METHODS[params["method"]].live_teacher(params, states_cached)


def recover(student, teacher, tokenizer, params: dict, records: list[dict], cfg: TrainConfig, max_len: int,
            constraint: dict, constraint_tensors: dict, teacher_top_k_path=None, on_checkpoint=None,
            checkpoint_steps=(), state_path=None, state_every: int = 0, run_identity: dict | None = None,
            on_restart=None, content_states=(None, None)):
    """Train `student` under its constraint with recovery `params` (method + options); returns (trained model,
    training curve, constraint check, constraint tensors as trained). The trained model is `student` itself, or a
    PeftModel wrapping it when the constraint is a frozen base. `on_checkpoint(model, step, curve)` is called at
    `checkpoint_steps`;
    `state_path`/`state_every`/`run_identity`/`on_restart`: resumable training (realign.training.train);
    `content_states`: the paths of the teacher's and the damaged model's content-states caches, or None each.
    The constraint tensors as trained are the run's own grid with trained scales (constraint["trained"]), otherwise
    `constraint_tensors` itself; `constraint_tensors` is never changed."""
    method = params["method"]
    if method not in METHODS:
        raise ValueError(f"unknown recovery method {method!r}; allowed: {', '.join(METHODS)}")
    entry = METHODS[method]
    training = entry.setup(Setup(entry, params, teacher, tokenizer, records, max_len, teacher_top_k_path,
                                 *content_states))
    if teacher is not None:
        teacher.eval()

    student = constraints.attach(student, constraint, constraint_tensors, seed=cfg.seed)
    try:
        if training.prepare is not None:
            training.prepare(student, training.examples, cfg)
        curve = train(student, training.examples, training.loss_fn, cfg, pad_id=tokenizer.pad_token_id,
                      checkpoint_steps=checkpoint_steps, on_checkpoint=on_checkpoint, state_path=state_path,
                      state_every=state_every, run_identity=run_identity, on_restart=on_restart)
        # trained scales (EfficientQAT's end-to-end step): the run's own grid, read before the constraint is baked
        # in; the check, the record and the artifact use it in place of the parent's
        trained_tensors = constraints.trained_grid(student, constraint, constraint_tensors)
    finally:
        constraints.detach(student)
    return student, curve, constraints.check(student, constraint, trained_tensors), trained_tensors
