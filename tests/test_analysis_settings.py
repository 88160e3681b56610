"""realign.analysis.settings: one typed object from `analysis:` and the seed, its defaults from the schema only."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from realign.analysis.settings import DEFAULT_SEED, AnalysisSettings
from realign.config import ConfigError, load_schema, validate_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(REPO / "workflow/schemas/config.schema.yaml")
DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


def test_fields_are_the_schemas_analysis_keys_and_the_seed():
    keys = list(SCHEMA["properties"]["analysis"]["properties"])
    assert [f.name for f in dataclasses.fields(AnalysisSettings)] == keys + ["seed"]


def test_defaults_come_from_the_schema():
    properties = SCHEMA["properties"]["analysis"]["properties"]
    defaults = AnalysisSettings.defaults()
    for name, spec in properties.items():
        if "default" in spec:
            assert getattr(defaults, name) == spec["default"], name
    assert defaults.performance is None and defaults.seed == DEFAULT_SEED
    # a raw config gets the same defaults as one that went through validate_config
    raw = {"seed": 5, "analysis": {"performance": "bench_mean"}}
    settings = AnalysisSettings.from_config(raw)
    assert settings == defaults.replace(performance="bench_mean", seed=5)
    assert raw == {"seed": 5, "analysis": {"performance": "bench_mean"}}  # not filled in place


def test_from_the_shipped_config():
    config = validate_config(DEFAULT, SCHEMA)
    settings = AnalysisSettings.from_config(config)
    assert settings == AnalysisSettings.from_config(DEFAULT)
    assert settings.seed == config["seed"]
    for field in dataclasses.fields(settings):
        if field.name != "seed":
            assert getattr(settings, field.name) == config["analysis"][field.name]


@pytest.mark.parametrize("config,pattern", [
    ({"seed": 0, "analysis": {"performance": "bench_mean", "alpha": 1.5}}, r"^invalid config key analysis\.alpha:"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "n_boot": 10}}, r"^invalid config key analysis\.n_boot:"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "cka_estimator": "rbf"}},
     r"^invalid config key analysis\.cka_estimator: 'rbf' is not allowed"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "n_bootstrap": 10}},
     r"^invalid config key analysis: .*'n_bootstrap' was unexpected"),
    ({"seed": 0, "analysis": {}}, r"^invalid config key analysis: 'performance' is a required property"),
    ({"analysis": {"performance": "bench_mean"}}, r"^invalid config key seed: missing"),
    ({"seed": -1, "analysis": {"performance": "bench_mean"}}, r"^invalid config key seed:"),
    ({"seed": 0}, r"^invalid config key analysis: missing"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "theta_support": 1.5}},
     r"^invalid config key analysis\.theta_support:"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "theta_refute": -0.1}},
     r"^invalid config key analysis\.theta_refute:"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "theta_refute": 0.6}},
     r"^invalid config key analysis\.theta_refute: 0\.6 is above analysis\.theta_support 0\.5"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "meaningful_recovery": 0}},
     r"^invalid config key analysis\.meaningful_recovery:"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "cka_rise_min": "half"}},
     r"^invalid config key analysis\.cka_rise_min:"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "held_cka_margin": 2}},
     r"^invalid config key analysis\.held_cka_margin:"),
    ({"seed": 0, "analysis": {"performance": "bench_mean", "kl_margin": -1}},
     r"^invalid config key analysis\.kl_margin:"),
])
def test_from_config_errors_name_the_key(config, pattern):
    with pytest.raises(ConfigError, match=pattern):
        AnalysisSettings.from_config(config)


def test_typed_frozen_and_overridable():
    settings = AnalysisSettings.defaults(n_boot=50, seed=np.int64(3))
    assert settings.n_boot == 50 and settings.n_perm == AnalysisSettings.defaults().n_perm
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.alpha = 0.1
    with pytest.raises(ConfigError, match=r"analysis\.n_boot: '50' is not of type integer"):
        AnalysisSettings.defaults(n_boot="50")
    with pytest.raises(ConfigError, match=r"analysis\.min_n: True is not of type integer"):
        settings.replace(min_n=True)
    with pytest.raises(ConfigError, match=r"analysis\.theta_refute: 0\.7 is above analysis\.theta_support"):
        settings.replace(theta_refute=0.7)
    with pytest.raises(ConfigError, match=r"analysis\.kl_margin: None is not of type number"):
        settings.replace(kl_margin=None)
    with pytest.raises(TypeError, match="not an analysis setting: n_bootstrap"):
        settings.replace(n_bootstrap=10)
    assert AnalysisSettings.resolve(None) == AnalysisSettings.defaults()
    assert AnalysisSettings.resolve(settings, alpha=0.1) == dataclasses.replace(settings, alpha=0.1)


def test_a_settings_object_and_keyword_overrides_give_the_same_analysis():
    from realign.analysis.stats import analyze

    rng = np.random.default_rng(0)
    x = rng.uniform(0.02, 0.3, 10)
    table = pd.DataFrame({"model": "m", "degradation": [f"d{i}" for i in range(10)], "recovery": "kd",
                          "family": "pruning", "performance_metric": "bench_mean", "delta_cka": x,
                          "recovery_fraction": 0.1 + 3 * x + rng.normal(0, 0.05, 10),
                          "delta_kl": rng.normal(-0.2, 0.05, 10), "damage_within_noise": False,
                          "gain_within_noise": False})
    config = copy.deepcopy(DEFAULT)
    config["analysis"].update(n_boot=200, n_perm=150, alpha=0.1, min_effect=0.4)
    settings = AnalysisSettings.from_config(config)
    by_object = analyze(table, settings)
    by_keywords = analyze(table, n_boot=200, n_perm=150, alpha=0.1, min_effect=0.4, seed=config["seed"])
    assert by_object == by_keywords
    assert by_object["settings"]["n_perm"] == 150 and by_object["settings"]["seed"] == config["seed"]
