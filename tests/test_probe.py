"""The probe's sampled positions carry its own content: never the chat template's shared prefix, never a prefix
that another probe sequence shares (realign.data.sequences.chat_prompt_content,
realign.measure.activations.content_positions)."""

import pytest
import torch

from realign.data.sequences import chat_prompt_content, chat_prompt_ids
from realign.measure.activations import content_positions, sample_positions
from realign.measure.stage import probe_sequences
from realign.models.tiny import build_tiny_tokenizer

# SmolLM2-135M-Instruct's chat template (as its GGUF file carries it): a fixed system prompt in every sequence.
SYSTEM_PROMPT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

RECORDS = [
    {"instruction": "What is the capital of France?", "reference": "The capital of France is Paris."},
    {"instruction": "What is the boiling point of water?", "reference": "Water boils at 100 degrees Celsius."},
    {"instruction": "Write a haiku about the sea.", "reference": "Waves fold into foam,\nsalt wind carries gulls."},
    {"instruction": "List three prime numbers.", "reference": "The answer is 2, 3 and 5."},
    {"instruction": "Explain recursion in one sentence.", "reference": "The answer is a function calling itself."},
    {"instruction": "  Translate 'hello' into Spanish.\n", "reference": "Hola."},
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer()
    tok.chat_template = SYSTEM_PROMPT_TEMPLATE
    return tok


def _keys(sequences, pairs):
    """What determines a causal model's hidden state at a position: its token ids up to and including it."""
    return [tuple(sequences[s][: p + 1].tolist()) for s, p in pairs]


def test_no_two_sampled_positions_share_their_prefix_and_the_old_sampling_did(tokenizer):
    sequences, masks = probe_sequences(tokenizer, RECORDS, max_tokens=128)
    pairs = sample_positions(content_positions(sequences, masks), per_sequence=24, seed=0)
    keys = _keys(sequences, pairs)
    assert len(set(keys)) == len(keys)
    assert {s for s, _ in pairs} == set(range(len(RECORDS))) and all(masks[s][p] and p > 0 for s, p in pairs)
    # The old sampling (every position 1..len-1) draws the system prompt's tokens in every sequence.
    old = sample_positions([list(range(1, len(s))) for s in sequences], per_sequence=24, seed=0)
    old_keys = _keys(sequences, old)
    assert len(set(old_keys)) < len(old_keys)
    template = len(tokenizer("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                             "Face<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)["input_ids"])
    assert sum(p < template for _, p in old) > 0 and all(p >= template for _, p in pairs)


def test_the_shared_opening_words_of_two_instructions_are_not_sampled(tokenizer):
    sequences, masks = probe_sequences(tokenizer, RECORDS, max_tokens=128)
    candidates = content_positions(sequences, masks)
    start = len(chat_prompt_ids(tokenizer, "")) - len(tokenizer("<|im_end|>\n<|im_start|>assistant\n",
                                                                add_special_tokens=False)["input_ids"])
    same = 0  # "What is the " opens the first two instructions
    while sequences[0][start + same] == sequences[1][start + same]:
        same += 1
    assert same >= 2
    assert min(candidates[0]) == min(candidates[1]) == start + same
    assert min(candidates[3]) == start  # an instruction that opens its own way is measured from its first token


@pytest.mark.parametrize("template", ["system prompt", "chatml", "none"])
def test_content_tokens_are_the_instruction_and_the_answer(template):
    tok = build_tiny_tokenizer()
    tok.chat_template = {"system prompt": SYSTEM_PROMPT_TEMPLATE, "chatml": tok.chat_template, "none": None}[template]
    for record in RECORDS:
        ids, content = chat_prompt_content(tok, record["instruction"])
        assert ids == chat_prompt_ids(tok, record["instruction"])
        assert tok.decode([i for i, c in zip(ids, content) if c]).strip() == record["instruction"].strip()
        frame = tok.decode([i for i, c in zip(ids, content) if not c])
        assert record["instruction"].strip()[:5] not in frame
    sequences, masks = probe_sequences(tok, RECORDS[:1], max_tokens=200)
    answer = len(tok(RECORDS[0]["reference"], add_special_tokens=False)["input_ids"])
    assert masks[0][-answer:].all() and len(sequences[0]) == len(masks[0])


def test_a_sequence_without_content_of_its_own_is_an_error(tokenizer):
    # 20 tokens hold the system prompt and no more
    sequences, masks = probe_sequences(tokenizer, RECORDS, max_tokens=20)
    with pytest.raises(ValueError, match="probe sequence 0 has no token of its own content"):
        content_positions(sequences, masks)
    # the same probe twice: every position of both is shared
    sequences, masks = probe_sequences(tokenizer, [RECORDS[0], RECORDS[1], RECORDS[0]], max_tokens=128)
    n = len(sequences[0])
    with pytest.raises(ValueError, match=f"probe sequence 0 has no token .* of its {n} tokens, .* first {n} are "):
        content_positions(sequences, masks)


def test_a_template_whose_frame_depends_on_the_content_is_an_error():
    tok = build_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot find the instruction 'Say hi' in the prompt"):
        chat_prompt_content(tok, "Say hi")


def test_every_copy_of_the_tokenizer_gives_the_same_positions(tokenizer, tmp_path):
    """Each artifact of a model loads its own saved copy of the tokenizer; all must sample the same tokens."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    copies = [probe_sequences(t, RECORDS, 128) for t in (tokenizer, AutoTokenizer.from_pretrained(tmp_path))]
    for (sequences, masks), (other_sequences, other_masks) in zip(copies, copies[1:]):
        assert all(torch.equal(a, b) for a, b in zip(sequences + masks, other_sequences + other_masks))
    assert sample_positions(content_positions(*copies[0]), 24, 3) == sample_positions(content_positions(*copies[1]),
                                                                                       24, 3)


def test_positions_beyond_a_sequence_are_capped_and_the_cap_is_logged(tokenizer, tmp_path, caplog):
    """Issue 32: `measure.positions_per_sequence` beyond what a sequence has gives all its content positions (as
    the schema says), and the job's log says so."""
    from realign.io import write_json
    from realign.measure.stage import _probe

    prompts = tmp_path / "prompts.json"
    write_json(prompts, {"probe": RECORDS}, digest=True)
    with caplog.at_level("INFO", logger="realign.measure.stage"):
        sequences, pairs = _probe(tokenizer, prompts, max_tokens=128, per_sequence=500, seed=0)
    sequences_, masks = probe_sequences(tokenizer, RECORDS, max_tokens=128)
    candidates = content_positions(sequences_, masks)
    assert len(pairs) == sum(map(len, candidates))
    assert f"measure.positions_per_sequence = 500: {len(RECORDS)} of {len(RECORDS)} probe sequences have fewer" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="realign.measure.stage"):
        _probe(tokenizer, prompts, max_tokens=128, per_sequence=1, seed=0)
    assert "positions_per_sequence" not in caplog.text


def test_heldout_chunks_beyond_the_corpus_are_capped_and_the_cap_is_logged(tokenizer, tmp_path, caplog):
    """Issue 32: `data.code_heldout_chunks` beyond what the held-out corpus holds scores all of it, logged."""
    from realign.io import write_jsonl
    from realign.measure.stage import heldout_chunks

    path = tmp_path / "code_heldout.jsonl"
    write_jsonl(path, [{"text": "def f(x):\n    return x + 1\n" * 20}], digest=True)
    with caplog.at_level("INFO", logger="realign.measure.stage"):
        few = heldout_chunks(tokenizer, "code", path, max_len=16, n_chunks=2)
    assert len(few) == 2 and "code_heldout_chunks" not in caplog.text
    with caplog.at_level("INFO", logger="realign.measure.stage"):
        every = heldout_chunks(tokenizer, "code", path, max_len=16, n_chunks=100_000)
    assert 2 < len(every) < 100_000
    assert f"data.code_heldout_chunks = 100000: the held-out code corpus gives {len(every)} chunks" in caplog.text
