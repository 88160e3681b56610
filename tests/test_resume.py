"""A training run killed with SIGKILL resumes from its saved state and ends exactly where an uninterrupted run
ends; a state left by another run (other config, data, parent model) is discarded, with a log line, and the run
restarts from step 0; a truncated state is refused with its file name."""

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


def interrupted_after_two_steps(model, examples, cfg, tokenizer, state_path) -> None:
    """Train with a resumable state until the third step's loss, where the run is interrupted."""
    calls = [0]

    def stop_after_two(m, batch):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return loss_fn(m, batch)

    with pytest.raises(KeyboardInterrupt):
        train(model, examples, stop_after_two, cfg, tokenizer.pad_token_id, state_path=state_path, state_every=1)


def test_foreign_or_truncated_state_is_refused(tiny_model_dir, tmp_path):
    model, tokenizer, examples = fresh(tiny_model_dir)
    state_path = tmp_path / "state.pt"
    cfg = TrainConfig(**{**CFG, "steps": 3})

    interrupted_after_two_steps(model, examples, cfg, tokenizer, state_path)
    saved = state_path.read_bytes()
    other = TrainConfig(**{**CFG, "steps": 3, "lr": 5e-4})
    discarded = fresh(tiny_model_dir)[0]
    curve = train(discarded, examples, loss_fn, other, tokenizer.pad_token_id, state_path=state_path, state_every=1)
    clean = fresh(tiny_model_dir)[0]
    assert curve == train(clean, examples, loss_fn, other, tokenizer.pad_token_id)  # restarted from step 0
    assert all(torch.equal(a, b) for a, b in zip(discarded.state_dict().values(), clean.state_dict().values()))
    state_path.write_bytes(saved[:200])
    with pytest.raises(ValueError, match="state.pt is unreadable"):
        train(fresh(tiny_model_dir)[0], examples, loss_fn, cfg, tokenizer.pad_token_id, state_path=state_path,
              state_every=1)


def test_a_state_is_continued_only_in_the_precision_it_was_trained_in(tiny_model_dir, tmp_path):
    """training.dtype joins the state's fingerprint as resolved on the device: a state left by a float32 run is
    continued by the same run with dtype unset on a CPU (float32 there), never by a bfloat16 run."""
    model, tokenizer, examples = fresh(tiny_model_dir)
    state_path = tmp_path / "state.pt"
    fp32 = TrainConfig(**{**CFG, "steps": 3, "precision": "float32"})

    interrupted_after_two_steps(model, examples, fp32, tokenizer, state_path)
    saved = state_path.read_bytes()
    starts = []
    bf16 = TrainConfig(**{**CFG, "steps": 3, "precision": "bfloat16"})
    train(fresh(tiny_model_dir)[0], examples, loss_fn, bf16, tokenizer.pad_token_id, state_path=state_path,
          state_every=1, on_restart=lambda: starts.append("bf16"))
    state_path.write_bytes(saved)
    unset = TrainConfig(**{**CFG, "steps": 3})
    continued = fresh(tiny_model_dir)[0]
    curve = train(continued, examples, loss_fn, unset, tokenizer.pad_token_id, state_path=state_path,
                  state_every=1, on_restart=lambda: starts.append("unset"))
    assert starts == ["bf16"]  # the bf16 run started from step 0; the unset one continued the fp32 state
    clean = fresh(tiny_model_dir)[0]
    assert curve == train(clean, examples, loss_fn, fp32, tokenizer.pad_token_id)
    assert all(torch.equal(a, b) for a, b in zip(continued.state_dict().values(), clean.state_dict().values()))


def _recovery_inputs(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.degrade.stage import degrade
    from realign.io import write_jsonl
    from realign.models.artifact import save_artifact
    from realign.models.record import ArtifactRecord

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher = save_artifact(model, tokenizer, tmp_path / "tiny/none/none", ArtifactRecord("tiny"))
    parents = {}
    for sparsity in (0.6, 0.3):
        parents[sparsity] = tmp_path / f"tiny/magnitude-{sparsity}/none"
        degrade(teacher, parents[sparsity], "tiny", f"magnitude-{sparsity}", {"method": "magnitude",
                                                                              "sparsity": sparsity}, seed=0)
    records = tmp_path / "teacher_answers.jsonl"
    write_jsonl(records, [{"instruction": f"q{i}", "reference": f"answer number {i}", "teacher_answer": f"a{i}"}
                          for i in range(6)], digest=True)
    return teacher, parents, records


def test_a_state_saved_under_another_parent_is_discarded_and_the_rerun_equals_a_clean_run(
        tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Killed under parent 0.6 after step 2 (with a checkpoint at step 1 staged); the damage is then changed to
    0.3: the rerun must not continue the old state or keep its checkpoint, and equals a clean 0.3 run bit for bit."""
    import realign.training as training
    from realign.models.artifact import read_record
    from realign.recover.stage import checkpoint_dir, run_recovery

    teacher, parents, records = _recovery_inputs(tiny_model_dir, tmp_path)
    params = {"method": "sft", "steps": 4, "lr": 1e-3, "batch_size": 2, "max_len": 32}
    out = tmp_path / "tiny/magnitude/sft"
    save = training.save_train_state

    def save_then_die(path, step, *args):
        save(path, step, *args)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_train_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_recovery(teacher, parents[0.6], records, out, "sft", params, 0, checkpoint_steps=[1], state_every=1)
    monkeypatch.undo()
    state = out.parent / ".sft.train_state.pt"
    assert torch.load(state, weights_only=True)["step"] == 2
    assert checkpoint_dir(out.parent / ".sft.checkpoints.partial", 1).is_dir()

    with caplog.at_level("WARNING", logger="realign.training"):
        rerun = run_recovery(teacher, parents[0.3], records, out, "sft", params, 0, checkpoint_steps=[1],
                             state_every=1)
    assert "discarding training state" in caplog.text and "run.parent" in caplog.text
    clean = run_recovery(teacher, parents[0.3], records, tmp_path / "clean/sft", "sft", params, 0, checkpoint_steps=[1])
    assert [c["step"] for c in rerun.training_curve] == [1, 2, 3, 4]
    assert rerun.training_curve == clean.training_curve
    assert read_record(out).weights_sha256 == read_record(tmp_path / "clean/sft").weights_sha256
    assert (read_record(checkpoint_dir(out, 1)).weights_sha256
            == read_record(checkpoint_dir(tmp_path / "clean/sft", 1)).weights_sha256)
    assert not state.exists()


def test_the_resume_cadence_is_no_training_param_and_a_recovery_may_set_its_own():
    """Issue 32: `state_every` changes no result, so it is left out of every job's params (a change reruns nothing)
    and read per recovery artifact by `state_every`, the recovery's own entry before `training:`'s."""
    from realign.config import recovery_spec, state_every, training_params
    config = {"seed": 0, "training": {"batch_size": 2, "state_every": 5}, "measure": {"alignment_layers": "inner"},
              "recoveries": {"kd": {"method": "kd", "steps": 4, "lr": 1e-3},
                             "sft": {"method": "sft", "steps": 4, "lr": 1e-3, "state_every": 2}},
              "degradations": {"forget": {"method": "sft", "steps": 4, "lr": 1e-3}}}
    assert "state_every" not in recovery_spec(config, "kd+seed1")[0]
    assert "state_every" not in training_params(config, "degradations", "forget")
    assert (state_every(config, "kd+seed1"), state_every(config, "sft")) == (5, 2)
    del config["training"]["state_every"]
    assert state_every(config, "kd") == 0
