"""NVFP4 weight quantization by exact emulation (fake quantization), and its straight-through version for training.

Format (NVIDIA NVFP4, as used by Blackwell tensor cores and by CKA-QAD): every weight is an FP4 E2M1 value
(1 sign, 2 exponent bits with bias 1, 1 mantissa bit, no inf/NaN; magnitudes exactly {0, .5, 1, 1.5, 2, 3, 4, 6})
times an FP8 E4M3 scale shared by a block of 16 consecutive input features of one output row, times one FP32
scale per tensor.

Recipe, following NVIDIA TensorRT-Model-Optimizer's reference implementation
(modelopt/torch/quantization/qtensor/nvfp4_tensor.py: `get_weights_scaling_factor_2`,
`get_weights_scaling_factor`, `_cast_fp4`, `dequantize`); all arithmetic is float32, as on the hardware:

1. global_scale = amax(|W|) / (6 * 448)  (E2M1 max times E4M3 max), so the largest block scale is exactly 448,
   then rounded UP to 18 significant bits (one deviation from ModelOpt, relative change < 2^-17 = 7.6e-6, see
   below). An all-zero tensor gets global_scale = 1 (ModelOpt would divide by zero here; any positive works).
2. block_scale = block_amax / (6 * global_scale), clamped to [2^-9, 448] and cast to float8_e4m3fn
   (round to nearest, ties to even). 2^-9 is E4M3's smallest subnormal: without the clamp a block far below the
   tensor's amax would round to a zero scale. All-zero blocks get block_scale = 1 (as in ModelOpt), so nothing
   divides by zero and their weights stay 0. The scale is kept as float32 holding an exact E4M3 value.
3. q = round_to_nearest_E2M1(w / (block_scale * global_scale)), ties to even (to the code whose mantissa bit is 0,
   e.g. 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), saturating at +-6 (cvt.rn.satfinite semantics).
4. dequantized weight = q * (block_scale * global_scale), cast back to the weight's dtype.

Why 18 bits: the format's dequantized value is the real number q * block_scale * global_scale. q has 2
significant bits and an E4M3 scale 4, so with an 18-bit global scale both block_scale * global_scale (22 bits)
and q * block_scale * global_scale (24 bits) are exact in float32: a fake-quantized float32 weight IS an NVFP4
value, bit for bit, and weight / (block_scale * global_scale) is exactly an E2M1 value (losslessly packable to
codes). With an arbitrary 24-bit global scale the float32 product is off by up to an ulp (e.g. 5.9999995 instead
of 6). Rounding up keeps every block scale <= 448. Codes and scales differ from ModelOpt's only where a value lies
within ~1e-5 (relative) of a rounding boundary: measured on 256x1024 Gaussian matrices, 0-1 of 16384 block
scales and 0-7 of 262144 codes (<= 3e-5). (Underflow, for tensors with amax below ~1e-30, is not handled.)

Consequence of step 2: a normal E4M3 scale (>= 2^-6) is within a relative 1/16 of the exact block_amax / 6 /
global_scale, so each such block's largest magnitude lands at 6 * [16/17, 16/15] = [5.65, 6.4] before rounding,
which rounds (or saturates) to exactly 6. Only blocks whose scale is subnormal in E4M3 (block_amax below about
3.5e-5 of the tensor's amax) can end below 6.

As with RTN (realign.degrade.quantize), the scales are fixed when the model is quantized and saved with the
artifact: recovery moves weights between points of that grid (straight-through) and never re-fits it.
Fake quantization is idempotent with fixed scales: every dequantized value maps back to the same E2M1 code.
"""

from __future__ import annotations

import functools

import torch

from realign.degrade.targets import damage_targets

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
# Significant bits kept in the global scale, so that dequantization is exact in float32. 24 (float32's own
# precision) makes the rounding a no-op and gives ModelOpt's recipe unchanged.
GLOBAL_SCALE_BITS = 18
NVFP4_BLOCK_SIZE = 16

# The 8 non-negative E2M1 magnitudes, indexed by their 3-bit code (exponent bits, mantissa bit).
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Midpoints between consecutive magnitudes: the rounding decision boundaries.
_E2M1_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2


def _check_weight(weight: torch.Tensor, block_size: int, key: str) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{key}NVFP4 block_size must be a positive integer, got {block_size!r}")
    if weight.ndim != 2:
        raise ValueError(f"{key}NVFP4 quantizes 2-D weights [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] % block_size:
        raise ValueError(f"{key}in_features={weight.shape[1]} is not divisible by the NVFP4 block size "
                         f"{block_size}")


def _blocks(weight: torch.Tensor, n_blocks: int) -> torch.Tensor:
    return weight.reshape(weight.shape[0], n_blocks, weight.shape[1] // n_blocks)


def _round_up_significant_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Smallest float with `bits` significant bits that is >= x (x >= 0), in x's dtype."""
    mantissa, exponent = torch.frexp(x.to(torch.float64))  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ceil(torch.ldexp(mantissa, torch.tensor(bits))), exponent - bits).to(x.dtype)


def nvfp4_scales(weight: torch.Tensor, block_size: int = NVFP4_BLOCK_SIZE, key: str = ""
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_scale [out, in / block_size] float32 of exact E4M3 values, global_scale 0-dim float32).

    `key` prefixes error messages with where the weight came from (config key, module name)."""
    _check_weight(weight, block_size, key)
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError(f"{key}weight has non-finite values; NVFP4 scales need a finite amax")
    amax = w.abs().amax() if w.numel() else torch.zeros((), dtype=torch.float32, device=w.device)
    global_scale = _round_up_significant_bits(amax / (E2M1_MAX * E4M3_MAX), GLOBAL_SCALE_BITS)
    if global_scale == 0:  # all-zero tensor
        global_scale = torch.ones((), dtype=torch.float32, device=w.device)
    block_amax = _blocks(w, w.shape[1] // block_size).abs().amax(dim=-1)
    block_scale = block_amax / (E2M1_MAX * global_scale)
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    block_scale = block_scale.clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    return block_scale, global_scale.reshape(())


@functools.cache
def _tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 values and midpoints on `device` (cached: the STE forward runs every training step)."""
    return E2M1_VALUES.to(device=device, dtype=dtype), _E2M1_MIDPOINTS.to(device=device, dtype=dtype)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest signed E2M1 value (ties to the even code, i.e. mantissa bit 0), saturating at +-6."""
    values, midpoints = _tables(x.device, x.dtype)
    magnitude = x.abs().contiguous()  # a Conv1D or transposed-expert weight arrives as a transposed view
    code = torch.searchsorted(midpoints, magnitude)  # first midpoint >= |x|: an exact tie picks the lower value
    at_midpoint = magnitude == midpoints[code.clamp(max=len(midpoints) - 1)]
    code = code + (at_midpoint & (code % 2 == 1)).long()  # tie between codes 2k+1 and 2k+2: take the even one
    return torch.sign(x) * values[code]


def _block_scales(weight: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Per-block float32 scale block_scale * global_scale, shaped [out, n_blocks, 1] for broadcasting."""
    if block_scale.ndim != 2 or block_scale.shape[0] != weight.shape[0] or weight.ndim != 2 \
            or weight.shape[1] % max(block_scale.shape[1], 1):
        raise ValueError(f"block_scale of shape {tuple(block_scale.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)}")
    scale = block_scale.to(device=weight.device, dtype=torch.float32) \
        * global_scale.to(device=weight.device, dtype=torch.float32)
    return scale[..., None]


def nvfp4_fake_quantize(weight: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor
                        ) -> torch.Tensor:
    """Snap `weight` onto its NVFP4 grid (same shape and dtype as `weight`)."""
    scale = _block_scales(weight, block_scale, global_scale)
    blocks = _blocks(weight.to(torch.float32), block_scale.shape[1])
    q = round_to_e2m1(blocks / scale)
    return (q * scale).reshape(weight.shape).to(weight.dtype)


def nvfp4_violation(weight: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> float:
    """Largest distance of a weight from its nearest NVFP4 grid point, in units of the local E2M1 spacing.

    The spacing is that of the E2M1 interval holding |w| / (block_scale * global_scale): 0.5 below 2, 1 in
    [2, 4), 2 from 4 on. Weights beyond +-6 are measured from +-6, so out-of-range counts as a violation.
    0 means exactly on the grid: the weight equals its own fake quantization bit for bit."""
    if weight.numel() == 0:
        return 0.0
    nearest = nvfp4_fake_quantize(weight.detach(), block_scale, global_scale).to(torch.float64)
    scale = _block_scales(weight, block_scale, global_scale).to(torch.float64)
    w = _blocks(weight.detach().to(torch.float64), block_scale.shape[1])
    r = w.abs() / scale
    spacing = torch.where(r < 2, 0.5, torch.where(r < 4, 1.0, 2.0))
    distance = (w - _blocks(nearest, block_scale.shape[1])).abs() / (scale * spacing)
    return float(distance.max())


class STENVFP4(torch.nn.Module):
    """Parametrization with fixed saved scales: the forward sees NVFP4 grid weights, the backward passes
    gradients straight through to the latent full-precision weights."""

    def __init__(self, block_scale: torch.Tensor, global_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("block_scale", block_scale, persistent=False)
        self.register_buffer("global_scale", global_scale, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (nvfp4_fake_quantize(weight, self.block_scale, self.global_scale) - weight).detach()


def nvfp4_quantize_model(model, key: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantize every damage target in place to NVFP4; returns (constraint description,
    {name.block_scale / name.global_scale: scales})."""
    layers = damage_targets(model)
    scales = {name: nvfp4_scales(target.weight, NVFP4_BLOCK_SIZE, key=f"{key}({name}) ")
              for name, target in layers.items()}  # validate every layer before touching any
    tensors = {}
    for name, target in layers.items():
        block_scale, global_scale = scales[name]
        target.assign(nvfp4_fake_quantize(target.weight, block_scale, global_scale))
        tensors[f"{name}.block_scale"], tensors[f"{name}.global_scale"] = block_scale, global_scale
    constraint = {"kind": "fp4-grid", "scheme": "nvfp4", "block_size": NVFP4_BLOCK_SIZE, "modules": sorted(layers)}
    return constraint, tensors
