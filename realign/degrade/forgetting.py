"""Catastrophic forgetting by narrow supervised fine-tuning (e.g. on Python source code)."""

from __future__ import annotations

from realign.data.sequences import packed_chunks
from realign.training import TrainConfig, train


def forget_by_sft(model, tokenizer, texts: list[str], cfg: TrainConfig, seq_len: int,
                  run_identity: dict | None = None) -> tuple[list[dict], int]:
    """Fine-tune in place on packed chunks of `texts`; returns (training curve, number of chunks)."""
    chunks = packed_chunks(tokenizer, texts, seq_len, max_chunks=cfg.steps * cfg.batch_size * cfg.grad_accum)
    if not chunks:
        raise ValueError(f"the narrow corpus yields no chunk of {seq_len} tokens")
    curve = train(model, chunks, lambda m, batch: m(**batch).loss, cfg, pad_id=tokenizer.pad_token_id,
                  run_identity=run_identity)
    return curve, len(chunks)
