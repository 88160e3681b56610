"""The analysed set: which rows of the table the statistics use, and how they name an artifact.

The analysed rows are the recovered artifacts of a damaged model (``degradation != "none"``, ``recovery !=
"none"``) that are not checkpoints, whose damage is *not* within noise, and whose ``recovery_fraction`` and
``delta_cka`` are finite (see :mod:`realign.analysis.table` for the columns and the noise rule).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def artifact_label(row) -> str:
    """``model/degradation/recovery``: how results and reasons name an artifact."""
    return f"{row['model']}/{row['degradation']}/{row['recovery']}"


def select_analysed(table: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """The rows the statistics use, and the excluded candidate rows with the reason."""
    cand = table[(table["degradation"] != "none") & (table["recovery"] != "none")]
    keep, excluded = [], []
    for i, row in cand.iterrows():
        reason = None
        if bool(row.get("checkpoint", False)):
            reason = "checkpoint (dose-response, not an independent arm)"
        elif bool(row.get("damage_within_noise", False)):
            reason = "damage within noise"
        elif not np.isfinite(float(row["recovery_fraction"])):
            reason = "recovery fraction undefined"
        elif not np.isfinite(float(row["delta_cka"])):
            reason = "delta_cka missing"
        if reason:
            excluded.append({"artifact": artifact_label(row), "reason": reason})
        else:
            keep.append(i)
    return cand.loc[keep].copy(), excluded
