import pytest
import torch

from realign.data.sequences import packed_chunks
from realign.degrade import constraints
from realign.degrade.prune import magnitude_mask, prune_model
from realign.degrade.quantize import grid_violation, levels_per_group, quantize_model, rtn_grid, rtn_quantize
from realign.degrade.targets import block_linears
from realign.measure.divergence import mean_nll
from realign.recover.losses import cross_entropy
from realign.training import TrainConfig, train


def corpus_examples(tokenizer, n=8, seq_len=32):
    from realign.data.corpora import corpus_files, read_texts, stdlib_root

    texts = read_texts(corpus_files(stdlib_root())[:200], 8 * n * seq_len)
    return packed_chunks(tokenizer, texts, seq_len, max_chunks=n)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_has_at_most_2_pow_bits_levels_per_group(bits):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    q = rtn_quantize(w, bits, 32)
    assert levels_per_group(q, 32) <= 2**bits
    assert levels_per_group(w, 32) == 32  # the unquantized weights really had more levels
    scale, zero = rtn_grid(w, bits, 32)
    assert grid_violation(q, scale, zero, bits) < 1e-6
    assert grid_violation(w, scale, zero, bits) > 0.1  # the original weights are off the grid


def test_grid_check_survives_rounding_ties():
    # A group whose min sits exactly half a step off a grid point: re-fitting the grid to the quantized weights
    # would give a different grid, so the check must use the saved grid, not a re-fitted one.
    w = torch.tensor([[-2.5, -1.0, 0.0, 4.5] * 8])
    scale, zero = rtn_grid(w, 3, 32)
    from realign.degrade.quantize import fake_quantize

    q = fake_quantize(w, scale, zero, 3)
    assert grid_violation(q, scale, zero, 3) < 1e-9


def test_rtn_error_shrinks_with_more_bits():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    errors = [float((rtn_quantize(w, b, 64) - w).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4


def test_rtn_rejects_group_size_that_does_not_divide_width():
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        rtn_quantize(torch.randn(4, 64), 4, 48)
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        rtn_quantize(torch.randn(4, 64), 0, 32)


def test_magnitude_mask_has_exact_sparsity_and_prunes_smallest():
    w = torch.randn(20, 50, generator=torch.Generator().manual_seed(0))
    mask = magnitude_mask(w, 0.3)
    assert int((~mask).sum()) == 300
    assert w[~mask].abs().max() <= w[mask].abs().min()
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        magnitude_mask(w, 1.5)


@pytest.fixture(scope="module")
def trained_tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model after a short fit to Python source, so its weights carry something to damage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = corpus_examples(tokenizer, n=1000, seq_len=64)
    train(model, examples[:960], lambda m, b: m(**b).loss, TrainConfig(steps=120, lr=5e-3, batch_size=8, warmup_steps=10),
          tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("trained") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, examples[960:]


def test_damage_grows_with_severity(trained_tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, heldout = trained_tiny
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def loss_after(damage):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        damage(model)
        return mean_nll(model, heldout, tokenizer.pad_token_id)["nll"]

    base = loss_after(lambda m: None)
    by_bits = [loss_after(lambda m, b=b: quantize_model(m, b, 32)) for b in (8, 4, 3, 2)]
    by_sparsity = [loss_after(lambda m, s=s: prune_model(m, s)) for s in (0.1, 0.5, 0.9)]
    assert abs(by_bits[0] - base) < 0.01
    assert by_bits == sorted(by_bits) and by_bits[-1] > base + 0.005
    assert by_sparsity == sorted(by_sparsity) and by_sparsity[-1] > base + 0.05


def _train_a_few_steps(model, tokenizer, steps=2):
    examples = corpus_examples(tokenizer)
    cfg = TrainConfig(steps=steps, lr=1e-2, batch_size=2)
    return train(model, examples, lambda m, b: cross_entropy(m(input_ids=b["input_ids"]).logits, b["labels"]), cfg,
                 tokenizer.pad_token_id)


def test_quantized_model_stays_on_grid_after_training(tiny):
    model, tokenizer = tiny
    constraint, grids = quantize_model(model, 3, 32)
    before = {n: l.weight.detach().clone() for n, l in block_linears(model).items()}
    constraints.attach(model, constraint, grids)
    _train_a_few_steps(model, tokenizer)
    constraints.detach(model)
    after = block_linears(model)
    assert any(not torch.equal(before[n], after[n].weight) for n in before), "training changed nothing"
    assert constraints.check(model, constraint, grids)["ok"]
    assert all(levels_per_group(l.weight, 32) <= 8 for l in after.values())


def test_pruned_model_keeps_its_mask_after_training(tiny):
    model, tokenizer = tiny
    constraint, masks = prune_model(model, 0.5)
    constraints.attach(model, constraint, masks)
    _train_a_few_steps(model, tokenizer)
    constraints.detach(model)
    assert constraints.check(model, constraint, masks)["ok"]
    for name, linear in block_linears(model).items():
        assert torch.all(linear.weight[~masks[name]] == 0)
        assert torch.any(linear.weight[masks[name]] != 0)


def test_unconstrained_training_breaks_the_constraint_and_check_says_so(tiny):
    model, tokenizer = tiny
    constraint, masks = prune_model(model, 0.5)
    _train_a_few_steps(model, tokenizer)  # no attach: pruned weights regrow
    with pytest.raises(constraints.ConstraintViolation, match="pruned weights are no longer zero"):
        constraints.check(model, constraint, masks)
    quantized, tok = tiny
    grid, grids = quantize_model(quantized, 2, 32)
    _train_a_few_steps(quantized, tok)
    with pytest.raises(constraints.ConstraintViolation, match="grid"):
        constraints.check(quantized, grid, grids)


def test_magnitude_n_of_m_keeps_its_pattern_through_training(tiny):
    from realign.degrade.nm import nm_violations

    model, tokenizer = tiny
    constraint, masks = prune_model(model, pattern="2:4")
    assert constraint["pattern"] == "2:4" and constraint["achieved_sparsity"] == 0.5
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert torch.all(groups.sum(-1) == 2), name  # exactly 2 kept in every 4 consecutive inputs
        weight = block_linears(model)[name].weight.detach().abs().reshape(mask.shape[0], -1, 4)
        kept_min = torch.where(groups, weight, torch.inf).amin(-1)
        pruned_max = torch.where(~groups, weight, -torch.inf).amax(-1)
        assert torch.all(pruned_max <= kept_min)  # within each group the 2 largest |w| survive
    constraints.attach(model, constraint, masks)
    _train_a_few_steps(model, tokenizer)
    constraints.detach(model)
    assert constraints.check(model, constraint, masks)["ok"]
    assert all(nm_violations(layer.weight, 2, 4) == 0 for layer in block_linears(model).values())


def test_pruning_takes_exactly_one_of_sparsity_and_pattern(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="give exactly one of degradations.p.sparsity .* and degradations.p.pattern"):
        prune_model(model, 0.5, pattern="2:4", key="degradations.p.")
    with pytest.raises(ValueError, match="degradations.p.sparsity must be a number strictly between 0 and 1"):
        prune_model(model, 1.0, key="degradations.p.")


def test_nvfp4_model_stays_on_its_grid_through_constraint_hooks(tiny):
    from realign.degrade.nvfp4 import nvfp4_quantize_model

    model, tokenizer = tiny
    constraint, tensors = nvfp4_quantize_model(model)
    before = {n: l.weight.detach().clone() for n, l in block_linears(model).items()}
    constraints.attach(model, constraint, tensors)
    _train_a_few_steps(model, tokenizer)
    constraints.detach(model)
    assert any(not torch.equal(before[n], l.weight) for n, l in block_linears(model).items())
    assert constraints.check(model, constraint, tensors)["max_grid_violation_steps"] == 0
    _train_a_few_steps(model, tokenizer)  # without the hooks the weights leave the grid, and the check says so
    with pytest.raises(constraints.ConstraintViolation, match="off their saved nvfp4 grid"):
        constraints.check(model, constraint, tensors)


def test_calibration_windows_come_from_the_distill_records_in_chat_format(tiny):
    from realign.degrade.stage import calibration_ids

    _, tokenizer = tiny
    records = [{"instruction": f"Explain item {i}.", "reference": "It is a thing that does things. " * 5}
               for i in range(6)]
    ids = calibration_ids(tokenizer, records, n_sequences=3, seq_len=32)
    assert ids.shape == (3, 32)
    first_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Explain item 0."}], tokenize=False,
                                                 add_generation_prompt=True)
    assert tokenizer.decode(ids[0]).startswith(first_prompt)
    with pytest.raises(ValueError, match="fewer than data.calibration asks for"):
        calibration_ids(tokenizer, records, n_sequences=100, seq_len=32)
