# Recover a damaged model under its damage's constraint (realign.recover.methods: self-distillation methods and
# the controls), from the teacher's cached answers, rewrites or top-k logits.


rule teacher_top_k:
    input:
        teacher=lambda wc: artifact_dir(wc.model, wc.teacher, "none"),
        answers="results/data/{model}/teacher_answers.jsonl",
    output:
        "results/data/{model}/teacher_top_k/{teacher}.len{max_len}.k{top_k}.t{temperature}.safetensors",
    wildcard_constraints:
        teacher=_alternatives(["none"] + list(config["degradations"])),
        max_len=r"[0-9]+",
        top_k=r"[0-9]+",
        temperature=r"[0-9.]+",
    params:
        batch_size=config["measure"]["eval_batch_size"],
    log:
        "logs/teacher_top_k/{model}/{teacher}.len{max_len}.k{top_k}.t{temperature}.log",
    benchmark:
        "results/benchmarks/teacher_top_k/{model}/{teacher}.len{max_len}.k{top_k}.t{temperature}.tsv"
    threads: 2
    resources:
        **sized("measure"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/teacher_top_k.py"


rule content_states:
    input:
        model=lambda wc: artifact_dir(wc.model, wc.artifact, "none"),
        answers="results/data/{model}/teacher_answers.jsonl",
    output:
        "results/data/{model}/content_states/{artifact}.len{max_len}.layers-{layers}.safetensors",
    wildcard_constraints:
        artifact=_alternatives(["none"] + list(config["degradations"])),
        max_len=r"[0-9]+",
        layers=r"inner|[0-9]+-[0-9]+",
    params:
        alignment_layers=lambda wc: layers_from_label(wc.layers),
        batch_size=config["measure"]["eval_batch_size"],
    log:
        "logs/content_states/{model}/{artifact}.len{max_len}.layers-{layers}.log",
    benchmark:
        "results/benchmarks/content_states/{model}/{artifact}.len{max_len}.layers-{layers}.tsv"
    threads: 2
    resources:
        **sized("measure"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/content_states.py"


rule recover:
    input:
        unpack(get_recovery_inputs),
    output:
        maybe_temp(directory("results/models/{model}/{degradation}/{recovery}")),
    wildcard_constraints:
        degradation=_alternatives(["none"] + DEGRADATIONS),
        recovery=_alternatives(TRAINED),
    params:
        spec=lambda wc: recovery_spec(config, wc.recovery)[0],
        seed=lambda wc: recovery_spec(config, wc.recovery)[1],
        checkpoint_steps=lambda wc: checkpoint_steps(recovery_spec(config, wc.recovery)[0]),
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
