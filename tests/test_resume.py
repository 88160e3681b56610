"""A training run killed with SIGKILL resumes from its saved state and ends exactly where an uninterrupted run
ends; a foreign or truncated state is refused with its file name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from realign.data.sequences import chat_example
from realign.recover.losses import cross_entropy
from realign.training import TrainConfig, train

CFG = dict(steps=6, lr=1e-3, batch_size=2, seed=3)

RUN = textwrap.dedent("""
    import sys, time
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from realign.data.sequences import chat_example
    from realign.recover.losses import cross_entropy
    from realign.training import TrainConfig, train

    model_dir, state_path = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = [chat_example(tokenizer, f"q{i}", f"answer number {i}", 32) for i in range(6)]

    def slow_loss(m, batch):  # slow enough for the parent to kill the run mid-way
        time.sleep(0.5)
        return cross_entropy(m(input_ids=batch["input_ids"]).logits, batch["labels"])

    train(model, examples, slow_loss, TrainConfig(**%r), tokenizer.pad_token_id, state_path=state_path,
          state_every=1)
""" % CFG)


def loss_fn(m, batch):
    return cross_entropy(m(input_ids=batch["input_ids"]).logits, batch["labels"])


def fresh(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [chat_example(tokenizer, f"q{i}", f"answer number {i}", 32) for i in range(6)]
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, examples


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    state_path = tmp_path / "state.pt"
    process = subprocess.Popen([sys.executable, "-c", RUN, str(tiny_model_dir), str(state_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if state_path.is_file() and torch.load(state_path, weights_only=True)["step"] >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = torch.load(state_path, weights_only=True)["step"]
    assert 2 <= interrupted_at < CFG["steps"]

    model, tokenizer, examples = fresh(tiny_model_dir)
    resumed_curve = train(model, examples, loss_fn, TrainConfig(**CFG), tokenizer.pad_token_id,
                          state_path=state_path, state_every=1)
    reference, _, _ = fresh(tiny_model_dir)
    reference_curve = train(reference, examples, loss_fn, TrainConfig(**CFG), tokenizer.pad_token_id)
    assert [c["step"] for c in resumed_curve] == list(range(1, CFG["steps"] + 1))
    assert resumed_curve == reference_curve
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    assert not state_path.exists()  # a finished run leaves no state behind


def test_foreign_or_truncated_state_is_refused(tiny_model_dir, tmp_path):
    model, tokenizer, examples = fresh(tiny_model_dir)
    state_path = tmp_path / "state.pt"
    cfg = TrainConfig(**{**CFG, "steps": 3})

    def stop_after_two(m, batch, calls=[0]):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return loss_fn(m, batch)

    with pytest.raises(KeyboardInterrupt):
        train(model, examples, stop_after_two, cfg, tokenizer.pad_token_id, state_path=state_path, state_every=1)
    other = TrainConfig(**{**CFG, "steps": 3, "lr": 5e-4})
    with pytest.raises(ValueError, match="belongs to another run"):
        train(fresh(tiny_model_dir)[0], examples, loss_fn, other, tokenizer.pad_token_id, state_path=state_path,
              state_every=1)
    state_path.write_bytes(state_path.read_bytes()[:200])
    with pytest.raises(ValueError, match="state.pt is unreadable"):
        train(fresh(tiny_model_dir)[0], examples, loss_fn, cfg, tokenizer.pad_token_id, state_path=state_path,
              state_every=1)
