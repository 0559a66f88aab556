"""The Dockerfile cannot be built on this machine (no Docker engine), so it is linted instead."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_what_the_package_needs() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for path in ("pyproject.toml", "README.md", "collector", "dashboard", "sample_data"):
        assert f"COPY {path}" in text
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"
