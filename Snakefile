# realign: does self-distillation recover a damaged LLM, and does it do so by re-aligning hidden-layer geometry?
# Entry point: validates the config, includes one rule file per stage, and asks for the report.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/degrade.smk"
include: "workflow/rules/recover.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/analyze.smk"


rule all:
    input:
        "results/report.html",
    default_target: True
