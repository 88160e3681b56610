"""The settings of the analysis: the config's `analysis:` block and the study seed, as one typed, frozen object.

Built once per study (`AnalysisSettings.from_config`) and passed to every statistic of realign.analysis, in place
of the keyword arguments each used to take. The defaults live in the config schema
(workflow/schemas/config.schema.yaml) and nowhere else: `from_config` checks the block against the schema and
fills its defaults there, and `defaults()` (for use outside a study: tests, notebooks) reads the same schema.

Every statistic that reads settings has the signature ``f(table, settings=None, **overrides)``: ``settings``
(the schema's defaults when None) with ``overrides`` replacing single fields, e.g. ``analyze(table, n_boot=300)``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from realign.config import SCHEMA_PATH, ConfigError, check_theta_thresholds, load_schema, validate_key

# Outside a study (defaults()): the seed of the statistics' resampling. In a study it is the config's top-level
# `seed`, which has no default.
DEFAULT_SEED = 0


@functools.cache
def _schema() -> dict:
    return load_schema(SCHEMA_PATH)


@dataclass(frozen=True)
class AnalysisSettings:
    """The `analysis:` block of the config (meanings in the schema) plus the study seed.

    performance: the performance measure P of the table (None outside a study: the table names its own);
    cka_estimator: the CKA the table summarises (debiased or linear); alpha: the error rate of every interval
    and test; min_effect: the smallest Spearman rho that counts as an association; n_boot, n_perm: bootstrap
    replicates and permutations; min_n: fewer analysed artifacts give "inconclusive" without statistics;
    min_n_ci: fewer do not refute by the correlation CI; seed: the seed of all resampling.

    The pre-registered rules of the theta verdict (realign.analysis.theta), ratios to the kd arm on the
    same damaged parent: theta_support (supported: pooled theta's lower bound above it), theta_refute (refuted:
    its upper bound below it; at most theta_support), meaningful_recovery (the share of kd's gain below which an
    arm's recovery is not meaningful), cka_rise_min (the share of kd's delta CKA an arm must exceed to count as
    re-aligning), held_cka_margin (the held arm's delta CKA bound: its allowed share of kd's plus this share),
    kl_margin (the share of kd's KL reduction the held arm may leave), eligible_gain_share (kd's mean gain must reach
    this share of the damage for the damage to enter theta). power_tables: simulated studies per cell of
    the study's own power (realign.analysis.theta.power.study_power; 0: none)."""

    performance: str | None
    cka_estimator: str
    alpha: float
    min_effect: float
    n_boot: int
    n_perm: int
    min_n: int
    min_n_ci: int
    theta_support: float
    theta_refute: float
    meaningful_recovery: float
    cka_rise_min: float
    held_cka_margin: float
    kl_margin: float
    eligible_gain_share: float
    power_tables: int
    seed: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = _TYPES[field.name]
            if isinstance(value, bool) or not isinstance(value, expected):
                where = "seed" if field.name == "seed" else f"analysis.{field.name}"
                names = " or ".join(_TYPE_NAMES[t] for t in expected)
                raise ConfigError(f"invalid config key {where}: {value!r} is not of type {names}")
        # Settings built from overrides bypass validate_config: its cross-key check again.
        check_theta_thresholds(self.theta_support, self.theta_refute)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AnalysisSettings:
        """From a study config: its `analysis:` block, checked against the schema with the schema's defaults
        filled in (ConfigError naming the key, e.g. `analysis.alpha`), and its top-level `seed`. A config that
        went through realign.config.validate_config passes unchanged."""
        schema = _schema()
        analysis = validate_key(config, schema, "analysis")
        seed = validate_key(config, schema, "seed")
        return cls(**analysis, seed=seed)

    @classmethod
    def defaults(cls, **overrides) -> AnalysisSettings:
        """The schema's defaults, with `overrides` (field names): for use outside a study, where performance is
        None (the table names its measure) and seed is DEFAULT_SEED."""
        return _defaults().replace(**overrides)

    @classmethod
    def resolve(cls, settings: AnalysisSettings | None = None, **overrides) -> AnalysisSettings:
        """`settings` (the schema's defaults when None) with `overrides`: what ``f(table, settings=None,
        **overrides)`` computes with."""
        return (settings if settings is not None else _defaults()).replace(**overrides)

    def replace(self, **changes) -> AnalysisSettings:
        """A copy with some fields changed (TypeError for a name that is not a field)."""
        unknown = sorted(set(changes) - set(_TYPES))
        if unknown:
            raise TypeError(f"not an analysis setting: {', '.join(unknown)} (the settings: {', '.join(_TYPES)})")
        return dataclasses.replace(self, **changes) if changes else self


_REAL, _INT = (numbers.Real,), (numbers.Integral,)  # numpy scalars included; __post_init__ refuses bool
_TYPES: dict[str, tuple[type, ...]] = {
    "performance": (str, type(None)), "cka_estimator": (str,), "alpha": _REAL, "min_effect": _REAL, "n_boot": _INT,
    "n_perm": _INT, "min_n": _INT, "min_n_ci": _INT, "theta_support": _REAL, "theta_refute": _REAL,
    "meaningful_recovery": _REAL, "cka_rise_min": _REAL, "held_cka_margin": _REAL, "kl_margin": _REAL,
    "eligible_gain_share": _REAL, "power_tables": _INT,
    "seed": _INT,
}
_TYPE_NAMES = {str: "string", type(None): "None", numbers.Real: "number", numbers.Integral: "integer"}


@functools.cache
def _defaults() -> AnalysisSettings:
    properties = _schema()["properties"]["analysis"]["properties"]
    values = {name: spec["default"] for name, spec in properties.items() if "default" in spec}
    return AnalysisSettings(**{"performance": None, "seed": DEFAULT_SEED, **values})
