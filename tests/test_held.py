"""alignment-held (realign.recover.held): the measurement's estimator in a differentiable form, the measurement's
kind of tokens on a training batch, the constraint holding a tiny model's CKA while kd lowers KL, its state across
a resumed run, and its config."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign.config import ConfigError, load_schema, recovery_defaults, recovery_spec, validate_config
from realign.data.sequences import collate
from realign.measure.activations import content_positions
from realign.measure.kernels import debiased_cka, linear_cka
from realign.models.tiny import build_tiny_model, build_tiny_tokenizer
from realign.recover.content_states import ContentStates, compute_content_states
from realign.recover.held import HeldAlignment, calibration_batches, content_token_mask
from realign.recover.losses import divergence, supervised_log_probs
from realign.recover.methods import build_examples
from realign.recover.run import recover
from realign.training import TrainConfig, example_order, train
from test_probe import SYSTEM_PROMPT_TEMPLATE
from tiny_study import REPO


# --- the estimator --------------------------------------------------------------------------------------------

def hidden_like(n, d, seed, offset=300.0):
    """Features shaped like hidden states: a few huge near-constant dimensions on top of the signal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :3] += offset * (1 + 0.01 * torch.randn(n, 3, generator=g))
    return x


@pytest.mark.parametrize("n, d", [(40, 64), (300, 64), (200, 16)])
def test_torch_debiased_cka_equals_the_float64_measurement_estimator(n, d):
    x = hidden_like(n, d, 0)
    for y in (x @ torch.randn(d, d, generator=torch.Generator().manual_seed(1)) + 2 * hidden_like(n, d, 2),
              hidden_like(n, d, 3), x.clone()):
        reference = linear_cka(x.double(), y.double(), debiased=True)
        assert float(debiased_cka(x, y)) == pytest.approx(reference, abs=2e-5)


def test_the_gram_and_the_feature_form_of_the_torch_estimator_agree():
    """Fewer tokens than features take the Gram form, as many or more the feature form: n = d + 1 tokens with
    d features take the feature form, and with two zero features more (the same kernels) the Gram form; both give
    the float64 estimate and the same gradient (float32 rounding apart)."""
    n, d = 49, 48
    x = hidden_like(n, d, 6).requires_grad_()
    y = hidden_like(n, d, 7) + 0.5 * x.detach()
    forms = []
    for pad in (0, 2):
        x.grad = None
        cka = debiased_cka(torch.nn.functional.pad(x, (0, pad)), torch.nn.functional.pad(y, (0, pad)))
        cka.backward()
        assert float(cka.detach()) == pytest.approx(linear_cka(x.detach().double(), y.double(), debiased=True),
                                                    abs=2e-5)
        forms.append(x.grad.clone())
    feature, gram = forms
    assert torch.allclose(gram, feature, rtol=1e-3, atol=1e-4 * float(feature.abs().max()))


@pytest.mark.parametrize("n, d", [(64, 16), (24, 64)])  # the feature-space and the Gram form
def test_torch_debiased_cka_has_the_gradient_of_the_estimate(n, d):
    x0, y = hidden_like(n, d, 4, offset=0.0), hidden_like(n, d, 5, offset=0.0)
    x = (0.5 * y + x0).requires_grad_()
    cka = debiased_cka(x, y)
    cka.backward()
    with torch.no_grad():
        stepped = debiased_cka(x + 1e-2 * x.grad / x.grad.norm(), y)
    assert float(stepped) > float(cka.detach())  # the gradient points uphill
    # The float64 finite difference along the gradient matches the autograd directional derivative.
    direction = x.grad / x.grad.norm()
    eps = 1e-4
    numeric = (linear_cka((x + eps * direction).detach().double(), y.double(), debiased=True)
               - linear_cka((x - eps * direction).detach().double(), y.double(), debiased=True)) / (2 * eps)
    assert float((x.grad * direction).sum()) == pytest.approx(numeric, rel=1e-3)
    with pytest.raises(ValueError, match="at least 4 samples"):
        debiased_cka(x[:3], y[:3])


# --- the tokens -----------------------------------------------------------------------------------------------

RECORDS = [
    {"instruction": "What is the capital of France?", "teacher_answer": "Paris is."},
    {"instruction": "What is the boiling point of water?", "teacher_answer": "100 degrees."},
    {"instruction": "Write a haiku about the sea.", "teacher_answer": "Waves fold into foam."},
    {"instruction": "List three prime numbers.", "teacher_answer": ""},  # an empty answer: the instruction counts
]


def test_the_held_tokens_are_the_batchs_content_positions_only():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = SYSTEM_PROMPT_TEMPLATE  # SmolLM2's: a system prompt shared by every sequence
    examples = build_examples(tokenizer, RECORDS, "teacher_answer", max_len=160, content=True)
    batch = collate([examples[0], examples[1], examples[2], examples[3], examples[0]], tokenizer.pad_token_id)
    mask = content_token_mask(batch)
    lengths = batch["attention_mask"].sum(1)
    # Exactly what the measurement's content_positions selects on these sequences (the repeat dropped)...
    expected = content_positions([batch["input_ids"][i, :lengths[i]] for i in range(4)],
                                 [batch["content"][i, :lengths[i]] for i in range(4)])
    assert [torch.nonzero(mask[i]).flatten().tolist() for i in range(4)] == expected
    assert not mask[4].any()  # an example drawn twice adds no token twice
    # ...which is instruction and answer text: never padding, position 0, the template, the EOS, a shared prefix.
    assert not mask[:, 0].any() and not (mask & (batch["attention_mask"] == 0)).any()
    specials = set(tokenizer.all_special_ids)
    assert not any(int(t) in specials for t in batch["input_ids"][mask])
    for i, record in enumerate(RECORDS):
        text = tokenizer.decode(batch["input_ids"][i][mask[i]])
        assert "SmolLM" not in text and "assistant" not in text and "system" not in text
        assert text.endswith(record["teacher_answer"] or record["instruction"][-5:])
    opening = tokenizer.decode(batch["input_ids"][0][mask[0]])
    assert not opening.startswith("What is the")  # shared with the second instruction: its state repeats
    # A prompt cut from the left to fit max_len keeps its flags on the same tokens.
    for example, record in zip(build_examples(tokenizer, RECORDS, "teacher_answer", max_len=40, content=True),
                               RECORDS):
        text = tokenizer.decode(example["input_ids"][example["content"]])
        assert text and (record["instruction"] + record["teacher_answer"]).endswith(text)


# --- the constraint on a tiny model ---------------------------------------------------------------------------

WORDS = ["red", "blue", "green", "cats", "dogs", "rivers", "python", "stars", "tables", "music", "bread", "stone"]
TRAIN_RECORDS = [{"instruction": f"Tell me about {WORDS[i % 12]} number {i} and why",
                  "teacher_answer": f"{WORDS[i * 5 % 12]} {i} is {WORDS[i * 7 % 12]} and {WORDS[i * 3 % 12]} too, "
                                    f"often {i * 3}"} for i in range(16)]
MAX_LEN = 48
TOLERANCE = 0.01  # CKA: the held layers may end at most this far above their ceilings


@pytest.fixture(scope="module")
def damaged_pair(tmp_path_factory):
    """A 4-block tiny Llama made confident (its logits x8) as the teacher, and as the damaged student a copy with
    noise of the weights' own scale added to every parameter: kd lowers KL 5x and raises CKA at every held layer."""
    directory = build_tiny_model(tmp_path_factory.mktemp("held") / "model", seed=0, hidden_size=64, num_layers=4)
    teacher, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(p.std() * torch.randn(p.shape, generator=g))
    return teacher, student, tokenizer


# an alignment-held spec as validation and recovery_spec complete it: the schema's hold_* defaults, the layers
HELD_PARAMS = {**recovery_defaults("alignment-held"), "method": "alignment-held", "alignment_layers": "inner"}


def measured(student, teacher, tokenizer, params):
    """(KL(teacher || student), per-layer CKA on the held tokens) over all training examples as one batch."""
    examples = build_examples(tokenizer, TRAIN_RECORDS, "teacher_answer", MAX_LEN, content=True)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        kl = divergence(supervised_log_probs(teacher(input_ids=batch["input_ids"]).logits, batch["labels"]),
                        supervised_log_probs(student(input_ids=batch["input_ids"]).logits, batch["labels"]))
        cka = held_loss(params, teacher, tokenizer).layer_cka(student, batch)
    return float(kl), cka


def train_examples(tokenizer):
    return build_examples(tokenizer, TRAIN_RECORDS, "teacher_answer", MAX_LEN, content=True)


def states(model, tokenizer, params=HELD_PARAMS):
    return compute_content_states(model, train_examples(tokenizer), params["alignment_layers"],
                                  tokenizer.pad_token_id)


def held_loss(params, teacher, tokenizer):
    """alignment-held's loss with the teacher's content states computed from it, its logits live."""
    return HeldAlignment(params, states(teacher, tokenizer, params), teacher=teacher)


def trained(teacher, student, tokenizer, params, steps=24):
    student, curve, _, _ = recover(copy.deepcopy(student), teacher, tokenizer, params, TRAIN_RECORDS,
                                   TrainConfig(steps=steps, lr=5e-4, batch_size=4, seed=0), MAX_LEN,
                                   {"kind": "none"}, {})
    return student, curve


def test_the_held_constraint_keeps_cka_at_its_ceiling_while_kl_falls_and_kd_raises_it(damaged_pair):
    teacher, damaged, tokenizer = damaged_pair
    params = HELD_PARAMS  # the defaults: dose 0, paired baseline, rho 10; every block but the last
    kl0, cka0 = measured(damaged, teacher, tokenizer, params)
    kd, _ = trained(teacher, damaged, tokenizer, {"method": "kd"})
    held, curve = trained(teacher, damaged, tokenizer, params)
    kl_kd, cka_kd = measured(kd, teacher, tokenizer, params)
    kl_held, cka_held = measured(held, teacher, tokenizer, params)
    print(f"held layers {curve[-1]['held_layers']}: damaged CKA {cka0.tolist()}, KL {kl0:.3f}\n"
          f"  kd:   CKA {cka_kd.tolist()}, KL {kl_kd:.3f}\n  held: CKA {cka_held.tolist()}, KL {kl_held:.3f}")
    assert curve[-1]["held_layers"] == [1, 2, 3]  # measure.alignment_layers' default: every block but the last
    # The test can fail: plain kd re-aligns every held layer beyond the tolerance...
    assert (cka_kd > cka0 + 2 * TOLERANCE).all()
    assert kl_kd < 0.5 * kl0
    # ...while held, with the same kd term, matches the outputs as well and keeps every layer at or below its
    # ceiling (the damaged model's CKA, hold_fraction 0), on all the examples and on the batches it trained on.
    assert kl_held < 0.5 * kl0 and kl_held < 1.25 * kl_kd
    assert (cka_held <= cka0 + TOLERANCE).all()
    violations = torch.tensor([c["cka"] for c in curve]) - torch.tensor([c["cka_limit"] for c in curve])
    assert (violations[-8:].mean(0) <= TOLERANCE).all()


def test_the_ceiling_is_the_damaged_cka_plus_the_dose_and_resuming_keeps_the_multipliers(damaged_pair, tmp_path):
    teacher, damaged, tokenizer = damaged_pair
    examples = build_examples(tokenizer, TRAIN_RECORDS, "teacher_answer", MAX_LEN, content=True)
    cfg = TrainConfig(steps=3, lr=5e-4, batch_size=4, seed=0)
    order = example_order(len(examples), 3 * 4, cfg.seed)
    batches = calibration_batches(examples, order, 4, 3, tokenizer.pad_token_id, "cpu")
    base = HELD_PARAMS
    held = held_loss(base, teacher, tokenizer)
    damaged_states = states(damaged, tokenizer)
    damaged_cka = held.calibrate(damaged_states, batches)
    # The ceilings from the cached states are the damaged model's CKA measured live on the same batch (the
    # states were computed in batches of other shapes: the GEMMs' last bits differ).
    with torch.no_grad():
        for key, batch in zip(damaged_cka, batches):
            torch.testing.assert_close(damaged_cka[key], held.layer_cka(damaged, batch).double(), rtol=0, atol=1e-5)
    for dose, expected in (({"hold_fraction": 0.5}, lambda c: c + 0.5 * (1 - c)),
                           ({"hold_fraction": 0.5, "hold_reference": 0.06}, lambda c: c + 0.03)):
        limits = held_loss({**base, **dose}, teacher, tokenizer).calibrate(damaged_states, batches)
        for key in limits:
            torch.testing.assert_close(limits[key], expected(damaged_cka[key]))
    mean = held_loss({**base, "hold_baseline": "mean"}, teacher, tokenizer).calibrate(damaged_states, batches)
    torch.testing.assert_close(mean, torch.stack(list(damaged_cka.values())).mean(0))

    # A run interrupted after its state was saved continues with the same multipliers and ceilings.
    def run(state_path=None, stop_at=None):
        student = copy.deepcopy(damaged)
        loss_fn = held_loss(base, teacher, tokenizer)
        loss_fn.calibrate(damaged_states, batches)
        calls = [0]

        def stopping(model, batch):
            calls[0] += 1
            if calls[0] == stop_at:
                raise KeyboardInterrupt
            return loss_fn(model, batch)

        # The loop sees the loss's state and metrics through the wrapper, as it sees HeldAlignment's own.
        stopping.step_metrics, stopping.state_dict = loss_fn.step_metrics, loss_fn.state_dict
        stopping.load_state_dict = loss_fn.load_state_dict
        curve = train(student, examples, stopping, cfg, tokenizer.pad_token_id, state_path=state_path, state_every=1)
        return curve, loss_fn

    clean, _ = run()
    assert any(m > 0 for c in clean for m in c["multiplier"])  # the multipliers are exercised
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "state.pt", stop_at=3)
    resumed, _ = run(tmp_path / "state.pt")
    assert resumed == clean


def test_a_held_recovery_keeps_its_damage_and_records_its_ceilings(tiny_model_dir, tmp_path):
    """Through the DAG's recovery step: a pruned student trains under its mask, like every other recovery, and the
    artifact records the measured layers, the ceilings, the batch CKA and the multipliers of every step."""
    from realign.recover.stage import run_recovery
    from test_resume import _recovery_inputs

    teacher, parents, records = _recovery_inputs(tiny_model_dir, tmp_path)
    params = {**HELD_PARAMS, "steps": 3, "lr": 1e-3, "batch_size": 3, "max_len": 32}
    meta = run_recovery(teacher, parents[0.6], records, tmp_path / "tiny/magnitude-0.6/held", "held", params, 0)
    assert meta.constraint["kind"] == "mask" and meta.constraint_check["ok"]
    curve = meta.training_curve
    assert [c["held_layers"] for c in curve] == [[1]] * 3  # 2 blocks: every block but the last
    assert all(len(c["cka"]) == len(c["cka_limit"]) == len(c["multiplier"]) == 1 and c["kd"] >= 0 for c in curve)


def test_the_content_states_are_the_live_states_at_every_batchs_tokens_and_refuse_other_examples(damaged_pair,
                                                                                               tmp_path):
    teacher, _, tokenizer = damaged_pair
    examples = train_examples(tokenizer)
    cache = states(teacher, tokenizer)
    assert cache.layers == [1, 2, 3] and cache.n_hidden == 5 and cache.states.dtype == torch.float32
    # Any batch (a repeat included), any order: the selected rows are the live forward's states at the held tokens.
    for members in ([0, 1, 2, 3], [7, 2, 9, 2], [15, 4]):
        batch = collate([examples[i] for i in members], tokenizer.pad_token_id)
        mask = content_token_mask(batch)
        with torch.no_grad():
            hidden = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states
        for layer, selected in zip(cache.layers, cache.select(batch, mask)):
            torch.testing.assert_close(selected, hidden[layer][mask], rtol=0, atol=1e-5)
    cache.save(tmp_path / "states.safetensors", examples, "inner")
    loaded = ContentStates.load(tmp_path / "states.safetensors", examples, "inner")
    assert torch.equal(loaded.states, cache.states) and loaded.layers == cache.layers
    # A cache of other examples, or of other layers, is refused with the step to rerun.
    with pytest.raises(ValueError, match="other distillation examples.*content_states step"):
        ContentStates.load(tmp_path / "states.safetensors", examples[:-1], "inner")
    with pytest.raises(ValueError, match=r"holds the layers 'inner'.*\[1, 2\].*content_states step"):
        ContentStates.load(tmp_path / "states.safetensors", examples, [1, 2])
    with pytest.raises(ValueError, match="5 hidden states, the student has 3"):
        cache.check_model(3, "the student")


def test_a_held_run_given_its_caches_never_loads_the_teacher_and_trains_as_without_them(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    """The DAG's held run reads the content-states caches (and the top-k cache): no teacher model is loaded, the
    record names and digests the caches, and the run trains as the one that computes the states itself."""
    import realign.recover.stage as stage
    from test_resume import _recovery_inputs

    teacher, parents, records = _recovery_inputs(tiny_model_dir, tmp_path)
    params = {**HELD_PARAMS, "steps": 3, "lr": 1e-3, "batch_size": 3, "max_len": 32, "top_k": 8}
    top_k = tmp_path / "top_k.safetensors"
    stage.teacher_top_k(teacher, records, top_k, 32, 8, 1.0)
    caches = []
    for name, model_dir in (("teacher", teacher), ("damaged", parents[0.6])):
        caches.append(tmp_path / f"{name}.safetensors")
        stage.content_states(model_dir, records, caches[-1], 32, "inner")
    live = stage.run_recovery(teacher, parents[0.6], records, tmp_path / "live", "held", params, 0,
                              teacher_top_k_path=top_k)
    loaded = []
    real_load = stage.load_artifact
    monkeypatch.setattr(stage, "load_artifact", lambda path: loaded.append(str(path)) or real_load(path))
    cached = stage.run_recovery(teacher, parents[0.6], records, tmp_path / "cached", "held", params, 0,
                                teacher_top_k_path=top_k, content_states=tuple(caches))
    assert loaded == [str(parents[0.6])]  # the student only
    assert cached.data_split["content_states"] == [str(c) for c in caches]
    assert live.data_split["content_states"] is None
    for a, b in zip(live.training_curve, cached.training_curve):
        assert a["cka_limit"] == pytest.approx(b["cka_limit"], abs=1e-5) and a["kd"] == pytest.approx(b["kd"], rel=1e-4)


# --- the config -----------------------------------------------------------------------------------------------

HELD = {"method": "alignment-held", "steps": 4, "lr": 1e-4, "top_k": 64}
HELD_CONFIG_ERRORS = [
    ("a dose above 1", {"hold_fraction": 1.5},
     r"recoveries\.held\.hold_fraction: 1\.5 is greater than the maximum of 1"),
    ("a negative dose", {"hold_fraction": -0.1}, r"recoveries\.held\.hold_fraction: -0\.1 is less than the minimum"),
    ("a reference by name", {"hold_reference": "kd"},
     r"recoveries\.held\.hold_reference: .*expected 'headroom' \(1 - the damaged model's CKA"),
    ("a zero reference", {"hold_reference": 0}, r"recoveries\.held\.hold_reference"),
    ("an unknown baseline", {"hold_baseline": "first"}, r"recoveries\.held\.hold_baseline: 'first' is not allowed; "
                                                        r"allowed: batch, mean"),
    ("a zero rho", {"hold_rho": 0}, r"recoveries\.held\.hold_rho: 0 is less than or equal to the minimum of 0"),
    ("layers of its own", {"layers": [1, 2]},
     r"recoveries\.held\.layers: not an option of method alignment-held; its options: .*hold_fraction"),
]


def study_config(recoveries):
    config = yaml.safe_load((REPO / "configs" / "controls.yaml").read_text())
    config["recoveries"] = recoveries
    config["study"] = [{"degradations": ["magnitude-50"], "recoveries": list(recoveries)}]
    return config


@pytest.mark.parametrize("option, pattern", [(o, p) for _, o, p in HELD_CONFIG_ERRORS],
                         ids=[name for name, _, _ in HELD_CONFIG_ERRORS])
def test_a_bad_held_option_is_an_error_naming_the_key(option, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_config(study_config({"held": {**HELD, **option}}),
                        load_schema(REPO / "workflow/schemas/config.schema.yaml"))


def test_a_held_option_on_another_method_is_an_error_and_the_spec_carries_the_measured_layers():
    schema = load_schema(REPO / "workflow/schemas/config.schema.yaml")
    with pytest.raises(ConfigError, match=r"recoveries\.kd\.hold_fraction: not an option of method kd"):
        validate_config(study_config({"kd": {"method": "kd", "steps": 2, "lr": 1e-4, "hold_fraction": 0.5}}), schema)
    config = study_config({"held": {**HELD, "hold_fraction": 0.5}})
    config["measure"]["alignment_layers"] = [2, 9]
    spec, _ = recovery_spec(validate_config(config, schema), "held")
    assert spec["alignment_layers"] == [2, 9] and spec["hold_fraction"] == 0.5
    assert spec["hold_reference"] == "headroom" and spec["hold_baseline"] == "batch"


def test_the_held_defaults_have_one_home_the_schema():
    """Issue 31: the hold_* defaults lived in three places (a config dict, the registry, schema comments that
    disagreed). The schema is their one home: validation fills them in, nothing in the library restates them."""
    schema = load_schema(REPO / "workflow/schemas/config.schema.yaml")
    assert recovery_defaults("alignment-held", schema) == {
        "hold_fraction": 0.0, "hold_reference": "headroom", "hold_baseline": "batch", "hold_calibration_batches": 4,
        "hold_rho": 10.0}
    config = validate_config(study_config({"held": dict(HELD), "kd": {"method": "kd", "steps": 4, "lr": 1e-4}}),
                             schema)
    assert config["recoveries"]["held"]["hold_rho"] == 10.0
    assert not any(key.startswith("hold_") for key in config["recoveries"]["kd"])
    restated = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "realign").rglob("*.py"))
                for n, line in enumerate(path.read_text().splitlines(), 1)
                if re.search(r"""["']hold_\w+["']\s*:\s*[\d"']|get\(\s*["']hold_\w+["']\s*,""", line)
                or "HELD_DEFAULTS" in line]
    assert restated == []
