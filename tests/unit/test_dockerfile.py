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
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    # Sources of COPY from the build context (not from another stage).
    copied = {src for line in lines if line.startswith("COPY ") and "--from" not in line for src in line.split()[1:-1]}
    for path in ("pyproject.toml", "README.md", "collector", "dashboard", "sample_data"):
        assert path in copied, f"the Dockerfile does not copy {path}"
    for path in copied:
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"
