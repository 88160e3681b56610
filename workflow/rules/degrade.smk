# Damage the teacher: forgetting (narrow SFT on code or math), quantization (RTN, GPTQ, NVFP4, bitsandbytes),
# pruning (magnitude, Wanda, SparseGPT; unstructured or N:M).


def degrade_inputs(wildcards):
    spec = config["degradations"][wildcards.degradation]
    inputs = {"teacher": teacher_dir(wildcards)}
    if spec["method"] == "sft":
        inputs["narrow_train"] = f"results/data/{spec.get('corpus', 'code')}_train.jsonl"
    if spec["method"] in CALIBRATED_METHODS:  # calibrated on the distillation split only
        inputs["prompts"] = "results/data/prompts.json"
    return inputs


rule degrade:
    input:
        unpack(degrade_inputs),
    output:
        maybe_temp(directory("results/models/{model}/{degradation}/none")),
    wildcard_constraints:
        degradation=_alternatives(DEGRADATIONS),
    params:
        damage=get_degrade_params,
    log:
        "logs/degrade/{model}/{degradation}.log",
    benchmark:
        "results/benchmarks/degrade/{model}/{degradation}.tsv"
    threads: 2
    resources:
        **sized("train"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/degrade.py"
