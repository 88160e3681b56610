"""bitsandbytes quantization on CPU and the QLoRA recovery it implies: a frozen base plus LoRA adapters."""

import json

import pytest
import torch

from realign.degrade import constraints
from realign.degrade.bnb import base_digests, frozen_constraint, load_quantized, quantized_modules
from realign.degrade.targets import block_linears
from realign.measure.divergence import mean_nll
from realign.models.artifact import load_artifact, save_artifact
from realign.models.record import ArtifactRecord
from realign.recover.losses import cross_entropy
from realign.training import TrainConfig, train


def _examples(tokenizer, n=4, seq_len=24):
    from realign.data.sequences import packed_chunks

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40
    return packed_chunks(tokenizer, [text], seq_len, max_chunks=n)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_quantizes_every_block_linear_and_changes_the_function(tiny_model_dir, quant_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = load_quantized(tiny_model_dir, quant_type)
    assert sorted(quantized_modules(model)) == sorted(block_linears(reference))
    examples = _examples(tokenizer)
    base, damaged = (mean_nll(m, examples, tokenizer.pad_token_id)["nll"] for m in (reference, model))
    assert damaged != pytest.approx(base, abs=1e-6)  # quantization really happened ...
    assert abs(damaged - base) < 0.5  # ... and the model is still the same model


def test_unknown_quant_type_names_the_key(tiny_model_dir):
    with pytest.raises(ValueError, match="degradations.q.quant_type must be one of nf4, fp4, int8"):
        load_quantized(tiny_model_dir, "nf3", key="degradations.q.")


def test_qlora_trains_adapters_keeps_the_base_and_reloads(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_quantized(tiny_model_dir, "nf4")
    constraint = frozen_constraint(model, "nf4", lora_r=4, lora_alpha=8)
    damaged_dir = save_artifact(model, tokenizer, tmp_path / "damaged", ArtifactRecord("tiny", constraint=constraint))
    model, _, _ = load_artifact(damaged_dir)
    assert base_digests(model) == constraint["digests"]  # the saved quantized base reloads bit for bit

    student = constraints.attach(model, constraint, {}, seed=0)
    examples = _examples(tokenizer)
    before = mean_nll(student, examples, tokenizer.pad_token_id)["nll"]
    curve = train(student, examples, lambda m, b: cross_entropy(m(input_ids=b["input_ids"]).logits, b["labels"]),
                  TrainConfig(steps=4, lr=1e-2, batch_size=2), tokenizer.pad_token_id)
    after = mean_nll(student, examples, tokenizer.pad_token_id)["nll"]
    assert after < before and len(curve) == 4
    assert constraints.check(student, constraint, {})["ok"]

    recovered_dir = save_artifact(student, tokenizer, tmp_path / "recovered",
                                  ArtifactRecord("tiny", constraint=constraint), frozen_base_dir=damaged_dir)
    assert (recovered_dir / "adapter" / "adapter_model.safetensors").is_file()
    # peft saves its target set in hash order, which changes between processes; the artifact's bytes must not
    targets = json.loads((recovered_dir / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) > 2 and targets == sorted(targets)
    reloaded, _, _ = load_artifact(recovered_dir)
    assert constraints.check(reloaded, constraint, {})["ok"]
    assert mean_nll(reloaded, examples, tokenizer.pad_token_id)["nll"] == pytest.approx(after, abs=1e-3)


def test_a_changed_base_weight_is_caught(tiny_model_dir):
    model = load_quantized(tiny_model_dir, "int8")
    constraint = frozen_constraint(model, "int8", lora_r=4, lora_alpha=8)
    name, module = next(iter(quantized_modules(model).items()))
    with torch.no_grad():
        module.weight.data[0, 0] += 1
    with pytest.raises(constraints.ConstraintViolation, match=f"{name}: the frozen quantized base weights changed"):
        constraints.check(model, constraint, {})


def test_qlora_gradients_equal_those_of_the_dequantized_fp32_model(tiny_model_dir):
    # bitsandbytes warns that one of its CPU kernels has no autograd formula; check the LoRA gradients against
    # an independent formulation: ordinary fp32 Linear layers holding the dequantized 4-bit weights.
    import bitsandbytes.functional as bnb_functional
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from realign.degrade.bnb import attach_lora

    quantized = load_quantized(tiny_model_dir, "nf4")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference_layers = block_linears(reference)
    with torch.no_grad():
        for name, module in quantized_modules(quantized).items():
            weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            reference_layers[name].weight.copy_(weight.float())
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(quantized(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)

    lora = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    student = attach_lora(quantized, lora, seed=0)
    for p in reference.parameters():
        p.requires_grad_(False)
    twin = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules="all-linear"))
    lora_params = [dict((n, p) for n, p in m.named_parameters() if "lora_" in n) for m in (student, twin)]
    assert lora_params[0].keys() == lora_params[1].keys()
    with torch.no_grad():
        for name, param in lora_params[0].items():
            if "lora_B" in name:  # B starts at zero; make it nonzero so gradients reach A and earlier layers
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
            lora_params[1][name].copy_(param)
    for model in (student, twin):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    for name, param in lora_params[0].items():
        expected = lora_params[1][name].grad
        assert torch.allclose(param.grad, expected, rtol=1e-4, atol=1e-7), name
