"""Synthetic per-item and per-sequence records for analysis tests: built to reproduce given table rows exactly.

For every row and benchmark task, `n_items` items whose `acc` is 1 on the first round(acc * n_items) items (so two
artifacts' items overlap as much as their accuracies allow: the pairing the bootstrap exploits), `accuracy` = acc
and `gold_logprob` = acc - 1; for `nll_general`, `n_sequences` sequences of 10 tokens whose per-token NLL is the
row's, plus a seeded zero-mean spread of `nll_spread` that is shared by every artifact (the items' own
difficulty). Accuracies that are not multiples of 1/n_items are rounded to one in the rows themselves (in place),
and their bench_mean recomputed, so that rows and records describe the same evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from realign.analysis.table import Records

KEY = ["model", "degradation", "recovery"]


def records_for(rows: list[dict], n_items: int = 200, n_sequences: int = 40, nll_spread: float = 0.2,
                n_boot: int = 400, seed: int = 0) -> Records:
    items, sequences = [], []
    spread = np.random.default_rng(12345).normal(0.0, nll_spread, n_sequences)
    spread -= spread.mean()
    for row in rows:
        key = {k: row[k] for k in KEY}
        tasks = [t for t in str(row.get("tasks", "")).split(",") if t]
        for task in tasks:
            k = round(row[f"acc_{task}"] * n_items)
            row[f"acc_{task}"] = k / n_items
            for i in range(n_items):
                acc = float(i < k)
                items.append({**key, "stratum": task, "record": f"{task}-{i:04d}", "acc": acc, "accuracy": acc,
                              "gold_logprob": acc - 1.0})
        if tasks:
            row["bench_mean"] = float(np.mean([row[f"acc_{t}"] for t in tasks]))
        if "nll_general" in row:
            for i in range(n_sequences):
                sequences.append({**key, "stratum": "general", "record": str(i),
                                  "nll_sum": 10.0 * (row["nll_general"] + spread[i]), "n_tokens": 10.0})
    return Records(pd.DataFrame(items), pd.DataFrame(sequences), n_boot=n_boot, seed=seed)
