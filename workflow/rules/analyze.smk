# One row per artifact, the statistics, and the HTML report with the verdict.


rule table:
    input:
        artifacts=[artifact_dir(*cell) for cell in artifacts()],
        evals=measurement_files("eval", "json"),
        item_records=measurement_files("eval", "items.parquet"),
        sequence_records=measurement_files("eval", "sequences.parquet"),
        divergences=measurement_files("divergence", "json"),
        similarities=measurement_files("similarity", "parquet"),
        similarity_summaries=measurement_files("similarity", "json"),
    output:
        table="results/table.parquet",
        similarity_layers="results/similarity_layers.parquet",
        table_digest=digest_of("results/table.parquet"),
        similarity_layers_digest=digest_of("results/similarity_layers.parquet"),
    params:
        cells=artifacts(),
        artifact_paths=[ArtifactId.parse(*cell).location for cell in artifacts()],
        analysis={key: config["analysis"][key] for key in ("performance", "cka_estimator", "n_boot", "alpha")},
        seed=SEED,
    log:
        "logs/analyze/table.log",
    benchmark:
        "results/benchmarks/table/all.tsv"
    threads: 1
    resources:
        **sized("light"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/table.py"


rule report:
    input:
        table="results/table.parquet",
        similarity_layers="results/similarity_layers.parquet",
        null_floors=[f"results/null/{m}/floors.parquet" for m in MODELS],
        similarity_summaries=measurement_files("similarity", "json"),  # the layer x layer heatmaps
        prompts="results/data/prompts.json",
        benchmarks="results/data/benchmarks",
        teachers=[artifact_dir(m, "none", "none") for m in MODELS],
    output:
        stats="results/stats.json",
        # Both also go into `snakemake --report results/report.zip`: the HTML report and each of its figures as
        # an SVG file ({section}-{slug}.svg or {section}.svg), captions in report/captions/.
        report=report("results/report.html", caption="../../report/captions/report.rst", category="Report"),
        figures=report(directory("results/figures"), patterns=["{name}.svg"],
                       caption="../../report/captions/figures.rst", category="Figures", labels={"figure": "{name}"}),
    params:
        analysis=config["analysis"],
        config=config,
        config_hash=config_hash(config),
        code=code_provenance(),  # the code's commit, and the pre-registration page's: printed by the report
        cells=artifacts(),  # (model, degradation, recovery) of each similarity summary, in their order
        seed=SEED,
        timings_root="results/benchmarks",  # every other job's benchmark file: the report's run times
    log:
        "logs/analyze/report.log",
    benchmark:
        "results/benchmarks/report/all.tsv"
    threads: 1
    resources:
        **sized("light"),
    conda:
        CONDA_ENV
    script:
        "../../scripts/report.py"
