import pytest
import torch

from realign.data.sequences import IGNORE, chat_example, collate
from realign.recover.losses import cross_entropy, forward_kl
from realign.training import TrainConfig, example_order, lr_factor, train


def logits_and_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[:, :2] = IGNORE
    return logits, labels


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits, labels = logits_and_labels()
    assert float(forward_kl(logits, logits.clone(), labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(forward_kl(logits, logits + torch.randn_like(logits), labels)) > 0.01


def test_kl_ignores_unsupervised_positions():
    logits, labels = logits_and_labels()
    other = logits.clone()
    other[:, 0] += 5.0  # position 0 predicts token 1, which carries no label
    assert float(forward_kl(other, logits, labels)) == pytest.approx(0.0, abs=1e-6)


def test_kl_gradient_moves_student_towards_teacher():
    teacher, labels = logits_and_labels(1)
    student = torch.zeros_like(teacher, requires_grad=True)
    loss = forward_kl(student, teacher, labels)
    loss.backward()
    stepped = (student - 1.0 * student.grad).detach()
    assert float(forward_kl(stepped, teacher, labels)) < loss.item()


def test_kl_matches_torch_kl_div():
    teacher, labels = logits_and_labels(2)
    student = torch.randn_like(teacher)
    mask = labels[:, 1:] != IGNORE
    t = torch.log_softmax(teacher[:, :-1][mask], -1)
    s = torch.log_softmax(student[:, :-1][mask], -1)
    expected = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    assert float(forward_kl(student, teacher, labels)) == pytest.approx(float(expected), rel=1e-5)


def test_cross_entropy_matches_hf_convention():
    logits, labels = logits_and_labels(3)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE)
    assert float(cross_entropy(logits, labels)) == pytest.approx(float(expected))


def test_chat_example_puts_loss_only_on_answer(tiny):
    _, tokenizer = tiny
    ex = chat_example(tokenizer, "Say hi", "hi there", max_len=64)
    answer = tokenizer("hi there", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    supervised = ex["labels"][ex["labels"] != IGNORE].tolist()
    assert supervised == answer
    batch = collate([ex, chat_example(tokenizer, "x", "y", 64)], tokenizer.pad_token_id)
    assert batch["attention_mask"].sum() == len(ex["input_ids"]) + len(chat_example(tokenizer, "x", "y", 64)["input_ids"])


def test_data_order_is_deterministic_and_covers_epochs():
    assert example_order(5, 12, seed=3) == example_order(5, 12, seed=3)
    assert example_order(5, 12, seed=3) != example_order(5, 12, seed=4)
    assert sorted(example_order(5, 10, seed=0)) == sorted(list(range(5)) * 2)


def test_schedules():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2)
    assert lr_factor(0, cfg) == 0.5 and lr_factor(1, cfg) == 1.0
    assert lr_factor(9, cfg) < 0.1
    assert lr_factor(5, TrainConfig(steps=10, lr=1.0, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(steps=1, lr=1.0, schedule="step")


@pytest.mark.parametrize("setting,expected", [(None, torch.float32), ("float32", torch.float32),
                                             ("bfloat16", torch.bfloat16)])
def test_training_dtype_sets_the_precision_of_the_students_forwards(tiny, setting, expected):
    """training.dtype bfloat16 runs the student's forwards under bf16 autocast (its logits come out bf16; the
    weights and the optimizer stay fp32); unset, a CPU trains in fp32 (bf16 training is not validated there)."""
    model, tokenizer = tiny
    examples = [chat_example(tokenizer, "a", "b", 32)] * 2
    seen = []

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"]).logits
        seen.append(logits.dtype)
        return cross_entropy(logits.float(), batch["labels"])

    params = {"steps": 2, "lr": 1e-3, "batch_size": 1, **({"dtype": setting} if setting else {})}
    cfg = TrainConfig.from_params(params, seed=0)
    assert cfg.precision_on("cpu") == str(expected).removeprefix("torch.")
    train(model, examples, loss_fn, cfg, tokenizer.pad_token_id)
    assert seen == [expected, expected]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match=r"training\.dtype: 'float16' is not one of float32, bfloat16"):
        TrainConfig(steps=1, lr=1.0, precision="float16")


def test_non_finite_loss_fails_with_the_step(tiny):
    model, tokenizer = tiny
    examples = [chat_example(tokenizer, "a", "b", 32)] * 4
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = cross_entropy(m(input_ids=batch["input_ids"]).logits, batch["labels"])
        return loss * float("nan") if calls["n"] == 2 else loss

    with pytest.raises(FloatingPointError, match="at step 1"):
        train(model, examples, loss_fn, TrainConfig(steps=3, lr=1e-3, batch_size=1), tokenizer.pad_token_id)


def test_training_is_deterministic(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [chat_example(tokenizer, f"q{i}", f"answer number {i}", 32) for i in range(6)]
    curves = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        curves.append(train(model, examples, lambda m, b: cross_entropy(m(input_ids=b["input_ids"]).logits, b["labels"]),
                            TrainConfig(steps=3, lr=1e-3, batch_size=2, seed=7), tokenizer.pad_token_id))
    assert curves[0] == curves[1]
    assert curves[0][-1]["loss"] < curves[0][0]["loss"]
