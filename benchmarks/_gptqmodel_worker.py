"""GPTQModel side of benchmarks/gptq_vs_gptqmodel.py; runs in the separate GPTQModel venv.

    GPTQMODEL_CPU_WORKERS=2 /tmp/venv_gptq/bin/python benchmarks/_gptqmodel_worker.py SPEC.json

SPEC (JSON): model_dir, calib (safetensors file holding "ids", LongTensor [n, seq_len]), bits, group_size,
sym, damp, true_sequential, block_size, out_dir. Writes into out_dir:
  quantized/                      the checkpoint as GPTQModel saves it (gm.save)
  weights.safetensors             {module}.weight of every quantized Linear: the checkpoint dequantized to fp32
                                  by GPTQModel's own converter (its scales are stored in fp16)
  produced.safetensors            the same weights as the algorithm produced them, before packing (fp32 scales)
  worker.json                     settings as GPTQModel resolved them, wall times, versions, and checks

Only this file imports gptqmodel, so the main benchmark keeps the project's own venv.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main(spec_path: str) -> None:
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ
    from gptqmodel.utils.model_dequant import dequantize_model
    from transformers import AutoTokenizer

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    ids = load_file(spec["calib"])["ids"]
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]

    # Record what the algorithm itself produced per module (before packing), to check the saved
    # checkpoint against it, and which damping it ended up using.
    produced = {}
    original_quantize = GPTQ.quantize

    def recording_quantize(self, blocksize=128):
        # GPTQModel always calls quantize() with its default block size (128); use the requested one.
        result = original_quantize(self, blocksize=spec["block_size"])
        name = self._named_module.full_name if self._named_module is not None else self.name
        produced[name] = {"weight": result[0].detach().float().cpu().clone(), "damp": float(result[6]),
                          "nsamples": int(result[7])}
        return result

    GPTQ.quantize = recording_quantize

    # act_group_aware (GPTQModel's default True) reorders columns inside groups: off, like desc_act.
    config = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"], desc_act=False,
                            act_group_aware=False, damp_percent=spec["damp"], static_groups=False, mse=0.0,
                            true_sequential=spec["true_sequential"], device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    start = time.perf_counter()
    model = GPTQModel.load(spec["model_dir"], config, dtype=torch.float32)  # passing device= breaks on CPU
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    model.quantize(calib, batch_size=1, tokenizer=tokenizer)
    quantize_s = time.perf_counter() - start
    model.save(str(out / "quantized"))

    dequantize_model(out / "quantized", out / "dequantized", target_dtype=torch.float32)
    weights = {}
    for shard in sorted((out / "dequantized").glob("*.safetensors")):
        with safe_open(shard, framework="pt") as reader:
            for key in reader.keys():
                if key.removesuffix(".weight") in produced:
                    weights[key] = reader.get_tensor(key).float().contiguous()
    missing = sorted(set(produced) - {k.removesuffix(".weight") for k in weights})
    if missing:
        raise RuntimeError(f"dequantized checkpoint lacks quantized modules: {missing[:5]}")
    save_file(weights, str(out / "weights.safetensors"))
    save_file({f"{n}.weight": p["weight"].contiguous() for n, p in produced.items()},
              str(out / "produced.safetensors"))
    shutil.rmtree(out / "dequantized")

    # The saved checkpoint must hold what the algorithm produced (up to the scale storage precision).
    saved_vs_produced = max(float((weights[f"{n}.weight"] - p["weight"]).abs().max()) for n, p in produced.items())
    resolved = {key: getattr(model.quantize_config, key, None)
                for key in ("bits", "group_size", "sym", "desc_act", "act_group_aware", "damp_percent",
                            "damp_auto_increment", "true_sequential", "static_groups", "mse")}
    report = {
        "versions": {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "block_size": spec["block_size"],
        "resolved_config": {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v))
                            for k, v in resolved.items()},
        "load_s": load_s,
        "quantize_s": quantize_s,
        "modules": len(produced),
        "damp_used": sorted({p["damp"] for p in produced.values()}),
        "nsamples": sorted({p["nsamples"] for p in produced.values()}),
        "max_abs_saved_minus_produced": saved_vs_produced,
        "scales_dtype": _scales_dtype(out / "quantized"),
    }
    (out / "worker.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _scales_dtype(checkpoint: Path) -> str:
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as reader:
            for key in reader.keys():
                if key.endswith(".scales"):
                    return str(reader.get_slice(key).get_dtype())
    return "unknown"


if __name__ == "__main__":
    main(sys.argv[1])
