"""Bad model sources and limits fail early and clearly: at config validation (before any job) when the problem
can be seen cheaply, else at the start of the job, always naming the config key or the file."""

import copy
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from realign.config import ConfigError, load_schema, validate_config
from realign.models.checks import read_gguf_header
from realign.models.stage import prepare_teacher
from realign.models.tiny import write_tiny_gguf
from realign.resources import parameter_count_b

REPO = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(REPO / "workflow/schemas/config.schema.yaml")
DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


def _with_model(spec: dict, **recoveries) -> dict:
    config = copy.deepcopy(DEFAULT)
    config["models"] = {"m": spec}
    for name, changes in recoveries.items():
        config["recoveries"][name].update(changes)
    return config


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _cut(source: Path, out: Path, n_bytes: int) -> Path:
    out.write_bytes(source.read_bytes()[:n_bytes])
    return out


# ---- GGUF files ----------------------------------------------------------------------------------------------

def test_a_valid_gguf_path_is_accepted_and_sized_from_its_header(tiny_gguf, tiny_model_dir):
    info = read_gguf_header(tiny_gguf, "x")
    assert info.architecture == "llama" and info.context_length == 512 and info.vocab_size == 512
    spec = {"source": "path", "path": str(tiny_gguf)}
    validate_config(_with_model(spec), SCHEMA)  # no params_b needed: the header counts the parameters
    assert parameter_count_b(spec, "m") == pytest.approx(parameter_count_b(
        {"source": "path", "path": str(tiny_model_dir)}, "m"))


@pytest.mark.parametrize("cut", ["half", "header_only", "magic_only", "empty"])
def test_a_truncated_gguf_path_is_rejected_at_config_validation(tiny_gguf, tmp_path, cut):
    size = tiny_gguf.stat().st_size
    data_start = size - sum(t.n_bytes for t in __import__("gguf").GGUFReader(tiny_gguf).tensors)
    n_bytes = {"half": size // 2, "header_only": data_start, "magic_only": 4, "empty": 0}[cut]
    bad = _cut(tiny_gguf, tmp_path / "bad.gguf", n_bytes)
    with pytest.raises(ConfigError, match=rf"models\.m\.path: {bad} is not a usable GGUF file: .*\(a truncated"):
        validate_config(_with_model({"source": "path", "path": str(bad)}), SCHEMA)


def test_a_truncated_gguf_in_a_wheel_is_rejected_at_job_start(tiny_gguf, tmp_path):
    wheel = tmp_path / "wheel"
    (wheel / "pkg").mkdir(parents=True)
    _cut(tiny_gguf, wheel / "pkg/model.gguf", tiny_gguf.stat().st_size - 100)
    spec = {"source": "gguf-wheel", "wheel": "pkg==1", "gguf_file": "pkg/model.gguf", "params_b": 0.1}
    with pytest.raises(ConfigError, match=r"models\.m\.gguf_file: .*model.gguf is not a usable GGUF file: tensor "
                                          r".* needs bytes up to \d+, but the file has only \d+"):
        prepare_teacher("m", spec, tmp_path / "out", wheel_dir=wheel)
    assert not (tmp_path / "out").exists()


def test_a_gguf_path_becomes_the_teacher(tiny_gguf, tmp_path):
    out = prepare_teacher("m", {"source": "path", "path": str(tiny_gguf)}, tmp_path / "teacher")
    assert (out / "config.json").is_file() and (out / "artifact.json").is_file()


# ---- local directories ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, message", [
    ("empty", r"directory .* is empty; give a directory written by save_pretrained"),
    ("no_config", r"has no config.json, so it is not a Hugging Face model directory"),
    ("no_weights", r"has a config.json but no weights"),
    ("a_file", r"is a file, not a model directory"),
])
def test_a_local_directory_without_a_model_is_rejected_at_config_validation(tmp_path, layout, message):
    path = tmp_path / "model"
    path.mkdir()
    if layout == "no_config":
        (path / "model.safetensors").write_bytes(b"")
    if layout == "no_weights":
        (path / "config.json").write_text("{}")
    if layout == "a_file":
        path.rmdir()
        path.write_text("weights?")
    for config in (_with_model({"source": "path", "path": str(path)}),
                   _with_model({"source": "path", "path": str(path), "params_b": 0.1})):
        with pytest.raises(ConfigError, match=r"models\.m\.path: .*" + message):
            validate_config(config, SCHEMA)
    with pytest.raises(ConfigError, match=r"models\.m\.path: .*" + message):  # not "give params_b"
        parameter_count_b({"source": "path", "path": str(path)}, "m")


def _remote_code_model(tiny_model_dir, path: Path, safetensors: bool) -> Path:
    """A model whose config.json maps to code of its own; importing that code leaves a marker file."""
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom.py").write_text(f"open({str(path.parent / 'REMOTE_CODE_RAN')!r}, 'w').write('ran')\n")
    if not safetensors:
        (path / "model.safetensors").rename(path / "pytorch_model.bin")
    return path


def test_trust_remote_code_never_runs_while_the_dag_is_built(tiny_model_dir, tmp_path):
    counted = _remote_code_model(tiny_model_dir, tmp_path / "counted", safetensors=True)
    spec = {"source": "path", "path": str(counted), "trust_remote_code": True}
    validate_config(_with_model(spec), SCHEMA)
    expected = parameter_count_b({"source": "path", "path": str(tiny_model_dir)}, "m")
    assert parameter_count_b(spec, "m") == pytest.approx(expected)  # from the safetensors headers
    uncounted = _remote_code_model(tiny_model_dir, tmp_path / "uncounted", safetensors=False)
    with pytest.raises(ConfigError, match=r"models\.m\.params_b is required: .* would run the model's remote code"):
        parameter_count_b({**spec, "path": str(uncounted)}, "m")
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()


# ---- hub ids without network ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offline", [True, False])
def test_an_unreachable_hub_is_reported_in_seconds_naming_the_key_and_id(tmp_path, monkeypatch, offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    spec = {"source": "hf", "id": "realign-test/no-such-model", "params_b": 0.1}
    start = time.time()
    expected = (r"HF_HUB_OFFLINE is set and realign-test/no-such-model is not in the local Hugging Face cache"
                if offline else r"could not reach the Hugging Face hub for realign-test/no-such-model within 5 s")
    with pytest.raises(ConfigError, match=rf"models\.m\.id: {expected}.*give `source: path`"):
        prepare_teacher("m", spec, tmp_path / "out")
    assert time.time() - start < 10


# ---- tokenizers ----------------------------------------------------------------------------------------------

def test_a_tokenizer_without_eos_and_pad_is_rejected_naming_the_model(tiny_model_dir, tmp_path):
    path = tmp_path / "no-eos"
    shutil.copytree(tiny_model_dir, path)
    bare = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    bare.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).eos_token is None
    with pytest.raises(ValueError, match=r"models\.m: its tokenizer has neither an eos_token nor a pad_token"):
        prepare_teacher("m", {"source": "path", "path": str(path)}, tmp_path / "out")


# ---- vocabulary and context limits ---------------------------------------------------------------------------

def test_top_k_beyond_the_vocabulary_is_rejected_at_config_validation(tiny_model_dir, tiny_gguf):
    for path in (tiny_model_dir, tiny_gguf):
        config = _with_model({"source": "path", "path": str(path)}, kd={"top_k": 1000})
        with pytest.raises(ConfigError, match=r"recoveries\.kd\.top_k: 1000 is not smaller than the vocabulary "
                                              r"of models\.m \(512 tokens\)"):
            validate_config(config, SCHEMA)


def test_top_k_beyond_the_vocabulary_is_rejected_at_job_start(tiny_model_dir, tmp_path):
    from realign.recover.stage import run_recovery, teacher_top_k

    with pytest.raises(ConfigError, match=r"recoveries\.kd\.top_k / recoveries\.cka-kd\.top_k: 4096 is not "
                                          r"smaller than the vocabulary of the teacher"):
        teacher_top_k(tiny_model_dir, tmp_path / "answers.jsonl", tmp_path / "out", 64, 4096, 1.0,
                      recoveries=["kd", "cka-kd"])
    with pytest.raises(ConfigError, match=r"recoveries\.kd\.top_k: 600 is not smaller"):
        run_recovery(tiny_model_dir, tiny_model_dir, tmp_path / "r.jsonl", tmp_path / "out", "kd",
                     {"method": "kd", "top_k": 600, "max_len": 64}, 0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path, value, key", [
    (["training", "max_len"], 600, r"training\.max_len: 600 tokens"),
    (["recoveries", "onpolicy", "max_new_tokens"], 1024, r"recoveries\.onpolicy\.max_new_tokens: 1025 tokens"),
    (["data", "teacher_max_new_tokens"], 512, r"data\.teacher_max_new_tokens: 513 tokens"),
])
def test_lengths_beyond_the_context_are_rejected_at_config_validation(tiny_model_dir, path, value, key):
    config = _with_model({"source": "path", "path": str(tiny_model_dir)})
    *parents, last = path
    node = config
    for name in parents:
        node = node[name]
    node[last] = value
    with pytest.raises(ConfigError, match=key + r" do not fit in the context of models\.m \(512 tokens"):
        validate_config(config, SCHEMA)


@pytest.fixture
def short_context(tiny_model_dir):
    """A tiny GPT-2 (learned positions: a prompt longer than its 64-token context is an IndexError)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval(), tokenizer


LONG = [{"instruction": "Explain this code: " + "x = x + 1; " * 60, "reference": "It counts. " * 20},
        {"instruction": "Say hi.", "reference": "Hi."}]


def test_teacher_prompts_longer_than_the_context_are_clamped(short_context, caplog):
    from realign.recover.teacher_data import generate_answers, generate_rewrites

    model, tokenizer = short_context
    with caplog.at_level(logging.INFO):
        answers = generate_answers(model, tokenizer, [r["instruction"] for r in LONG], max_new_tokens=8)
        rows = generate_rewrites(model, tokenizer, LONG, max_new_tokens=8)
    assert len(answers) == len(rows) == 2
    assert "clamped 1 of 2 prompts to their last 56 tokens (context 64 tokens minus 8 to generate" in caplog.text
    assert "clamped 2 of 2 prompts" in caplog.text  # both rewrite prompts quote a reference
    with pytest.raises(ValueError, match=r"data\.teacher_max_new_tokens = 64 leaves no room for a prompt"):
        generate_answers(model, tokenizer, ["hi"], max_new_tokens=64)


def test_onpolicy_prompts_longer_than_the_context_are_clamped(short_context, caplog):
    from realign.recover.methods import onpolicy_loss

    model, tokenizer = short_context
    with caplog.at_level(logging.INFO):
        loss_fn = onpolicy_loss(model, tokenizer, LONG, {"max_new_tokens": 8}, max_len=48, max_new_tokens=8)
    assert "onpolicy: clamped 1 of 2 prompts to their last 56 tokens (context 64 minus 8 to sample)" in caplog.text
    ids = torch.zeros((2, 4), dtype=torch.long)
    batch = {"index": torch.tensor([0, 1]), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.isfinite(loss_fn(model, batch))


def test_bitsandbytes_on_a_mixture_of_experts_is_rejected_at_config_validation(tiny_model_dir, tmp_path):
    """bnb replaces Linear layers: Mixtral's stacked expert weights would silently stay in full precision."""
    moe = tmp_path / "moe"
    shutil.copytree(tiny_model_dir, moe)
    config_json = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config_json, "num_local_experts": 4}))
    config = _with_model({"source": "path", "path": str(moe)})
    config["degradations"]["nf4"] = {"method": "bnb", "quant_type": "nf4", "lora_r": 4, "lora_alpha": 8}
    config["study"] = [{"degradations": ["nf4"], "recoveries": ["kd"]}]
    with pytest.raises(ConfigError, match=r"degradations\.nf4\.method: bnb cannot quantize the stacked expert "
                                          r"weights of models\.m \(4 experts per block\)"):
        validate_config(config, SCHEMA)
    config["study"] = [{"degradations": ["magnitude-50"], "recoveries": ["kd"]}]  # bnb defined but not studied
    validate_config(config, SCHEMA)
    config_dense = _with_model({"source": "path", "path": str(tiny_model_dir)})
    config_dense["degradations"]["nf4"] = config["degradations"]["nf4"]
    config_dense["study"] = [{"degradations": ["nf4"], "recoveries": ["kd"]}]
    validate_config(config_dense, SCHEMA)
