"""Tiny random decoders (Llama, GPT-2, OPT, GPT-NeoX, Qwen2, Mixtral) with a real (small, trained) byte-level BPE
tokenizer, for tests and smoke runs.

Everything is built locally from a config and Python's own source text, so no hub access is needed.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MixtralConfig, OPTConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from realign.io import atomic_path

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text(max_files: int = 40) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:max_files]
    return [f.read_text(errors="ignore") for f in files] + [
        "The quick brown fox jumps over the lazy dog. Question: What is the answer? Answer: yes"
    ]


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


ARCHITECTURES = ("llama", "gpt2", "opt", "gpt_neox", "qwen2", "mixtral")


def tiny_config(architecture: str = "llama", vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                max_positions: int = 512, token_ids: dict | None = None, **overrides):
    """A tiny config of one of the study's decoder families: 4 attention heads (2 key/value heads where the family
    has grouped-query attention), an MLP twice the width (Mixtral: 4 experts of the width, 2 per token).

    `token_ids` ({"bos_token_id", "eos_token_id", "pad_token_id"}) replace the family's defaults (GPT-2's are
    50256, outside a tiny vocabulary); `overrides` are passed to the config."""
    extra = {"vocab_size": vocab_size, **(token_ids or {}), **overrides}
    width = {**extra, "hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": 4,
             "max_position_embeddings": max_positions}
    gqa = {"intermediate_size": 2 * hidden_size, "num_key_value_heads": 2}
    builders = {
        "llama": lambda: LlamaConfig(**width, **gqa),
        "gpt2": lambda: GPT2Config(**extra, n_embd=hidden_size, n_layer=num_layers, n_head=4,
                                   n_positions=max_positions),
        "opt": lambda: OPTConfig(**width, ffn_dim=2 * hidden_size, word_embed_proj_dim=hidden_size),
        "gpt_neox": lambda: GPTNeoXConfig(**width, intermediate_size=2 * hidden_size),
        "qwen2": lambda: Qwen2Config(**width, **gqa),
        "mixtral": lambda: MixtralConfig(**width, intermediate_size=hidden_size, num_key_value_heads=2,
                                         num_local_experts=4, num_experts_per_tok=2),
    }
    if architecture not in builders:
        raise ValueError(f"unknown tiny architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    return builders[architecture]()


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     vocab_size: int = 512, architecture: str = "llama", max_positions: int = 512,
                     init_std: float | None = None) -> Path:
    """Write a randomly initialised tiny decoder of `architecture` (ARCHITECTURES) + the tiny tokenizer (ChatML
    chat template) to `out_dir` (safetensors, loadable by transformers). The Llama ties its embeddings.

    `init_std`: the weights' initialisation scale (the family's initializer_range, 0.02, by default); a larger one
    gives a random model sharper next-token distributions, so a damage changes them measurably."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(vocab_size)
    token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id}
    extra = {"tie_word_embeddings": True} if architecture == "llama" else {}
    if init_std is not None:
        extra["initializer_range"] = init_std
    config = tiny_config(architecture, len(tokenizer), hidden_size, num_layers, max_positions, token_ids, **extra)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def write_tiny_gguf(model_dir: str | Path, out_file: str | Path) -> Path:
    """Write a tiny Llama saved by build_tiny_model as an fp32 GGUF file that transformers can load (the layout
    llama.cpp's converter writes: llama.* hyper-parameters, a gpt2-style BPE tokenizer, GGUF tensor names)."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    special = {a["content"] for a in tok["added_tokens"]}
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    with atomic_path(out_file) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_block_count(cfg["num_hidden_layers"])
        writer.add_context_length(cfg["max_position_embeddings"])
        writer.add_embedding_length(cfg["hidden_size"])
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(cfg["num_attention_heads"])
        writer.add_head_count_kv(cfg["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control token
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
        writer.add_bos_token_id(cfg["bos_token_id"])
        writer.add_eos_token_id(cfg["eos_token_id"])
        writer.add_pad_token_id(cfg["pad_token_id"])
        for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out_file)
