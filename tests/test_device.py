"""Device selection: the CPU path is plain fp32; the CUDA path (bf16 autocast) is chosen only when CUDA exists.
The CUDA branch itself cannot run on the CPU-only CI machines; these tests pin down what the CPU path does."""

import pytest
import torch

from realign.device import autocast, bf16_units, compute_device, measure_precision, model_device, on_device
from realign.models.artifact import load_artifact
from realign.models.record import ArtifactRecord


def test_cpu_is_chosen_without_cuda_and_a_forced_gpu_fails_clearly(monkeypatch):
    monkeypatch.delenv("REALIGN_DEVICE", raising=False)
    assert compute_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("REALIGN_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="REALIGN_DEVICE=cuda but CUDA is not available"):
            compute_device()


def test_cpu_autocast_keeps_fp32_matmuls():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.device("cpu")):
        out = a @ b
    assert out.dtype == torch.float32
    assert torch.equal(out, a @ b)


def test_the_measurement_precision_follows_measure_dtype_and_the_devices_bf16_units(monkeypatch):
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert measure_precision("float32", "cpu") == "float32" and measure_precision("bfloat16", "cpu") == "bfloat16"
    with autocast("cpu", "bfloat16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "float32"):
        assert (a @ b).dtype == torch.float32
    # auto: bf16 exactly where the CPU multiplies bf16 natively
    assert measure_precision("auto", "cpu") == ("bfloat16" if bf16_units("cpu") else "float32")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert measure_precision("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert measure_precision("auto", "cpu") == "float32" and measure_precision("auto", "cuda") == "bfloat16"
    with pytest.raises(ValueError, match="measure.dtype: 'float16' is not one of auto, float32, bfloat16"):
        measure_precision("float16", "cpu")


def test_batches_follow_the_model(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.models.artifact import save_artifact

    artifact = save_artifact(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "artifact", ArtifactRecord("tiny"))
    monkeypatch.setenv("REALIGN_DEVICE", "cpu")
    model, _, _ = load_artifact(artifact)
    device = model_device(model)
    assert device.type == "cpu" and next(model.parameters()).dtype == torch.float32
    batch = on_device({"input_ids": torch.ones(1, 3, dtype=torch.long), "n": 3}, device)
    assert batch["input_ids"].device == device and batch["n"] == 3
