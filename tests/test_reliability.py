"""Reliability: a killed writer leaves nothing trusted behind, corrupted caches are errors that name the file,
CKA does not depend on the thread count, nothing unpickles or runs remote code, and the per-rule benchmark
summary reads Snakemake's benchmark files."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from realign.io import IntegrityError, digest_path, read_json, tensors_sha256, write_json
from realign.measure.activations import load_activations, save_activations
from realign.measure.stage import similarity_to_teacher
from realign.models.artifact import load_artifact, read_record, save_artifact
from realign.models.record import ArtifactRecord

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Saves the tiny model as an artifact. With "stall", a metadata value stalls JSON serialisation of artifact.json,
# which save_artifact writes after the weights and the tokenizer: the process is then mid-write, with the
# weights complete in the temporary directory and nothing renamed yet.
SAVE_CHILD = textwrap.dedent("""
    import sys, time
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from realign.models.artifact import save_artifact
    from realign.models.record import ArtifactRecord

    class Stall:
        def item(self):
            print("weights written", flush=True)
            time.sleep(300)

    model_dir, out, mode = sys.argv[1:]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    save_artifact(model, tokenizer, out, ArtifactRecord("tiny", seed=0, timings={"stall": Stall()} if mode == "stall" else {}))
    print("saved", flush=True)
""")


def test_sigkill_mid_write_leaves_no_artifact_and_a_rerun_completes(tiny_model_dir, tmp_path):
    script, out = tmp_path / "save.py", tmp_path / "results" / "artifact"
    script.write_text(SAVE_CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(out), "stall"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    try:
        assert child.stdout.readline().strip() == "weights written", "the child died before the write began"
        staging = [p for p in out.parent.iterdir() if p.name.startswith(".artifact.") and p.name.endswith(".tmp")]
        assert len(staging) == 1 and (staging[0] / "model.safetensors").is_file()  # really killed mid-write
    finally:
        os.kill(child.pid, signal.SIGKILL)  # no handler, no finally block in the child runs
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match=f"{out} is not a complete artifact"):
        load_artifact(out)

    rerun = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(out), "complete"],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    model, _, meta = load_artifact(out, device="cpu")
    assert meta.seed == 0
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def _activations(n_tokens: int = 40, layers: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    acts = {f"layer.{i}": torch.randn(n_tokens, 16, generator=g) for i in range(layers)}
    acts["token_index"] = torch.stack([torch.zeros(n_tokens, dtype=torch.long), torch.arange(1, n_tokens + 1)], 1)
    return acts


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])  # inside the last tensor's data; the header stays valid


# What safetensors itself detects (every cache and artifact), then what only the activation digest detects.
FORMAT_CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage header": lambda b: b[:8] + b"\xff" * 16 + b[24:],
}
CORRUPTIONS = {**FORMAT_CORRUPTIONS, "flipped data byte": _flip_last_byte}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupted_activation_cache_is_an_error_naming_the_file(tmp_path, corrupt):
    teacher, artifact = tmp_path / "teacher.safetensors", tmp_path / "artifact.safetensors"
    save_activations(_activations(seed=0), teacher, {"artifact": "teacher"})
    save_activations(_activations(seed=1), artifact, {"artifact": "artifact"})
    artifact.write_bytes(corrupt(artifact.read_bytes()))
    with pytest.raises(RuntimeError, match=f"activation cache {artifact} is (unreadable|corrupted)"):
        load_activations(artifact)
    # ...and the CKA step refuses it rather than writing numbers computed from it.
    with pytest.raises(RuntimeError, match=str(artifact)):
        similarity_to_teacher(teacher, artifact, tmp_path / "cka.parquet", tmp_path / "cka.json")
    assert not (tmp_path / "cka.parquet").exists() and not (tmp_path / "cka.json").exists()
    assert len(load_activations(teacher)[0]) == 3  # the intact file next to it still loads


def test_activation_cache_without_its_layers_or_token_index_is_an_error(tmp_path):
    path = tmp_path / "foreign.safetensors"
    acts = _activations()
    del acts["layer.1"], acts["token_index"]
    save_file(acts, str(path), metadata={"sha256": tensors_sha256(acts)})  # a consistent but incomplete set
    with pytest.raises(RuntimeError, match=f"activation cache {path} is incomplete: missing token_index, layer.1"):
        load_activations(path)


def test_activation_cache_without_a_digest_is_an_error_not_a_pass(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file(_activations(), str(path))  # complete, but written by something else: nothing to verify it with
    with pytest.raises(IntegrityError, match=f"activation cache {path} has no sha256 digest.*rerun the activations"):
        load_activations(path)


@pytest.fixture
def artifact_dir(tiny, tmp_path):
    model, tokenizer = tiny
    return save_artifact(model, tokenizer, tmp_path / "artifact", ArtifactRecord("tiny", seed=0))


@pytest.mark.parametrize("corrupt", FORMAT_CORRUPTIONS.values(), ids=FORMAT_CORRUPTIONS.keys())
def test_corrupted_artifact_weights_are_an_error_naming_the_artifact(artifact_dir, corrupt):
    weights = artifact_dir / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(RuntimeError, match=f"cannot load weights of artifact {artifact_dir}"):
        load_artifact(artifact_dir, device="cpu")


def test_a_flipped_byte_in_artifact_weights_is_caught_by_their_digest(artifact_dir):
    weights = artifact_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="model.safetensors does not match its saved sha256"):
        load_artifact(artifact_dir, device="cpu")


def test_artifact_with_missing_weights_or_truncated_metadata_is_an_error(artifact_dir):
    (artifact_dir / "model.safetensors").rename(artifact_dir / "moved.safetensors")
    with pytest.raises(RuntimeError, match=f"cannot load weights of artifact {artifact_dir}"):
        load_artifact(artifact_dir, device="cpu")
    meta = artifact_dir / "artifact.json"
    meta.write_text(meta.read_text()[:10])
    with pytest.raises(IntegrityError, match=f"{meta} does not match the sha256 digest recorded in artifact.json.sha256"):
        load_artifact(artifact_dir, device="cpu")


def test_every_file_of_an_artifact_and_its_metadata_are_verified(artifact_dir):
    """Not only the weights: an edited config, tokenizer or artifact.json (still valid JSON) is refused."""
    load_artifact(artifact_dir, device="cpu")
    config = artifact_dir / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(IntegrityError, match=f"{config} does not match the sha256 digest recorded in"):
        load_artifact(artifact_dir, device="cpu")
    config.write_text(original)
    meta = artifact_dir / "artifact.json"
    meta.write_text(meta.read_text().replace('"seed": 0', '"seed": 1'))
    with pytest.raises(IntegrityError, match=f"{meta} does not match"):
        read_record(artifact_dir)


def test_an_artifact_without_digests_is_an_error_not_a_pass(artifact_dir):
    meta_path = artifact_dir / "artifact.json"
    digest_path(meta_path).unlink()
    with pytest.raises(IntegrityError, match=f"{meta_path} has no sha256 digest.*delete the artifact"):
        load_artifact(artifact_dir, device="cpu")
    meta = read_json(meta_path)
    del meta["weights_sha256"]  # as saved by an older realign, then given a sidecar: the weights are unverifiable
    write_json(meta_path, meta, digest=True)
    with pytest.raises(IntegrityError, match=f"{meta_path} records no weights_sha256"):
        load_artifact(artifact_dir, device="cpu")


CKA_CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from realign.measure.stage import similarity_to_teacher
    similarity_to_teacher(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[4] + ".json", n_boot=200)
""")


def test_cka_stage_is_deterministic_and_independent_of_the_thread_count(tmp_path):
    """Every measure, the sequence bootstrap and the layer x layer matrices: bit-identical on a rerun, equal to
    1e-9 across thread counts."""
    g = torch.Generator().manual_seed(0)
    teacher = {f"layer.{i}": torch.randn(600, 8, generator=g) @ torch.randn(8, 200, generator=g)
               + torch.randn(600, 200, generator=g) for i in range(3)}
    artifact = {k: v + 2 * torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    index = torch.stack([torch.arange(600), torch.arange(600)], 1)
    for name, acts in (("teacher", teacher), ("artifact", artifact)):
        save_activations({**acts, "token_index": index}, tmp_path / f"{name}.safetensors", {})
    paths = [str(tmp_path / "teacher.safetensors"), str(tmp_path / "artifact.safetensors")]
    first = similarity_to_teacher(*paths, tmp_path / "a.parquet", tmp_path / "a.json", n_boot=200)
    again = similarity_to_teacher(*paths, tmp_path / "b.parquet", tmp_path / "b.json", n_boot=200)
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()  # bootstrap and matrices too
    script = tmp_path / "cka.py"
    script.write_text(CKA_CHILD)
    for threads in (1, 2):
        subprocess.run([sys.executable, str(script), str(threads), *paths, str(tmp_path / f"t{threads}.parquet")],
                       check=True, env=ENV, timeout=120)
        other = pd.read_parquet(tmp_path / f"t{threads}.parquet")
        pd.testing.assert_frame_equal(first, other, check_exact=False, rtol=0, atol=1e-9)
    assert first["linear_cka"].between(0.05, 0.99).all()  # a non-trivial comparison


# --- security: nothing unpickles, nothing runs remote code unless the config says so ------------------------------

SOURCES = sorted([*REPO.glob("realign/**/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("benchmarks/*.py")])
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls that could execute code from a file: torch.load without weights_only=True, any unpickler,
    pandas.read_pickle, numpy.load(allow_pickle=True), trust_remote_code not taken from a parameter or a config
    `.get("trust_remote_code", False)`."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{filename}:{node.lineno} imports {n}" for n in names if n and n.split(".")[0] in UNPICKLERS]
        if isinstance(node, ast.FunctionDef):
            args = node.args
            defaults = [None] * (len(args.args) - len(args.defaults)) + args.defaults + args.kw_defaults
            for argument, default in zip(args.args + args.kwonlyargs, defaults):
                off_by_default = isinstance(default, ast.Constant) and default.value is False
                if argument.arg == "trust_remote_code" and not off_by_default:
                    problems.append(f"{filename}:{node.lineno} {node.name}(trust_remote_code) is not False by default")
        if not isinstance(node, ast.Call):
            continue
        name, keywords = _dotted(node.func), {k.arg: k.value for k in node.keywords}
        if name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                         and keywords["weights_only"].value is True):
            problems.append(f"{filename}:{node.lineno} torch.load without weights_only=True")
        if name.endswith("read_pickle") or name.split(".")[0] in UNPICKLERS:
            problems.append(f"{filename}:{node.lineno} calls {name}")
        allow = keywords.get("allow_pickle")
        if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            problems.append(f"{filename}:{node.lineno} allow_pickle")
        trust = keywords.get("trust_remote_code")
        from_parameter = isinstance(trust, ast.Name) and trust.id == "trust_remote_code"
        from_config = (isinstance(trust, ast.Call) and _dotted(trust.func).endswith(".get")
                       and [ast.literal_eval(a) for a in trust.args] == ["trust_remote_code", False])
        never = isinstance(trust, ast.Constant) and trust.value is False  # e.g. counting parameters at DAG build
        if trust is not None and not (from_parameter or from_config or never):
            problems.append(f"{filename}:{node.lineno} trust_remote_code={ast.unparse(trust)}")
    return problems


def test_the_checker_catches_what_it_looks_for():
    bad = textwrap.dedent("""
        import pickle
        import torch, numpy as np, pandas as pd
        def load(path, trust_remote_code=True): ...
        torch.load(path)
        torch.load(path, weights_only=False)
        pickle.loads(data)
        pd.read_pickle(path)
        np.load(path, allow_pickle=True)
        AutoModel.from_pretrained(path, trust_remote_code=True)
        AutoModel.from_pretrained(path, trust_remote_code=spec.get("trust_remote_code", True))
    """)
    assert len(unsafe_loads(bad, "bad.py")) == 9
    good = textwrap.dedent("""
        def load(path, trust_remote_code=False):
            torch.load(path, weights_only=True)
            AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
            AutoConfig.from_pretrained(path, trust_remote_code=spec.get("trust_remote_code", False))
            AutoConfig.from_pretrained(path, trust_remote_code=False)
    """)
    assert unsafe_loads(good, "good.py") == []


def test_no_unsafe_deserialisation_or_remote_code_in_the_sources():
    assert len(SOURCES) > 40 and any(p.name == "sources.py" for p in SOURCES)
    problems = [p for path in SOURCES for p in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert problems == []


def test_trust_remote_code_is_off_unless_the_config_turns_it_on():
    import inspect

    from realign.models.sources import load_pretrained

    uses = [path for path in SOURCES if "trust_remote_code=" in path.read_text()]
    assert {p.name for p in uses} >= {"sources.py", "stage.py", "resources.py"}  # the checker saw the real uses
    assert inspect.signature(load_pretrained).parameters["trust_remote_code"].default is False
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["models"]["additionalProperties"]["properties"]["trust_remote_code"] == \
        {"type": "boolean", "default": False}
    for config in [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]:
        models = yaml.safe_load(config.read_text()).get("models", {})
        assert not any(m.get("trust_remote_code") for m in models.values()), f"{config} trusts remote code"


# --- benchmarks/study_rules.py ----------------------------------------------------------------------------------

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _benchmark(root: Path, relative: str, *rows: tuple[float, str]) -> None:
    path = root / "results" / "benchmarks" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t50\t1\n" for s, rss in rows))


def test_study_rules_summarises_benchmark_files_per_rule(tmp_path):
    _benchmark(tmp_path, "recover/m/wanda-50/kd.tsv", (100.0, "4000.5"))
    _benchmark(tmp_path, "recover/m/rtn/kd.tsv", (30.0, "3900"))
    _benchmark(tmp_path, "similarity/m/none/none.tsv", (2.0, "NA"))
    _benchmark(tmp_path, "similarity/m/rtn/none.tsv", (4.0, "-"))
    _benchmark(tmp_path, "evaluate/m/none/none.tsv", (10.0, "1000"), (20.0, "1200"))  # repeat(): mean, max RSS
    _benchmark(tmp_path, "report/all.tsv", (1.5, "300"))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/study_rules.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if not line.startswith("-")}
    assert [line.split()[0] for line in lines[1:5]] == ["recover", "evaluate", "similarity", "report"]  # slowest first
    assert rows["recover"] == ["2", "130.0", "100.0", "4000"]
    assert rows["evaluate"] == ["1", "15.0", "15.0", "1200"]
    assert rows["similarity"] == ["2", "6.0", "4.0", "-"]
    assert rows["total"] == ["6", "152.5", "100.0", "4000"]


def test_study_rules_errors_name_the_directory_or_file(tmp_path):
    run = [sys.executable, str(REPO / "benchmarks/study_rules.py"), str(tmp_path)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"no Snakemake benchmark files (*.tsv) under {tmp_path}" in result.stderr
    bad = tmp_path / "results" / "benchmarks" / "similarity" / "x.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("seconds\n3\n")
    result = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"{bad} is not a Snakemake benchmark file" in result.stderr
