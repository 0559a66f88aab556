"""Compile the interceptor plugin (kt_interceptor.c) into a shared object, once per source version.

The plugin needs only a C compiler and libc headers (no librdkafka headers, no
Python headers), so it is built on first use into a cache directory and reused.
``python -m collector.native.build [DIR]`` builds it ahead of time (for example
in a Dockerfile layer) and prints its path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kt_interceptor.c")
CFLAGS = ["-O2", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden", "-Wall"]


class BuildError(RuntimeError):
    """The plugin could not be compiled (no compiler, or it failed)."""


def cache_dir() -> Path:
    """Where built plugins are kept: $KEYTRACE_NATIVE_DIR, else the user's cache directory."""
    explicit = os.environ.get("KEYTRACE_NATIVE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keytrace" / "native"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def artifact_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    return f"kt_interceptor-{platform.machine()}-{digest}.so"


def build(directory: Path | None = None) -> Path:
    """Return the path of the built plugin, compiling it if this source version was never built there."""
    if not sys.platform.startswith("linux"):
        raise BuildError(f"the native plugin is built for Linux only (this is {sys.platform})")
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / artifact_name()
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC, or install gcc and libc6-dev)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create {directory}: {exc}") from exc
    # Build under a temporary name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=".kt_interceptor-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise BuildError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
        for stale in directory.glob("kt_interceptor-*.so"):
            if stale != target:
                stale.unlink(missing_ok=True)  # a process still using it keeps its mapping
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"building the plugin with {cc} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
