# Recover a damaged model under its damage's constraint: kd, sdft, or the sft control.


rule recover:
    input:
        teacher=teacher_dir,
        damaged="results/models/{model}/{degradation}/none",
        answers="results/data/{model}/teacher_answers.jsonl",
    output:
        maybe_temp(directory("results/models/{model}/{degradation}/{recovery}")),
    wildcard_constraints:
        degradation=_alternatives(DEGRADATIONS),
        recovery=_alternatives(RECOVERIES),
    params:
        spec=lambda wc: training_params(config, "recoveries", wc.recovery),
    log:
        "logs/recover/{model}/{degradation}/{recovery}.log",
    benchmark:
        "results/benchmarks/recover/{model}/{degradation}/{recovery}.tsv"
    threads: 2
    resources:
        **sized("train"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/recover.py"
