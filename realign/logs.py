"""Route a job's logging, warnings and stderr (tqdm bars) into its Snakemake log file."""

from __future__ import annotations

import logging
import sys
import warnings


def route_to(log_path: str, threads: int | None = None) -> None:
    handle = open(log_path, "a", buffering=1)
    sys.stderr = handle
    logging.basicConfig(level=logging.INFO, stream=handle, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    if threads:
        import torch

        torch.set_num_threads(threads)
