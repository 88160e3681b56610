# Measure every artifact: hidden states on the probe set, CKA vs the teacher, output divergence, benchmarks.


rule activations:
    input:
        model=model_dir,
        prompts="results/data/prompts.json",
    params:
        artifact=model_path,
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


rule cka:
    input:
        teacher="results/activations/{model}/none/none.safetensors",
        artifact="results/activations/{model}/{degradation}/{recovery}.safetensors",
    output:
        "results/cka/{model}/{degradation}/{recovery}.parquet",
    log:
        "logs/cka/{model}/{degradation}/{recovery}.log",
    benchmark:
        "results/benchmarks/cka/{model}/{degradation}/{recovery}.tsv"
    threads: 2
    resources:
        **sized("light"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/cka.py"


rule divergence:
    input:
        teacher=teacher_dir,
        model=model_dir,
        prompts="results/data/prompts.json",
    params:
        artifact=model_path,
    output:
        "results/divergence/{model}/{degradation}/{recovery}.json",
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
    output:
        "results/eval/{model}/{degradation}/{recovery}.json",
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
