"""A bounded directory of Arrow IPC files that holds batches while a sink is down."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("keytrace.spool")

SUFFIX = ".arrow"


class Spool:
    """Oldest-first files; `put` refuses (and the caller counts a drop) past `max_bytes`."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bytes: int | None = None
        self.last_error: str | None = None

    def _scan(self) -> int:
        total = 0
        if self.dir.is_dir():
            for p in self.dir.glob("*" + SUFFIX):
                try:
                    total += p.stat().st_size
                except OSError:
                    pass
        return total

    @property
    def bytes_used(self) -> int:
        with self._lock:
            if self._bytes is None:
                self._bytes = self._scan()
            return self._bytes

    def put(self, payload: bytes) -> bool:
        """Store one batch; False when the bound is reached or the disk refuses."""
        size = len(payload)
        if self.bytes_used + size > self.max_bytes:
            self.last_error = f"spool full ({self.bytes_used} of {self.max_bytes} bytes)"
            return False
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.dir / (name + ".tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, self.dir / (name + SUFFIX))
        except OSError as exc:
            self.last_error = f"spool write failed in {self.dir}: {exc}"
            log.error("%s", self.last_error)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return False
        with self._lock:
            self._bytes = (self._bytes or 0) + size
        return True

    def oldest(self, limit: int) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("*" + SUFFIX))[:limit]

    def read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError as exc:
            self.last_error = f"cannot read spooled batch {path}: {exc}"
            return None

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return
        with self._lock:
            if self._bytes is not None:
                self._bytes = max(0, self._bytes - size)

    def __len__(self) -> int:
        return len(self.oldest(10**9))
