"""The library installs and works outside the repository (issue 31): a researcher who wants the statistics or the
report in a notebook gets the config schema and the report's template and style with the package
(realign/assets, links to workflow/schemas/ and report/ that a build copies)."""

import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from test_report import _study

from realign.analysis.stats import analyze

REPO = Path(__file__).resolve().parents[1]
# what a build reads: the package and the files its assets link to
SOURCES = ("pyproject.toml", "README.md", "realign", "workflow/schemas", "report")


def test_an_installed_package_loads_its_settings_and_renders_a_report_outside_the_repository(tmp_path):
    source = tmp_path / "source"
    for name in SOURCES:  # a copy, so that the build leaves nothing in the repository
        src, dest = REPO / name, source / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--disable-pip-version-check", "--target", str(site), str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert not (site / "realign" / "assets" / "config.schema.yaml").is_symlink()

    table, cka = _study(tmp_path)
    inputs = tmp_path / "inputs.pkl"
    inputs.write_bytes(pickle.dumps((table, analyze(table, n_boot=50, n_perm=50), cka)))
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    script = textwrap.dedent(f"""
        import pickle, realign
        from realign.analysis.report import render_report
        from realign.analysis.settings import AnalysisSettings
        assert realign.__file__.startswith({str(site)!r}), realign.__file__
        settings = AnalysisSettings.defaults()
        table, stats, cka = pickle.loads(open({str(inputs)!r}, "rb").read())
        render_report(table, stats, cka, {{}}, "report.html")
        print(settings.alpha)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "0.05"
    html = (elsewhere / "report.html").read_text()
    assert "<style>" in html and "font-family" in html and stats_word(html)


def stats_word(html: str) -> bool:
    """The report names its verdict (inconclusive, supported, ...), which only the packaged template writes."""
    return any(word in html for word in ("inconclusive", "supported", "refuted", "mixed"))
