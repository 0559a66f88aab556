"""Compile keytrace's two native parts, once per source version, into a cache directory.

* ``kt_interceptor.c``: the librdkafka interceptor plugin. It needs only a C
  compiler and libc headers (no librdkafka headers, no Python headers).
* ``kt_produce.c``: the ``_kt_produce`` extension module, ``TracedProducer.produce``
  as a C method descriptor. It also needs Python's headers (``Python.h``); without
  them the Python method is used instead.

``python -m collector.native.build [DIR]`` builds both ahead of time (for example in
a Dockerfile layer) and prints their paths.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kt_interceptor.c")
CFLAGS = ["-O2", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden", "-Wall"]
EXT_SOURCE = Path(__file__).with_name("kt_produce.c")
EXT_NAME = "_kt_produce"


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


def ext_flags() -> list[str]:
    include = sysconfig.get_paths().get("include") or ""
    return [*CFLAGS, f"-I{include}"]


def ext_artifact_name() -> str:
    soabi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    digest = hashlib.sha256(EXT_SOURCE.read_bytes() + " ".join(ext_flags()).encode()).hexdigest()[:16]
    return f"{EXT_NAME}-{soabi}-{digest}.so"


def build(directory: Path | None = None) -> Path:
    """Return the path of the built plugin, compiling it if this source version was never built there."""
    return _build(SOURCE, CFLAGS, artifact_name(), "kt_interceptor-*.so", directory)


def build_extension(directory: Path | None = None) -> Path:
    """Return the path of the built `_kt_produce` extension module, compiling it if needed."""
    built = (Path(directory) if directory is not None else cache_dir()) / ext_artifact_name()
    if built.is_file():  # prebuilt (a Docker builder stage, say): no headers needed here
        return built
    include = Path(sysconfig.get_paths().get("include") or "")
    if not (include / "Python.h").is_file():
        raise BuildError(f"Python's headers are missing ({include}/Python.h; on Debian: apt-get install python3-dev)")
    return _build(EXT_SOURCE, ext_flags(), ext_artifact_name(), f"{EXT_NAME}-*.so", directory)


def _build(source: Path, flags: list[str], name: str, stale_glob: str, directory: Path | None) -> Path:
    if not sys.platform.startswith("linux"):
        raise BuildError(f"the native parts are built for Linux only (this is {sys.platform})")
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / name
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
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise BuildError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
        for stale in directory.glob(stale_glob):
            if stale != target:
                stale.unlink(missing_ok=True)  # a process still using it keeps its mapping
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"building {source.name} with {cc} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(build(where))
    try:
        print(build_extension(where))
    except BuildError as exc:  # optional: TracedProducer.produce then stays a Python method
        print(f"{EXT_NAME} not built: {exc}", file=sys.stderr)
