# Measure every artifact: hidden states on the probe set, CKA vs the teacher, output divergence (against the
# teacher's outputs cached once per model), benchmarks.


rule activations:
    input:
        model=model_dir,
        prompts="results/data/prompts.json",
    params:
        artifact=model_path,
        probe=get_probe_params,
        dtype=config["measure"]["dtype"],
    output:
        "results/activations/{model}/{degradation}/{recovery}.safetensors",
    log:
        "logs/activations/{model}/{degradation}/{recovery}.log",
    benchmark:
        "results/benchmarks/activations/{model}/{degradation}/{recovery}.tsv"
    threads: 2
    resources:
        **sized("measure"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/activations.py"


rule null_activations:
    input:
        teacher=teacher_dir,
        prompts="results/data/prompts.json",
    params:
        probe=get_probe_params,
    output:
        "results/null/{model}/random-init.safetensors",
    log:
        "logs/null/{model}/activations.log",
    benchmark:
        "results/benchmarks/null_activations/{model}.tsv"
    threads: 2
    resources:
        **sized("measure"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/null_activations.py"


rule null_floors:
    input:
        teacher="results/activations/{model}/none/none.safetensors",
        random="results/null/{model}/random-init.safetensors",
    params:
        similarity=get_similarity_params(),
    output:
        "results/null/{model}/floors.parquet",
        digest=digest_of("results/null/{model}/floors.parquet"),
    log:
        "logs/null/{model}/floors.log",
    benchmark:
        "results/benchmarks/null_floors/{model}.tsv"
    threads: 2
    resources:
        **sized("similarity"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/null_floors.py"


rule similarity:
    input:
        teacher="results/activations/{model}/none/none.safetensors",
        artifact="results/activations/{model}/{degradation}/{recovery}.safetensors",
    params:
        similarity=get_similarity_params,
    output:
        layers="results/similarity/{model}/{degradation}/{recovery}.parquet",
        summary="results/similarity/{model}/{degradation}/{recovery}.json",
        layers_digest=digest_of("results/similarity/{model}/{degradation}/{recovery}.parquet"),
        summary_digest=digest_of("results/similarity/{model}/{degradation}/{recovery}.json"),
    log:
        "logs/similarity/{model}/{degradation}/{recovery}.log",
    benchmark:
        "results/benchmarks/similarity/{model}/{degradation}/{recovery}.tsv"
    threads: 2
    resources:
        **sized("similarity"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/similarity.py"


# The teacher's side of the divergence, once per model: its logits at the supervised positions of the divergence
# examples (float32, ~400 MB for SmolLM2's 24 prompts), read by every artifact's divergence job.
rule teacher_outputs:
    input:
        teacher=teacher_dir,
        prompts="results/data/prompts.json",
    params:
        scoring=get_scoring_params(),
    output:
        "results/teacher/{model}/divergence_logits.safetensors",
    log:
        "logs/teacher_outputs/{model}.log",
    benchmark:
        "results/benchmarks/teacher_outputs/{model}.tsv"
    threads: 2
    resources:
        **sized("measure"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/teacher_outputs.py"


rule divergence:
    input:
        teacher_outputs="results/teacher/{model}/divergence_logits.safetensors",
        model=model_dir,
        prompts="results/data/prompts.json",
    params:
        artifact=model_path,
        scoring=get_scoring_params(),
    output:
        "results/divergence/{model}/{degradation}/{recovery}.json",
        digest=digest_of("results/divergence/{model}/{degradation}/{recovery}.json"),
    log:
        "logs/divergence/{model}/{degradation}/{recovery}.log",
    benchmark:
        "results/benchmarks/divergence/{model}/{degradation}/{recovery}.tsv"
    threads: 2
    resources:
        **sized("measure"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/divergence.py"


rule evaluate:
    input:
        model=model_dir,
        prompts="results/data/prompts.json",
        code_heldout="results/data/code_heldout.jsonl",
        math_heldout="results/data/math_heldout.jsonl",
        tasks="results/data/benchmarks",
    params:
        artifact=model_path,
        evaluation={"tasks": list(config["measure"]["benchmarks"]), "max_len": config["training"]["max_len"],
                    "code_heldout_chunks": config["data"]["code_heldout_chunks"],
                    "batch_size": config["measure"]["eval_batch_size"], "dtype": config["measure"]["dtype"]},
    output:
        summary="results/eval/{model}/{degradation}/{recovery}.json",
        item_records="results/eval/{model}/{degradation}/{recovery}.items.parquet",
        sequence_records="results/eval/{model}/{degradation}/{recovery}.sequences.parquet",
        digest=digest_of("results/eval/{model}/{degradation}/{recovery}.json"),
        item_records_digest=digest_of("results/eval/{model}/{degradation}/{recovery}.items.parquet"),
        sequence_records_digest=digest_of("results/eval/{model}/{degradation}/{recovery}.sequences.parquet"),
    log:
        "logs/evaluate/{model}/{degradation}/{recovery}.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/{degradation}/{recovery}.tsv"
    threads: 2
    resources:
        **sized("measure"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/evaluate.py"
