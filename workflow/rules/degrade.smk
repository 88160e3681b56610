# Damage the teacher: forgetting (narrow SFT on code or math), quantization (RTN, GPTQ, NVFP4, bitsandbytes),
# pruning (magnitude, Wanda, SparseGPT; unstructured or N:M).


rule degrade:
    input:
        unpack(get_degrade_inputs),
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
