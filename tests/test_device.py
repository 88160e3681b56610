"""Device selection: the CPU path is plain fp32; the CUDA path (bf16 autocast) is chosen only when CUDA exists.
The CUDA branch itself cannot run on the CPU-only CI machines; these tests pin down what the CPU path does."""

import pytest
import torch

from realign.device import autocast, compute_device, model_device, on_device
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
