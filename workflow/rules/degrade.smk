# Damage the teacher: forgetting (narrow SFT), quantization (RTN), pruning (magnitude).


rule degrade:
    input:
        teacher=teacher_dir,
        code_train="results/data/code_train.jsonl",
    output:
        maybe_temp(directory("results/models/{model}/{degradation}/none")),
    wildcard_constraints:
        degradation=_alternatives(DEGRADATIONS),
    params:
        spec=lambda wc: training_params(config, "degradations", wc.degradation),
    log:
        "logs/degrade/{model}/{degradation}.log",
    benchmark:
        "results/benchmarks/degrade/{model}/{degradation}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        CONDA_ENV
    script:
        "../../scripts/degrade.py"
