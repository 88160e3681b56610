"""Recovery losses, the teacher top-k cache, and each method and control on a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from realign.data.sequences import IGNORE, chat_example, collate
from realign.io import IntegrityError
from realign.measure.kernels import linear_cka, minibatch_linear_cka
from realign.recover.losses import (DIVERGENCES, coarsen_top_k, divergence, supervised_log_probs, supervised_mask,
                                    top_k_with_tail)
from realign.recover.methods import build_examples, distillation_loss
from realign.recover.registry import METHODS as RECOVERY_METHODS
from realign.recover.run import recover
from realign.recover.teacher_logits import TeacherTopK, compute_teacher_top_k, save_teacher_top_k
from realign.training import TrainConfig


def log_probs(seed, n=7, vocab=13, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(n, vocab, generator=g), -1)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_is_zero_exactly_for_equal_distributions(kind):
    p, q = log_probs(0), log_probs(1)
    assert float(divergence(p, p.clone(), kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(divergence(p, q, kind)) > 0.05


def test_reverse_kl_and_jsd_match_independent_formulas():
    t, s = log_probs(2), log_probs(3)
    expected_reverse = torch.nn.functional.kl_div(t, s, log_target=True, reduction="batchmean")
    assert float(divergence(t, s, "reverse_kl")) == pytest.approx(float(expected_reverse), rel=1e-5)
    # Symmetric JSD: 0.5 KL(T||M) + 0.5 KL(S||M), bounded by ln 2, symmetric in its arguments.
    m = torch.log(0.5 * (t.exp() + s.exp()))
    expected_jsd = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    assert float(divergence(t, s, "jsd", 0.5)) == pytest.approx(float(expected_jsd.mean()), rel=1e-5)
    assert float(divergence(t, s, "jsd", 0.5)) == pytest.approx(float(divergence(s, t, "jsd", 0.5)), rel=1e-5)
    assert float(divergence(t, s, "jsd", 0.5)) < torch.log(torch.tensor(2.0))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_gradient_moves_student_towards_teacher(kind):
    teacher = log_probs(4)
    student_logits = torch.zeros(7, 13, requires_grad=True)
    loss = divergence(teacher, torch.log_softmax(student_logits, -1), kind)
    loss.backward()
    stepped = torch.log_softmax(student_logits.detach() - 0.5 * student_logits.grad, -1)
    assert float(divergence(teacher, stepped, kind)) < loss.item()


def test_top_k_coarsening_bounds_the_full_divergence_and_is_exact_with_the_whole_vocabulary():
    t, s = log_probs(5), log_probs(6)
    full = float(divergence(t, s))
    for k in (1, 4, 12):
        indices = t.topk(k, -1).indices
        coarse = float(divergence(top_k_with_tail(t.gather(-1, indices)), coarsen_top_k(s, indices)))
        assert 0 <= coarse <= full + 1e-6
    indices = t.topk(13, -1).indices
    exact = float(divergence(top_k_with_tail(t.gather(-1, indices)), coarsen_top_k(s, indices)))
    assert exact == pytest.approx(full, rel=1e-4)


def test_minibatch_cka_matches_the_measurement_estimator_and_its_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    y = x @ torch.randn(8, 8, generator=g) + 0.5 * torch.randn(40, 8, generator=g)
    assert float(minibatch_linear_cka(x, y)) == pytest.approx(linear_cka(x, y), abs=1e-5)
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    assert float(minibatch_linear_cka(3.0 * x @ rotation, y)) == pytest.approx(linear_cka(x, y), abs=1e-5)
    assert float(minibatch_linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)


def examples_of(tokenizer, n=8, max_len=48):
    records = [{"instruction": f"Question {i}: name a colour", "teacher_answer": f"colour {i} is blue and green",
                "reference": f"the colour number {i} is red"} for i in range(n)]
    return records, build_examples(tokenizer, records, "teacher_answer", max_len)


def perturbed(model, scale=0.05, seed=1):
    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return student


def test_teacher_top_k_cache_round_trip_matches_the_live_teacher(tiny, tmp_path):
    model, tokenizer = tiny
    _, examples = examples_of(tokenizer)
    vocab = model.config.vocab_size
    cache = compute_teacher_top_k(model, examples, vocab, 1.0, tokenizer.pad_token_id, batch_size=3)
    path = tmp_path / "top_k.safetensors"
    save_teacher_top_k(cache, path, examples, 1.0)
    loaded = TeacherTopK(path, examples, 1.0)
    batch = collate([examples[5], examples[2]], tokenizer.pad_token_id)
    values, _ = loaded.rows(batch)
    with torch.no_grad():
        live = supervised_log_probs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    torch.testing.assert_close(values, live.sort(-1, descending=True).values, atol=1e-5, rtol=1e-5)
    # With the whole vocabulary cached, the cached loss equals the live-teacher loss.
    student = perturbed(model)
    params = {"method": "kd", "divergence": "forward_kl"}
    cached_loss = distillation_loss(RECOVERY_METHODS[params["method"]], params, None, loaded)(student, batch)
    live_loss = distillation_loss(RECOVERY_METHODS[params["method"]], params, model, None)(student, batch)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-4)


def test_teacher_top_k_cache_refuses_other_examples_and_corruption(tiny, tmp_path):
    model, tokenizer = tiny
    _, examples = examples_of(tokenizer)
    cache = compute_teacher_top_k(model, examples, 8, 1.0, tokenizer.pad_token_id)
    path = tmp_path / "top_k.safetensors"
    save_teacher_top_k(cache, path, examples, 1.0)
    assert load_file(str(path))["values"].shape[1] == 8
    with pytest.raises(ValueError, match="other distillation examples"):
        TeacherTopK(path, examples[:-1], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        TeacherTopK(path, examples, 2.0)
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # a flipped bit in the last stored value
    with pytest.raises(IntegrityError, match=f"teacher logits cache {path} is corrupted"):
        TeacherTopK(path, examples, 1.0)
    save_file(load_file(str(path)), str(path), metadata={"fingerprint": "x", "temperature": "1.0"})
    with pytest.raises(IntegrityError, match=f"teacher logits cache {path} has no sha256 digest"):
        TeacherTopK(path, examples, 1.0)
    path.write_bytes(original[:100])
    with pytest.raises(ValueError, match="unreadable"):
        TeacherTopK(path, examples, 1.0)


def test_teacher_answers_and_prompt_splits_are_verified_where_read(tmp_path):
    from realign.data.stage import read_prompts
    from realign.io import digest_path, write_json, write_jsonl
    from realign.recover.stage import read_teacher_records

    answers = tmp_path / "teacher_answers.jsonl"
    write_jsonl(answers, [{"instruction": "q", "teacher_answer": "yes"}], digest=True)
    assert read_teacher_records(answers) == [{"instruction": "q", "teacher_answer": "yes"}]
    answers.write_text(answers.read_text().replace("yes", "no!"))
    with pytest.raises(IntegrityError, match=f"{answers} does not match.*rerun the step that made it"):
        read_teacher_records(answers)
    prompts = tmp_path / "prompts.json"
    write_json(prompts, {"distill": []})  # no digest: cannot be verified, so not used
    assert not digest_path(prompts).exists()
    with pytest.raises(IntegrityError, match=f"{prompts} has no sha256 digest.*`prompt_splits` rule"):
        read_prompts(prompts)


def hidden_cka_and_kl(student, teacher, batch, kind="forward_kl", beta=0.5):
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = supervised_mask(batch["labels"])
    cka = sum(linear_cka(a[mask], b[mask]) for a, b in zip(s.hidden_states[1:], t.hidden_states[1:]))
    kl = divergence(supervised_log_probs(t.logits, batch["labels"]), supervised_log_probs(s.logits, batch["labels"]),
                    kind, beta)
    return cka / (len(s.hidden_states) - 1), float(kl)


@pytest.fixture
def sharp_teacher(tiny):
    """The tiny random model with 8x larger logits: confident like a trained model, so KL is not ~0 from the start."""
    model, tokenizer = tiny
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)
    return teacher, tokenizer


def run_method(teacher, tokenizer, params, steps=12, lr=3e-4, seed=0, scale=0.3):
    records, examples = examples_of(tokenizer)
    student = perturbed(teacher, scale=scale)
    batch = collate(examples, tokenizer.pad_token_id)
    kind, beta = params.get("divergence", "forward_kl"), params.get("beta", 0.5)
    before = hidden_cka_and_kl(student, teacher, batch, kind, beta)
    student, curve, _, _ = recover(student, teacher, tokenizer, params, records,
                                   TrainConfig(steps=steps, lr=lr, batch_size=4, seed=seed), 48, {"kind": "none"}, {})
    return before, hidden_cka_and_kl(student, teacher, batch, kind, beta), curve


def test_alignment_blocked_lowers_cka_while_kl_falls(sharp_teacher):
    teacher, tokenizer = sharp_teacher
    (cka0, kl0), (cka_kd, kl_kd), _ = run_method(teacher, tokenizer, {"method": "kd"}, steps=24)
    _, (cka_blocked, kl_blocked), _ = run_method(teacher, tokenizer,
                                                 {"method": "alignment-blocked", "align_weight": 0.2}, steps=24)
    assert kl_kd < 0.5 * kl0 and kl_blocked < 0.5 * kl0  # the logits are matched in both runs...
    # ...but the penalty drives the geometry away from the teacher's, below its start and below plain KD's.
    assert cka_blocked < cka0 - 0.05 and cka_blocked < cka_kd - 0.05


def test_alignment_only_raises_cka_and_each_logit_loss_lowers_kl(sharp_teacher):
    teacher, tokenizer = sharp_teacher
    (cka0, _), (cka1, _), _ = run_method(teacher, tokenizer, {"method": "alignment-only"}, scale=1.0)
    assert cka1 > cka0 + 0.02
    (cka0, _), (cka1, _), _ = run_method(teacher, tokenizer, {"method": "alignment-only", "align_loss": "mse"},
                                         scale=1.0)
    assert cka1 > cka0 + 0.02
    # Each divergence falls on the data it is trained on (measured with that same divergence).
    for params in ({"method": "kd", "divergence": "reverse_kl"}, {"method": "kd", "divergence": "jsd", "beta": 0.3},
                   {"method": "cka-kd", "align_weight": 0.5, "temperature": 2.0}):
        (_, kl0), (_, kl1), _ = run_method(teacher, tokenizer, params)
        assert kl1 < 0.8 * kl0, params


def feature_distances(student, teacher, batch, layers):
    """(SquareHead's normalised MSE, mean cosine distance) of the student's hidden states to the teacher's on the
    supervised tokens, written out here rather than with the training losses."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = supervised_mask(batch["labels"])
    mse = cos = 0.0
    for i in layers:
        a, b = s.hidden_states[i][mask].double(), t.hidden_states[i][mask].double()
        mse += float(((a - b) ** 2).sum() / (b**2).sum())
        cos += float((1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())
    return mse / len(layers), cos / len(layers)


@pytest.mark.parametrize("method", ["squarehead", "hidden-cosine"])
def test_feature_distillation_lowers_its_feature_distance_on_the_pre_registered_layers(sharp_teacher, method):
    """SquareHead and hidden-cosine: the feature loss falls during training, the feature distance to the teacher
    falls on the layers they are given (here the inner range 1..L-1 that measure.alignment_layers 'inner' names),
    and with KL the output divergence falls too."""
    from realign.recover.losses import layer_cosine_distance, layer_mse

    teacher, tokenizer = sharp_teacher
    records, examples = examples_of(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    n_hidden = teacher.config.num_hidden_layers + 1
    inner = list(range(1, n_hidden - 1))
    student = perturbed(teacher, scale=1.0)
    before = feature_distances(student, teacher, batch, inner)
    _, kl0 = hidden_cka_and_kl(student, teacher, batch)
    params = {"method": method, "align_weight": 1.0, "alignment_layers": "inner"}
    student, curve, _, _ = recover(student, teacher, tokenizer, params, records,
                                   TrainConfig(steps=16, lr=1e-3, batch_size=4, seed=0), 48, {"kind": "none"}, {})
    after = feature_distances(student, teacher, batch, inner)
    index = 0 if method == "squarehead" else 1
    assert after[index] < 0.7 * before[index]
    losses = [row["loss"] for row in curve]
    assert sum(losses[-4:]) < sum(losses[:4])
    _, kl1 = hidden_cka_and_kl(student, teacher, batch)
    assert kl1 < kl0
    # the training losses are the distances above, on the same tokens
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = supervised_mask(batch["labels"])
    assert float(layer_cosine_distance(s.hidden_states, t.hidden_states, mask, inner)) == pytest.approx(after[1], rel=1e-4)
    # layer_mse averages per-layer ratios of mean squares over the same elements: the same ratio as above
    assert float(layer_mse(s.hidden_states, t.hidden_states, mask, inner)) == pytest.approx(after[0], rel=1e-4)


def test_feature_methods_take_the_pre_registered_layers_and_their_options_are_checked():
    from realign.config import recovery_spec

    config = {"training": {"batch_size": 4}, "measure": {"alignment_layers": "inner"}, "seed": 0,
              "recoveries": {"sq": {"method": "squarehead", "steps": 1, "lr": 1e-4},
                             "cos": {"method": "hidden-cosine", "steps": 1, "lr": 1e-4, "layers": [2, 3]}}}
    assert recovery_spec(config, "sq")[0]["alignment_layers"] == "inner"
    assert "alignment_layers" not in recovery_spec(config, "cos")[0]


def test_onpolicy_trains_on_student_samples_deterministically(tiny):
    teacher, tokenizer = tiny
    params = {"method": "onpolicy", "max_new_tokens": 8}
    _, _, curve = run_method(teacher, tokenizer, params, steps=3, seed=5)
    _, _, again = run_method(teacher, tokenizer, params, steps=3, seed=5)
    assert curve == again
    assert all(torch.isfinite(torch.tensor(c["loss"])) and c["loss"] >= 0 for c in curve)


def test_checkpoints_are_the_runs_state_and_keep_the_mask(tiny):
    teacher, tokenizer = tiny
    records, _ = examples_of(tokenizer)
    from realign.degrade.prune import prune_model

    student = perturbed(teacher, scale=0.3)
    constraint, tensors = prune_model(student, 0.5)
    saved = {}

    def keep(model, step, curve):
        saved[step] = ({k: v.clone() for k, v in model.state_dict().items()}, len(curve))

    student, curve, check, _ = recover(student, teacher, tokenizer, {"method": "kd"}, records,
                                       TrainConfig(steps=4, lr=1e-2, batch_size=4), 48, constraint, tensors,
                                       on_checkpoint=keep, checkpoint_steps=[2])
    assert check["ok"] and list(saved) == [2] and saved[2][1] == 2
    assert len(curve) == 4
    from realign.degrade.targets import block_linears

    name = constraint["modules"][0]
    assert (block_linears(student)[name].weight[~tensors[name]] == 0).all()


def test_a_baked_checkpoint_copy_leaves_the_training_model_parametrized(tiny):
    from realign.degrade import constraints
    from realign.degrade.prune import prune_model
    from realign.degrade.targets import block_linears

    model, _ = tiny
    student = copy.deepcopy(model)
    constraint, masks = prune_model(student, 0.5)
    constraints.attach(student, constraint, masks)
    baked = constraints.baked_copy(student)
    assert constraints.check(baked, constraint, masks)["ok"]
    ids = torch.arange(12)[None]
    torch.testing.assert_close(baked(input_ids=ids).logits, student(input_ids=ids).logits)
    name = constraint["modules"][0]
    assert block_linears(student)[name].weight.shape == block_linears(baked)[name].weight.shape  # still usable
    constraints.detach(student)


RECOVERY_CONFIG_ERRORS = [
    ("an option of another method", {"kd": {"method": "kd", "steps": 2, "lr": 1e-4, "targets": "rewrite"}},
     r"recoveries\.kd\.targets: not an option of method kd"),
    ("an undefined damaged teacher", {"kd": {"method": "kd", "steps": 2, "lr": 1e-4, "teacher": "gptq-9"}},
     r"recoveries\.kd\.teacher: 'gptq-9' is not defined under degradations"),
    ("a checkpoint that rounds to step 0", {"kd": {"method": "kd", "steps": 2, "lr": 1e-4, "checkpoints": [0.1]}},
     r"recoveries\.kd\.checkpoints: 0\.1 of 2 steps rounds to step 0"),
    ("an unknown divergence", {"kd": {"method": "kd", "steps": 2, "lr": 1e-4, "divergence": "tvd"}},
     r"recoveries\.kd\.divergence: 'tvd' is not allowed"),
    ("jsd beta of 1", {"kd": {"method": "kd", "steps": 2, "lr": 1e-4, "divergence": "jsd", "beta": 1}},
     r"recoveries\.kd\.beta"),
]


@pytest.mark.parametrize("recoveries, pattern", [(r, p) for _, r, p in RECOVERY_CONFIG_ERRORS],
                         ids=[name for name, _, _ in RECOVERY_CONFIG_ERRORS])
def test_recovery_config_errors_name_the_key(recoveries, pattern):
    import yaml

    from realign.config import ConfigError, load_schema, validate_config
    from tiny_study import REPO

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["recoveries"] = recoveries
    config["study"] = [{"degradations": ["magnitude-50"], "recoveries": list(recoveries)}]
    with pytest.raises(ConfigError, match=pattern):
        validate_config(config, load_schema(REPO / "workflow/schemas/config.schema.yaml"))
