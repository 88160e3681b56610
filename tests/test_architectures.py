"""Every damage method on every decoder architecture transformers ships in the study's families: Llama, GPT-2
(Conv1D, weights stored [in, out]), OPT, GPT-NeoX, Qwen2 and Mixtral (stacked 3-D expert weights).

Never silently wrong: each damage touches the fraction of the targeted weights it claims, the constraint check
covers every target (and fails when one weight leaves its constraint), constraints survive a training step
through their parametrizations, and what cannot be supported is refused with the method and module named."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from realign.degrade import constraints
from realign.degrade.calibration import decoder_layers, sequential_layers, targets_by_layer
from realign.degrade.coverage import DamageNotApplied, check_supported, check_supported_config, damage_report, snapshot
from realign.degrade.registry import apply_method
from realign.degrade.targets import damage_targets, untargeted_matrices
from realign.models.tiny import ARCHITECTURES, tiny_config

VOCAB = 512
CONFIGS = {arch: (lambda arch=arch: tiny_config(arch, vocab_size=VOCAB, max_positions=64)) for arch in ARCHITECTURES}
# Damage targets per architecture, by kind: (linear, conv1d, experts).
KINDS = {"llama": (14, 0, 0), "gpt2": (0, 8, 0), "opt": (12, 0, 0), "gpt_neox": (8, 0, 0), "qwen2": (14, 0, 0),
         "mixtral": (8, 0, 16)}
METHODS = {
    "rtn": {"method": "rtn", "bits": 3, "group_size": 32},
    "gptq": {"method": "gptq", "bits": 3, "group_size": 32},
    "nvfp4": {"method": "nvfp4"},
    "magnitude": {"method": "magnitude", "sparsity": 0.5},
    "magnitude-2:4": {"method": "magnitude", "pattern": "2:4"},
    "wanda": {"method": "wanda", "sparsity": 0.3},
    "wanda-2:4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.6},
    "sparsegpt-1:4": {"method": "sparsegpt", "pattern": "1:4"},
}


@pytest.fixture(scope="module")
def models():
    built = {}
    for arch, config in CONFIGS.items():
        torch.manual_seed(0)
        built[arch] = AutoModelForCausalLM.from_config(config()).eval()
    return built


def calibration(n=8, seq_len=32, seed=0):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _off_constraint(model, constraint, tensors, name):
    """Move one weight of target `name` off its constraint, through the target's [out, in] view."""
    target = damage_targets(model)[name]
    with torch.no_grad():
        if constraint["kind"] == "mask":
            pruned = (~tensors[name]).nonzero()[0]
            target.weight[pruned[0], pruned[1]] = 1.0
        else:
            largest = target.weight.abs().argmax()
            row, col = divmod(int(largest), target.in_features)
            target.weight[row, col] *= 0.93


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_method_damages_every_target_of_every_architecture(models, arch, method):
    model = copy.deepcopy(models[arch])
    params = METHODS[method]
    targets = check_supported(model, params, key=f"degradations.{method}.")
    counts = [sum(t.kind == kind for t in targets.values()) for kind in ("linear", "conv1d", "experts")]
    assert tuple(counts) == KINDS[arch]
    before = snapshot(model)
    constraint, tensors = apply_method(model, params, calibration(), key=f"degradations.{method}.")
    check = constraints.check(model, constraint, tensors)
    assert check["ok"] and check["modules_checked"] == len(targets) > 0
    report = damage_report(model, constraint, check, before)
    print(f"{arch} {method}: touched {report['touched_fraction']:.4f} changed {report['changed_fraction']:.4f}")
    if constraint["kind"] == "mask":
        expected = constraint["sparsity"]
        assert report["touched_fraction"] == pytest.approx(expected, abs=0.5 / 64 + 1e-9), report
        for name, target in targets.items():  # every target, not only on average
            assert float((target.weight == 0).float().mean()) == pytest.approx(expected, abs=0.5 / 64 + 1e-9), name
    else:
        assert report["touched_fraction"] == 1.0 and report["changed_fraction"] > 0.9, report
    assert report["untargeted_matrices"] == (["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
                                             if arch == "mixtral" else [])
    # The check covers the special kinds too: a weight moved off its constraint fails it.
    special = next(name for name, t in targets.items() if t.kind == ("experts" if arch == "mixtral" else
                                                                      "conv1d" if arch == "gpt2" else "linear"))
    _off_constraint(model, constraint, tensors, special)
    with pytest.raises(constraints.ConstraintViolation, match=special.replace(".", r"\.")):
        constraints.check(model, constraint, tensors)


@pytest.mark.parametrize("method", ["rtn", "nvfp4", "magnitude-2:4"])
@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "opt"])
def test_constraints_hold_through_a_training_step_on_every_kind(models, arch, method):
    model = copy.deepcopy(models[arch])
    constraint, tensors = apply_method(model, METHODS[method], None, key="")
    constraints.attach(model, constraint, tensors)
    baked = constraints.baked_copy(model)
    assert constraints.check(baked, constraint, tensors)["ok"]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = calibration(n=2, seq_len=16)
    model(input_ids=ids, labels=ids).loss.backward()
    # Gradients reach the latent weights of every kind through its parametrization.
    with_grad = {t.kind for t in damage_targets(model).values()
                 if getattr(t.module.parametrizations, t.param).original.grad.abs().sum() > 0}
    assert with_grad == KINDS_TRAINED[arch]
    optimizer.step()
    constraints.detach(model)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert any(not torch.equal(t.weight, damage_targets(baked)[name].weight)
               for name, t in damage_targets(model).items())
    assert constraints.check(model, constraint, tensors)["modules_checked"] == len(damage_targets(model))


KINDS_TRAINED = {"gpt2": {"conv1d"}, "opt": {"linear"}, "mixtral": {"linear", "experts"}}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_layer_discovery_and_sequential_calibration_reproduce_the_forward(models, arch):
    model = copy.deepcopy(models[arch])
    layers = decoder_layers(model)
    assert len(layers) == 2
    assert sum(len(group) for group in targets_by_layer(model)) == len(damage_targets(model))
    ids = calibration(n=5)
    expected = []
    handle = layers[-1].register_forward_hook(lambda m, a, out: expected.append(out[0] if isinstance(out, tuple)
                                                                               else out))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    recomputed = []
    for index, layer, run in sequential_layers(model, ids, batch_size=2):
        run()
        if index == len(layers) - 1:
            handle = layer.register_forward_hook(lambda m, a, out: recomputed.append(out[0] if isinstance(out, tuple)
                                                                                     else out))
    handle.remove()
    torch.testing.assert_close(torch.cat(recomputed), expected[0], atol=1e-5, rtol=0)


def test_every_expert_sees_its_own_routed_tokens(models):
    from realign.degrade.calibration import _input_hooks, collect_input_sq_norms

    model = copy.deepcopy(models["mixtral"])
    group = targets_by_layer(model)[0]
    counts = {}
    routed = torch.zeros(4)

    def count_routed(module, args, out):  # the router returns (logits, weights, expert indices)
        routed.add_(torch.bincount(out[2].flatten(), minlength=4))

    layers = sequential_layers(model, calibration())
    _, _, run = next(layers)
    handle = model.model.layers[0].mlp.gate.register_forward_hook(count_routed)
    with _input_hooks(group, lambda name, x: counts.__setitem__(name, counts.get(name, 0) + x.shape[0])):
        run()
    handle.remove()
    norms = collect_input_sq_norms(group, run)
    layers.close()
    for expert in range(4):
        assert counts[f"model.layers.0.mlp.experts.gate_up_proj.{expert}"] == routed[expert] > 0
        assert counts[f"model.layers.0.mlp.experts.down_proj.{expert}"] == routed[expert]
    assert norms["model.layers.0.mlp.experts.down_proj.0"].shape == (64,)
    assert model.config._experts_implementation != "eager"  # only the capture ran the per-expert loop
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__


def test_check_over_zero_modules_and_damage_without_targets_raise(models):
    from realign.degrade.prune import prune_model

    with pytest.raises(constraints.ConstraintViolation, match="lists no module"):
        constraints.check(models["llama"], {"kind": "mask", "scheme": "magnitude", "modules": []}, {})
    with pytest.raises(constraints.ConstraintViolation, match="lists no module"):
        constraints.attach(models["llama"], {"kind": "grid", "bits": 3, "modules": []}, {})
    empty = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no weight matrix to prune"):
        prune_model(empty, 0.5, key="degradations.p.")
    with pytest.raises(ValueError, match=r"degradations\.p\.method: magnitude finds no weight matrix"):
        check_supported(empty, {"method": "magnitude"}, key="degradations.p.")


def test_a_constraint_that_skipped_targets_fails_the_check(models):
    """An artifact damaged by the old nn.Linear-only code (GPT-2: nothing; Mixtral: no expert) fails its check."""
    model = copy.deepcopy(models["mixtral"])
    constraint, masks = apply_method(model, METHODS["magnitude"], None, key="")
    linear_only = {**constraint, "modules": [n for n in constraint["modules"] if ".experts." not in n]}
    with pytest.raises(constraints.ConstraintViolation, match="covers 8 of the model's 24 weight matrices"):
        constraints.check(model, linear_only, masks)
    before = snapshot(model)
    check = {"modules_checked": 8}
    with pytest.raises(DamageNotApplied, match="covered 8 of 24"):
        damage_report(model, constraint, check, before)
    gpt2 = copy.deepcopy(models["gpt2"])
    constraint, grids = apply_method(gpt2, METHODS["rtn"], None, key="")
    with pytest.raises(DamageNotApplied, match="changed none"):
        damage_report(gpt2, constraint, constraints.check(gpt2, constraint, grids), snapshot(gpt2))


def test_unsupported_combinations_are_refused_by_method_and_module(models):
    with pytest.raises(ValueError, match=r"degradations\.q\.method: bnb cannot quantize stacked MoE expert weights "
                                         r"\(model\.layers\.0\.mlp\.experts\.down_proj"):
        check_supported(models["mixtral"], {"method": "bnb"}, key="degradations.q.")
    check_supported_config(CONFIGS["gpt2"](), {"method": "gptq"})  # from a config alone, no weights
    with pytest.raises(ValueError, match="bnb cannot quantize"):
        check_supported_config(CONFIGS["mixtral"]().to_dict(), {"method": "bnb"})

    class Stacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2, 4, 4))

    with pytest.raises(ValueError, match=r"block \(Stacked\) holds weight of unknown layout"):
        damage_targets(torch.nn.ModuleDict({"block": Stacked()}))


def test_bnb_quantizes_gpt2_conv1d_layers(models, tmp_path):
    pytest.importorskip("bitsandbytes")
    from realign.degrade.bnb import load_quantized
    from realign.degrade.stage import bnb_report

    models["gpt2"].save_pretrained(tmp_path)
    targets = check_supported(models["gpt2"], {"method": "bnb"})
    report = bnb_report(load_quantized(tmp_path, "nf4"), targets, key="")
    assert report["touched_fraction"] == 1.0 and report["targets"] == {"linear": 0, "conv1d": 8}
    with pytest.raises(DamageNotApplied, match="left 8 of 8"):
        bnb_report(models["gpt2"], targets, key="degradations.q.")


def test_the_degrade_stage_records_the_damage(models, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from realign.degrade.stage import degrade
    from realign.models.artifact import read_record, save_artifact
    from realign.models.record import ArtifactRecord

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer) <= VOCAB
    teacher = save_artifact(models["gpt2"], tokenizer, tmp_path / "teacher", ArtifactRecord("gpt2"))
    meta = degrade(teacher, tmp_path / "pruned", "gpt2", "p50", {"method": "magnitude", "sparsity": 0.5}, seed=0)
    saved = read_record(tmp_path / "pruned").damage
    assert saved == meta.damage and saved["targets"]["conv1d"] == 8
    assert saved["touched_fraction"] == pytest.approx(0.5, abs=1e-6) and saved["expected_fraction"] == 0.5
    assert meta.constraint_check["modules_checked"] == 8
