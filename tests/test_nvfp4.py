import pytest
import torch
from torch.nn.utils import parametrize

from realign.degrade.nvfp4 import (E2M1_VALUES, STENVFP4, nvfp4_fake_quantize, nvfp4_quantize_model, nvfp4_scales,
                                   nvfp4_violation)
from realign.degrade.quantize import rtn_quantize
from realign.degrade.targets import block_linears


def decode_e2m1(code: int) -> float:
    """FP4 E2M1 from its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit; subnormal when exponent == 0."""
    sign, exponent, mantissa = code >> 3, (code >> 1) & 0b11, code & 1
    magnitude = 2.0 ** (1 - 1) * (mantissa / 2) if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return -magnitude if sign else magnitude


def gaussian(rows=64, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def brute_force_nvfp4(weight, block_scale, global_scale):
    """Nearest of the 15 distinct E2M1 values by exhaustive search; ties go to the code with mantissa bit 0."""
    codes = list(range(16))
    values = torch.tensor([decode_e2m1(c) for c in codes], dtype=torch.float64)
    scale = (block_scale * global_scale)[..., None]  # float32, as in the format
    r = weight.reshape(weight.shape[0], block_scale.shape[1], -1) / scale
    distance = (r.to(torch.float64)[..., None] - values).abs()
    best = distance.min(dim=-1, keepdim=True).values
    # among the nearest codes, prefer an even one (mantissa 0); ±0 both give 0
    penalty = torch.tensor([c & 1 for c in codes], dtype=torch.float64)
    choice = torch.where(distance == best, penalty, torch.inf).argmin(dim=-1)
    q = values[choice].to(torch.float32)
    return (q * scale).reshape(weight.shape)


def test_e2m1_table_matches_bit_definition():
    decoded = [decode_e2m1(c) for c in range(16)]
    assert E2M1_VALUES.tolist() == decoded[:8] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert decoded[8:] == [-v for v in decoded[:8]]
    assert sorted({abs(v) for v in decoded}) == E2M1_VALUES.tolist()
    assert len(set(decoded)) == 15  # +0 and -0 coincide


def test_block_scales_are_e4m3_and_positive():
    w = gaussian() * torch.logspace(-4, 0, 64)[:, None]  # rows of very different magnitudes
    block_scale, global_scale = nvfp4_scales(w)
    assert block_scale.shape == (64, 16) and block_scale.dtype == torch.float32
    assert global_scale.shape == () and global_scale.dtype == torch.float32
    assert torch.equal(block_scale.to(torch.float8_e4m3fn).to(torch.float32), block_scale)
    assert (block_scale > 0).all() and block_scale.max() == 448
    # amax / (6 * 448), rounded up to 18 significant bits (documented deviation making dequantization exact)
    standard = w.abs().max() / (6 * 448)
    assert standard <= global_scale <= standard * (1 + 2**-17)
    mantissa, _ = torch.frexp(global_scale.double())
    assert mantissa * 2**18 == torch.round(mantissa * 2**18)


def test_fake_quantized_weights_lie_on_the_grid_and_block_max_maps_to_6():
    w = gaussian()
    block_scale, global_scale = nvfp4_scales(w)
    q = nvfp4_fake_quantize(w, block_scale, global_scale)
    assert q.shape == w.shape and q.dtype == w.dtype
    codes = (q.reshape(64, 16, 16) / (block_scale * global_scale)[..., None])
    assert set(codes.abs().unique().tolist()) <= set(E2M1_VALUES.tolist())
    assert nvfp4_violation(q, block_scale, global_scale) == 0
    assert nvfp4_violation(w, block_scale, global_scale) > 0.1  # the original weights are off the grid
    # A normal E4M3 scale (>= 2^-6) is within 1/16 (relative) of block_amax / 6 / global_scale, so each block's
    # amax lands in 6 * [16/17, 16/15] = [5.65, 6.4] before rounding and therefore maps to exactly 6.
    assert (block_scale >= 2**-6).all()
    ratio = w.reshape(64, 16, 16).abs().amax(-1) / (block_scale * global_scale)
    assert ratio.min() >= 6 * 16 / 17 - 1e-5 and ratio.max() <= 6 * 16 / 15 + 1e-5
    assert torch.equal(codes.abs().amax(-1), torch.full((64, 16), 6.0))


def test_rounding_is_nearest_with_ties_to_even():
    # Real scales on random weights.
    w = gaussian(seed=1)
    block_scale, global_scale = nvfp4_scales(w)
    assert torch.equal(nvfp4_fake_quantize(w, block_scale, global_scale),
                       brute_force_nvfp4(w, block_scale, global_scale))
    # Unit scales on a fine lattice of multiples of 1/8: every midpoint (tie) occurs, and values beyond 6.
    lattice = (torch.arange(-64, 65, dtype=torch.float32) / 8).repeat(2)[:256].reshape(16, 16)
    ones, one = torch.ones(16, 1), torch.tensor(1.0)
    assert torch.equal(nvfp4_fake_quantize(lattice, ones, one), brute_force_nvfp4(lattice, ones, one))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 2)
    signed = torch.cat([ties[:8], -ties[8:]])[None]
    expected = torch.tensor([0, 1, 1, 2, 2, 4, 4, 6] + [0, -1, -1, -2, -2, -4, -4, -6], dtype=torch.float32)
    assert torch.equal(nvfp4_fake_quantize(signed, ones[:1], one)[0], expected)


def test_matches_the_unrounded_modelopt_recipe_almost_everywhere():
    # The only deviation from ModelOpt: the global scale is rounded up to 18 significant bits (< 2^-17 relative).
    w = gaussian(256, 1024, seed=0)
    block_scale, global_scale = nvfp4_scales(w)
    standard_global = w.abs().max() / (6 * 448)
    block_amax = w.reshape(256, 64, 16).abs().amax(-1)
    standard_block = (block_amax / (6 * standard_global)).clamp(2**-9, 448).to(torch.float8_e4m3fn).float()
    ours = nvfp4_fake_quantize(w, block_scale, global_scale) / (block_scale * global_scale).repeat_interleave(16, 1)
    standard = brute_force_nvfp4(w, standard_block, standard_global) \
        / (standard_block * standard_global).repeat_interleave(16, 1)
    differing_scales = int((block_scale != standard_block).sum())
    differing_codes = int((ours != torch.round(standard * 2) / 2).sum())  # float32 ulps off the standard's codes
    print(f"vs unrounded recipe: {differing_scales}/{block_scale.numel()} block scales, "
          f"{differing_codes}/{w.numel()} codes differ")
    assert differing_scales <= 0.001 * block_scale.numel() and differing_codes <= 1e-4 * w.numel()


def test_fake_quantization_is_idempotent():
    for dtype in (torch.float32, torch.bfloat16):
        w = gaussian(seed=2).to(dtype)
        block_scale, global_scale = nvfp4_scales(w)
        once = nvfp4_fake_quantize(w, block_scale, global_scale)
        assert once.dtype == dtype
        assert torch.equal(nvfp4_fake_quantize(once, block_scale, global_scale), once)
        assert nvfp4_violation(once, block_scale, global_scale) == 0


def test_violation_counts_out_of_range():
    w = gaussian(seed=3)
    block_scale, global_scale = nvfp4_scales(w)
    q = nvfp4_fake_quantize(w, block_scale, global_scale)
    q[0, 0] = 8 * block_scale[0, 0] * global_scale  # 2 beyond 6, where the spacing is 2: one step
    assert nvfp4_violation(q, block_scale, global_scale) == pytest.approx(1.0, rel=1e-5)


def test_ste_forward_on_grid_and_gradient_straight_through():
    w = gaussian(8, 32, seed=4).requires_grad_()
    block_scale, global_scale = nvfp4_scales(w)
    out = STENVFP4(block_scale, global_scale)(w)
    assert torch.equal(out, nvfp4_fake_quantize(w.detach(), block_scale, global_scale))
    upstream = torch.randn(8, 32)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_training_through_ste_keeps_weights_on_grid(tiny):
    model, tokenizer = tiny
    constraint, tensors = nvfp4_quantize_model(model, key="degrade.nvfp4")
    layers = block_linears(model)
    assert constraint == {"kind": "fp4-grid", "scheme": "nvfp4", "block_size": 16, "modules": sorted(layers)}
    assert set(tensors) == {f"{n}.{s}" for n in layers for s in ("block_scale", "global_scale")}
    before = {n: l.weight.detach().clone() for n, l in layers.items()}
    for name, linear in layers.items():
        assert nvfp4_violation(linear.weight, tensors[f"{name}.block_scale"], tensors[f"{name}.global_scale"]) == 0
        parametrize.register_parametrization(
            linear, "weight", STENVFP4(tensors[f"{name}.block_scale"], tensors[f"{name}.global_scale"]))
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    for linear in layers.values():
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    changed = 0
    for name, linear in layers.items():
        assert nvfp4_violation(linear.weight, tensors[f"{name}.block_scale"], tensors[f"{name}.global_scale"]) == 0
        changed += int((linear.weight != before[name]).sum())
    assert changed > 0, "training changed nothing"


def test_nvfp4_error_lies_between_3_and_8_bit_rtn():
    w = gaussian(256, 1024, seed=5)

    def relative_error(q):
        return float((q - w).norm() / w.norm())

    nvfp4 = relative_error(nvfp4_fake_quantize(w, *nvfp4_scales(w)))
    rtn = {(b, g): relative_error(rtn_quantize(w, b, g)) for b in (3, 4, 8) for g in (16, 64)}
    print(f"relative error: nvfp4 {nvfp4:.4f}, " + ", ".join(f"rtn{b}/g{g} {e:.4f}" for (b, g), e in rtn.items()))
    for g in (16, 64):
        assert rtn[(8, g)] < nvfp4 < rtn[(3, g)]


def test_all_zero_blocks_and_tensors_stay_zero():
    w = gaussian(4, 64, seed=6)
    w[1, 16:32] = 0
    block_scale, global_scale = nvfp4_scales(w)
    assert block_scale[1, 1] == 1.0  # documented placeholder scale for an all-zero block
    q = nvfp4_fake_quantize(w, block_scale, global_scale)
    assert torch.isfinite(q).all() and (q[1, 16:32] == 0).all()
    assert nvfp4_violation(q, block_scale, global_scale) == 0
    zeros = torch.zeros(4, 32)
    block_scale, global_scale = nvfp4_scales(zeros)
    assert global_scale == 1.0 and (block_scale == 1.0).all()
    assert torch.equal(nvfp4_fake_quantize(zeros, block_scale, global_scale), zeros)
    # A block far below the tensor's amax gets the smallest E4M3 subnormal scale 2^-9, never a zero scale.
    tiny_block = torch.cat([torch.full((1, 16), 1.0), torch.full((1, 16), 1e-9)], dim=1)
    block_scale, global_scale = nvfp4_scales(tiny_block)
    assert block_scale[0, 1] == 2**-9
    assert torch.isfinite(nvfp4_fake_quantize(tiny_block, block_scale, global_scale)).all()


def test_in_features_not_divisible_by_16_is_rejected(tiny):
    with pytest.raises(ValueError, match="in_features=40 is not divisible by the NVFP4 block size 16"):
        nvfp4_scales(torch.randn(4, 40))
    model, _ = tiny
    name, linear = next(iter(block_linears(model).items()))
    module_path, _, attr = name.rpartition(".")
    model.get_submodule(module_path).register_module(attr, torch.nn.Linear(24, linear.out_features, bias=False))
    with pytest.raises(ValueError, match=rf"^degrade\.nvfp4\({name}\) in_features=24 is not divisible"):
        nvfp4_quantize_model(model, key="degrade.nvfp4")
