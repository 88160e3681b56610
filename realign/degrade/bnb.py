"""bitsandbytes quantization (NF4, FP4, LLM.int8) and the QLoRA recovery it implies.

bitsandbytes weights cannot be trained in place, so the damaged artifact is a *frozen* quantized base: recovery
trains LoRA adapters on top of it (QLoRA, Dettmers et al. 2023) and the recovered artifact is the unchanged
base plus an `adapter/` folder that `peft.PeftModel.from_pretrained` loads back. The constraint records a
SHA-256 digest of every quantized weight (and its quantization statistics), so a check after recovery proves
the base was not touched.

bitsandbytes 0.50 runs NF4/FP4/int8 on CPU (measured: docs/notes/quant-libs-cpu.md); on a machine with
CUDA the same code quantizes on the GPU with bf16 compute.
"""

from __future__ import annotations

import hashlib

import torch

from realign.models.artifact import keep_canonical_format

QUANT_TYPES = ("nf4", "fp4", "int8")
LORA_TARGETS = "all-linear"  # every Linear except the output head, the same set the other degradations touch


def bnb_config(quant_type: str, device: str = "cpu", key: str = ""):
    from transformers import BitsAndBytesConfig

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{key}quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # bf16 is ~3x slower on CPU
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_quantized(model_dir, quant_type: str, device: str = "cpu", key: str = ""):
    """Load an fp32 checkpoint through bitsandbytes: quantization happens while the weights load."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(quant_type, device, key),
                                                 device_map={"": device}, dtype=torch.float32)
    model.eval()
    return keep_canonical_format(model)


def _is_bnb_linear(module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantized_modules(model) -> dict[str, torch.nn.Module]:
    """bitsandbytes layers by their name in the plain model (peft's wrapping prefixes are removed)."""
    found = {}
    for name, module in model.named_modules():
        if _is_bnb_linear(module):
            name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            found[name] = module
    return found


def _digest(module) -> str:
    # Hash the layer's serialized form, not `weight.data`: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit
    # weights in place for inference, and `state_dict()` converts them back to the canonical layout first.
    # The serialized form also carries the quantization statistics (absmax per block, int8 row scales).
    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if isinstance(tensor, torch.Tensor):
            sha.update(name.encode())
            # flattened: the CPU repacking round trip returns absmax as [1, n] instead of [n]
            sha.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def base_digests(model) -> dict[str, str]:
    return {name: _digest(module) for name, module in sorted(quantized_modules(model).items())}


def changed_base_layers(digests: dict[str, str], expected: dict[str, str]) -> list[str]:
    """The layers of a frozen constraint's saved `expected` digests whose digest in `digests` (base_digests of
    the model now) differs, a missing layer included, in the saved order."""
    return [name for name in expected if digests.get(name) != expected[name]]


def frozen_constraint(model, quant_type: str, lora_r: int, lora_alpha: int) -> dict:
    digests = base_digests(model)
    if not digests:
        raise RuntimeError("bitsandbytes quantization produced no quantized layer")
    return {"kind": "frozen", "scheme": f"bnb-{quant_type}", "adapter": "lora",
            "lora": {"r": lora_r, "alpha": lora_alpha, "target_modules": LORA_TARGETS},
            "modules": sorted(digests), "digests": digests}


def attach_lora(model, lora: dict, seed: int = 0, kbit: bool = True):
    """Wrap the frozen base with trainable LoRA adapters (QLoRA); returns the PeftModel. `kbit`: the base is a
    bitsandbytes model (peft's k-bit preparation); False for a base whose weights lie on an integer grid in fp32
    (realign.degrade.constraints: `quantized_training: lora`), which peft freezes as it wraps it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)  # LoRA A matrices are randomly initialised
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=lora["target_modules"])
    return get_peft_model(model, config)
