"""Cheap checks of a configured model source before anything loads it, so a bad source fails at config
validation (or at the start of its job) with a message naming the config key instead of deep inside a loader.

Nothing here imports torch or transformers, runs model code, or touches the network: a GGUF file is checked
by reading its header (every tensor's data must fit in the file), a local directory by its file listing and
its config.json read as plain JSON, a hub model only through files already in the local Hugging Face cache.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from realign.errors import ConfigError

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class ModelFacts:
    """What is known about a model without loading it (None: not known cheaply)."""
    vocab_size: int | None = None
    context_length: int | None = None
    experts: int | None = None  # routed experts per MoE block (None: dense, or not known)
    n_layers: int | None = None  # transformer blocks L (hidden states 0..L)
    widths: tuple[int, ...] = ()  # input widths of the Linear layers a damage targets (hidden, intermediate size)


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str | None
    context_length: int | None
    vocab_size: int | None
    n_parameters: int
    n_tensors: int


# GGUF metadata value types (gguf.GGUFValueType) -> struct format of a scalar; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, handle, path: Path, size: int, what: str):
        self.handle, self.path, self.size, self.what = handle, path, size, what

    def fail(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.what}: {self.path} is not a usable GGUF file: {problem} (a truncated or "
                           "corrupted download? fetch it again)")

    def read(self, n: int) -> bytes:
        if n > self.size - self.handle.tell():
            raise self.fail(f"the file ends at byte {self.size}, inside its header (needed {n} more bytes at "
                            f"byte {self.handle.tell()})")
        return self.handle.read(n)

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int):
        """A metadata value; an array comes back as its length only (token lists are long and not needed)."""
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item_kind, length = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALARS:
                self.read(struct.calcsize(_SCALARS[item_kind]) * length)
            else:
                for _ in range(length):
                    self.value(item_kind)
            return length
        raise self.fail(f"unknown metadata value type {kind}")


def read_gguf_header(path: str | Path, what: str) -> GGUFInfo:
    """Parse a GGUF file's header and check that every tensor's data lies inside the file; raise ConfigError
    naming `what` (the config key) otherwise."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: GGUF file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        reader = _Reader(handle, path, size, what)
        magic = handle.read(4)
        if size < 24 or magic != b"GGUF":
            raise reader.fail(f"no GGUF header ({size} bytes, starting {magic!r})")
        version, n_tensors, n_kv = reader.scalar("<I"), reader.scalar("<Q"), reader.scalar("<Q")
        if version not in (2, 3):
            raise reader.fail(f"GGUF version {version} (2 or 3 are supported)")
        if n_tensors > size or n_kv > size:
            raise reader.fail(f"implausible counts ({n_tensors} tensors, {n_kv} metadata entries)")
        metadata = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = reader.string()
            dims = [reader.scalar("<Q") for _ in range(reader.scalar("<I"))]
            kind, offset = reader.scalar("<I"), reader.scalar("<Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise reader.fail(f"tensor {name} has unknown type {kind}") from None
            n = math.prod(dims)
            tensors.append((name, n, offset, n // block * type_size))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-handle.tell() // alignment) * alignment
    if not tensors:
        raise reader.fail("it holds no tensors (a header-only file)")
    name, _, offset, n_bytes = max(tensors, key=lambda t: t[2] + t[3])
    if data_start + offset + n_bytes > size:
        raise reader.fail(f"tensor {name} needs bytes up to {data_start + offset + n_bytes}, but the file has "
                          f"only {size}")
    arch = metadata.get("general.architecture")
    vocab = metadata.get(f"{arch}.vocab_size", metadata.get("tokenizer.ggml.tokens"))
    return GGUFInfo(arch, metadata.get(f"{arch}.context_length"), vocab, sum(t[1] for t in tensors), len(tensors))


def is_gguf_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def check_local_model(path: str | Path, name: str) -> dict | GGUFInfo:
    """Validate `models.<name>.path`: a .gguf file (header checked) or a save_pretrained directory (config.json
    and weights present). Returns the GGUF header or the parsed config.json."""
    key, path = f"models.{name}.path", Path(path)
    if is_gguf_path(path) and path.is_file():
        return read_gguf_header(path, key)
    if not path.exists():
        raise ConfigError(f"{key}: directory {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a model directory (give a directory written by "
                          "save_pretrained, or a .gguf file)")
    if not any(path.iterdir()):
        raise ConfigError(f"{key}: directory {path} is empty; give a directory written by save_pretrained "
                          "(config.json, weights, tokenizer files), or a .gguf file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}: directory {path} has no config.json, so it is not a Hugging Face model "
                          "directory (save_pretrained writes config.json, weights and tokenizer files)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {config_file} is not a JSON object")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(f"{key}: directory {path} has a config.json but no weights "
                          f"({' or '.join(WEIGHT_PATTERNS)})")
    return config


def facts_from_config(config: dict) -> ModelFacts:
    """Vocabulary and context of a transformers config.json (multimodal models: of their text model)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    vocab = config.get("vocab_size", text.get("vocab_size"))
    context = next((c.get(k) for c in (config, text) for k in ("max_position_embeddings", "n_positions")
                    if isinstance(c.get(k), int)), None)
    experts = next((c.get(k) for c in (config, text) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(c.get(k), int) and c.get(k) > 1), None)
    layers = next((c.get(k) for c in (config, text) for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if isinstance(c.get(k), int)), None)
    widths = tuple(dict.fromkeys(c.get(k) for c in (config, text) for k in ("hidden_size", "n_embd", "intermediate_size",
                                                                            "n_inner")
                                 if isinstance(c.get(k), int)))
    return ModelFacts(vocab if isinstance(vocab, int) else None, context, experts, layers, widths)


def model_facts(spec: dict, name: str, resources_dir: str | Path = "resources") -> ModelFacts:
    """Vocabulary size and context length of `models.<name>` when they are cheap to know: a local source
    (validated: its problems raise ConfigError), an already fetched GGUF wheel or a hub model whose config.json
    is in the local cache (read only if intact: the job that needs them reports their problems)."""
    source = spec["source"]
    if source == "path":
        found = check_local_model(spec["path"], name)
        if isinstance(found, GGUFInfo):
            return ModelFacts(found.vocab_size, found.context_length)
        return facts_from_config(found)
    if source == "gguf-wheel":
        gguf_path = Path(resources_dir) / "wheels" / spec["wheel"] / spec["gguf_file"]
        if gguf_path.is_file():
            try:
                info = read_gguf_header(gguf_path, f"models.{name}.gguf_file")
            except ConfigError:
                return ModelFacts()  # the teacher may already be built; prepare_teacher reports a bad file
            return ModelFacts(info.vocab_size, info.context_length)
        return ModelFacts()
    if source == "hf":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec["id"], "config.json")
        if isinstance(cached, str):
            try:
                return facts_from_config(json.loads(Path(cached).read_text()))
            except (OSError, json.JSONDecodeError, AttributeError):
                return ModelFacts()
    return ModelFacts()


def safetensors_parameter_count(directory: str | Path) -> int | None:
    """Parameters stored in a directory's safetensors files, from their headers alone (no model code, no
    tensors read); None if it has none or a header cannot be read."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, struct.error, ValueError):
            return None
        total += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return total


def _length_keys(config: dict, sampled: dict[str, int]):
    """(config key, tokens) of every length that must fit in the model's context; `sampled`: {recovery: tokens the
    student samples per prompt} for the methods that sample (realign.recover.registry, passed by realign.config)."""
    yield "training.max_len", config["training"]["max_len"]
    for section in ("degradations", "recoveries"):
        for name, spec in config[section].items():
            if "max_len" in spec:
                yield f"{section}.{name}.max_len", spec["max_len"]
    for name, tokens in sampled.items():  # the student's prompt must leave room for its sample
        yield f"recoveries.{name}.max_new_tokens", tokens
    yield "data.teacher_max_new_tokens", config["data"]["teacher_max_new_tokens"] + 1
    yield "data.calibration.max_len", config["data"].get("calibration", {}).get("max_len", 0)
    yield "measure.probe_max_tokens", config["measure"]["probe_max_tokens"]


def check_fits(facts: ModelFacts, model: str, top_k: dict[str, int], lengths: dict[str, int]) -> None:
    """ConfigError naming the key if a top_k ({key: k}) is not smaller than the vocabulary of `model`, or a
    length ({key: tokens}) does not fit in its context."""
    for key, k in top_k.items():
        if facts.vocab_size and k is not None and k >= facts.vocab_size:
            raise ConfigError(f"invalid config key {key}: {k} is not smaller than the vocabulary of {model} "
                              f"({facts.vocab_size} tokens); lower it, or remove top_k to distil on the full "
                              "vocabulary")
    for key, tokens in lengths.items():
        if facts.context_length and tokens > facts.context_length:
            raise ConfigError(f"invalid config key {key}: {tokens} tokens do not fit in the context of {model} "
                              f"({facts.context_length} tokens, its max_position_embeddings)")


def check_models(config: dict, degradations: list[str], replace_layers: list[str], sampled: dict[str, int]) -> None:
    """Config validation of the model sources and of the keys their vocabulary and context bound (see
    model_facts for which sources are known before any job). `degradations`: the ones the study applies, from
    realign.config.study_degradations; `replace_layers`: those of them whose method replaces the Linear layers as it
    loads (bitsandbytes); `sampled`: {recovery: tokens its student samples per prompt}. Its caller, realign.config,
    passes what it reads from the registries, so that this module imports neither (no import circle)."""
    resources = config["data"].get("resources_dir", "resources")
    top_k = {f"recoveries.{name}.top_k": spec["top_k"] for name, spec in config["recoveries"].items()
             if "top_k" in spec}
    # bitsandbytes replaces Linear layers: stacked MoE expert weights would stay in full precision
    # (realign.degrade.coverage.check_supported refuses it again at the start of the job, for sources not known here)
    for name, spec in config["models"].items():
        facts = model_facts(spec, name, resources)
        check_fits(facts, f"models.{name}", top_k, dict(_length_keys(config, sampled)))
        check_shapes(facts, f"models.{name}", config, degradations)
        if facts.experts and replace_layers:
            raise ConfigError(f"invalid config key degradations.{replace_layers[0]}.method: bnb cannot quantize the stacked "
                              f"expert weights of models.{name} ({facts.experts} experts per block); use rtn, gptq "
                              "or nvfp4 for a mixture-of-experts model")


def check_shapes(facts: ModelFacts, model: str, config: dict, degradations: list[str]) -> None:
    """Keys the model's shape bounds, where its config.json is readable (issue 32: these failed only in a job,
    after hours of work): measure.alignment_layers within 1..L, a quantization `group_size` and an N:M pattern's M
    dividing the input width of every targeted Linear layer."""
    layers = config["measure"]["alignment_layers"]
    if facts.n_layers and isinstance(layers, list) and layers[1] > facts.n_layers:
        raise ConfigError(f"invalid config key measure.alignment_layers: [{layers[0]}, {layers[1]}] is not within "
                          f"1..{facts.n_layers}: {model} has {facts.n_layers} transformer blocks (hidden states 0 = "
                          f"embeddings, {facts.n_layers} = final post-norm)")
    for name in degradations:
        spec = config["degradations"][name]
        groups = [("group_size", spec["group_size"])] if "group_size" in spec else []
        if isinstance(spec.get("pattern"), str) and ":" in spec["pattern"]:
            groups.append(("pattern", int(spec["pattern"].split(":")[1])))
        for key, size in groups:
            bad = [w for w in facts.widths if w % size]
            if bad:
                raise ConfigError(f"invalid config key degradations.{name}.{key}: groups of {size} do not divide the "
                                  f"input width {bad[0]} of {model}'s layers (widths {', '.join(map(str, facts.widths))})")
