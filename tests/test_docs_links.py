"""The docs travel with the repository: every relative link in README.md and docs/**/*.md resolves to a file or
folder inside it (no link reaches outside, e.g. to a design document next to the checkout)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_doc_link_resolves_inside_the_repository():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or REPO not in (path, *path.parents):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_the_readme_is_a_users_guide_not_the_reference():
    """Issue 31: the reference (methods, measures, statistics, layout, tests) lives in docs/; the README guides."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 20_000
    for page in ("docs/index.md", "docs/reading-the-report.md", "docs/configuration.md", "docs/methods.md",
                 "docs/measures.md", "docs/statistics.md", "docs/extending.md"):
        assert f"]({page})" in readme or page == "docs/index.md" and "](docs/index.md)" in readme, page
